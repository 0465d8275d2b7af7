"""scaletrain.attention.flash_attention on CPU tensors (and CUDA ones, on a machine with a GPU) against
attention in fp64 (the reference),
through the dispatcher operators and the autograd formula registered from Python; the varlen entry
against the dense one; ValueErrors that name the argument; torch.compile(fullgraph=True) tracing
the operators without a graph break."""

import math

import pytest
import torch

from scaletrain.attention import (cuda_hopper_kernels, cuda_last_forward_kernel, flash_attention,
                                  flash_attention_varlen)


def fp64_attention(q, k, v, causal, scale=None):
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if causal:
        lq, lk = q.shape[2], k.shape[2]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def grads_of(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 17, 17, 32), (1, 2, 1, 40, 64, 64), (3, 2, 2, 1, 9, 16)])
def test_matches_fp64_attention(causal, shape):
    batch, heads, kv_heads, lq, lk, dim = shape
    torch.manual_seed(0)
    q, k, v = torch.randn(batch, heads, lq, dim), torch.randn(batch, kv_heads, lk, dim), torch.randn(batch, kv_heads, lk, dim)
    dout = torch.randn(batch, heads, lq, dim)
    ours = grads_of(lambda a, b, c: flash_attention(a, b, c, causal=causal), q, k, v, dout)
    exact = grads_of(lambda a, b, c: fp64_attention(a, b, c, causal), q, k, v, dout)
    for name, got, want in zip(("out", "dq", "dk", "dv"), ours, exact):
        assert got.dtype == torch.float32, name
        assert (got.double() - want).abs().max().item() <= 2e-6 * max(1.0, want.abs().max().item()), name


def test_bf16_within_its_rounding_and_scale_option():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 32) for _ in range(3))
    out = flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.3)
    assert out.dtype == torch.bfloat16
    exact = fp64_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), False, scale=0.3)
    assert (out.double() - exact).abs().max().item() <= 2 * 2**-8 * exact.abs().max().item()


def test_varlen_equals_dense_per_sequence():
    torch.manual_seed(2)
    lengths = [3, 0, 20, 7]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 2, 16) for _ in range(3))
    packed = flash_attention_varlen(q, k, v, cu, cu, causal=True)
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        rows = slice(int(cu[i]), int(cu[i + 1]))
        dense = flash_attention(*(t[rows].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), causal=True)
        assert torch.equal(packed[rows], dense[0].transpose(0, 1))


def test_errors_name_the_argument():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match="3 heads do not divide q's 4"):
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="k: dtype BFloat16, q is Float"):
        flash_attention(q, q.bfloat16(), q)
    with pytest.raises(ValueError, match="cu_seqlens_q: decreases at index 2"):
        flash_attention_varlen(torch.randn(6, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8),
                               torch.tensor([0, 4, 2, 6]), torch.tensor([0, 2, 4, 6]))
    with pytest.raises(ValueError, match="expected 4"):
        flash_attention(q[0], q[0], q[0])


def test_compiles_with_fullgraph():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 24, 16, requires_grad=True) for _ in range(3))

    def block(q, k, v):
        return (flash_attention(q * 2.0, k, v, causal=True) + 1.0).square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(block(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_cpu_calls_name_no_cuda_kernel():
    before = cuda_last_forward_kernel()
    flash_attention(*(torch.randn(1, 2, 9, 16) for _ in range(3)), causal=True)
    assert cuda_last_forward_kernel() == before
    if not torch.cuda.is_available():
        assert before == "" and cuda_hopper_kernels() is False


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_names_the_forward_kernel_that_ran(dim):
    q, k, v = (torch.randn(2, 4, 300, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    hopper = cuda_hopper_kernels()
    flash_attention(q, k, v)
    assert cuda_last_forward_kernel() == (("persistent/3" if dim == 64 else "persistent/2") if hopper else "portable")
    flash_attention(q, k, v, causal=True)  # causal on fewer than 2048 queries: two consumer warpgroups
    assert cuda_last_forward_kernel() == ("blocks/2" if hopper else "portable")
    one = torch.randn(2, 1, 300, dim, device="cuda", dtype=torch.bfloat16).expand(2, 4, 300, dim)  # head stride 0
    flash_attention(q, one, one)
    assert cuda_last_forward_kernel() == ("cpasync" if hopper else "portable")
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    packed = torch.randn(300, 4, dim, device="cuda", dtype=torch.bfloat16)
    flash_attention_varlen(packed, packed, packed, cu, cu)
    assert cuda_last_forward_kernel() == ("cpasync" if hopper else "portable")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
def test_cuda_within_twice_sdpa_error(dtype, dim):
    torch.manual_seed(4)
    q, k, v, dout = (torch.randn(2, 4, 300, dim, device="cuda", dtype=dtype) for _ in range(4))
    exact = grads_of(lambda a, b, c: fp64_attention(a.cpu(), b.cpu(), c.cpu(), True).cuda(), q, k, v, dout)
    ours = grads_of(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, dout)
    sdpa = grads_of(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True),
                    q, k, v, dout)
    for name, got, ref, want in zip(("out", "dq", "dk", "dv"), ours, sdpa, exact):
        assert got.dtype == dtype, name
        floor = torch.finfo(dtype).eps * want.abs().max().item()
        assert (got.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + floor, name


@cuda
def test_cuda_compiles_with_fullgraph():
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 100, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def block(q, k, v):
        return (flash_attention(q * 2.0, k, v, causal=True).float() + 1.0).square().sum()

    compiled = torch.compile(block, fullgraph=True)
    want = torch.autograd.grad(block(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_errors_name_the_argument():
    q = torch.randn(1, 2, 8, 96, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="q: head_dim 96 on cuda:0, the CUDA kernels take 64 or 128"):
        flash_attention(q, q, q)
    with pytest.raises(ValueError, match="the CUDA kernels take bfloat16 or float16"):
        flash_attention(q[..., :64].float(), q[..., :64].float(), q[..., :64].float())


@cuda
def test_cuda_deterministic_backward_is_bit_reproducible():
    torch.manual_seed(6)
    q, k, v, dout = (torch.randn(2, 4, 500, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    run = lambda: grads_of(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, dout)  # noqa: E731
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    default = run()
    assert (first[1].float() - default[1].float()).abs().max() <= 2e-2 * default[1].float().abs().max()


@cuda
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_repeated_runs_are_bit_identical(dim, causal):
    # Only dq is accumulated with atomics (in any order); out, dk and dv are each written by one
    # thread block from a fixed sequence of steps, so any difference between repeats is a race
    # (a shared-memory tile overwritten while a tensor-core product still reads it).
    torch.manual_seed(7)
    q, dout = (torch.randn(3, 8, 777, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(3, 2, 777, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    run = lambda: grads_of(lambda a, b, c: flash_attention(a, b, c, causal=causal), q, k, v, dout)  # noqa: E731
    first = run()
    for _ in range(8):
        again = run()
        for name, a, b in zip(("out", "dk", "dv"), (first[0], first[2], first[3]), (again[0], again[2], again[3])):
            assert torch.equal(a, b), name
        assert (again[1].float() - first[1].float()).abs().max() <= 1e-2 * first[1].float().abs().max()
