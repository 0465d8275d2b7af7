"""scaletrain.nn: the SDPA drop-in, EfficientAttention and convert_model_to_efficient_attention on
transformers' GPT-2 and Llama (built from config) and the GPT of examples/python/train_gpt.py.
Reference: the same model before conversion (torch's SDPA), outputs and gradients; and a count of
calls into scaletrain's flash attention, so a silent fallback fails the test."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import scaletrain
import scaletrain.nn as snn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def flash_calls(monkeypatch):
    """Counts the calls into scaletrain's flash attention made through scaletrain.nn."""
    calls = []
    real = snn.flash_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(snn, "flash_attention", counting)
    return calls


def close(a, b, tol):
    return (a.double() - b.double()).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_drop_in_matches_torch(flash_calls, causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 2, 33, 16), torch.randn(2, 2, 33, 16)
    got = snn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert close(got, want, 1e-5)
    assert len(flash_calls) == 1


def test_sdpa_drop_in_falls_back_where_flash_does_not_apply(flash_calls):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    mask = torch.rand(9, 9) > 0.3
    assert torch.equal(snn.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    k5 = torch.randn(1, 2, 5, 8)  # causal with q_len != k_len: torch aligns top left
    assert torch.equal(snn.scaled_dot_product_attention(q, k5, k5, is_causal=True),
                       F.scaled_dot_product_attention(q, k5, k5, is_causal=True))
    assert torch.equal(snn.scaled_dot_product_attention(q.double(), k.double(), v.double()),
                       F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    assert flash_calls == []


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_efficient_attention_equals_its_math(flash_calls, kv_heads):
    torch.manual_seed(2)
    attn = snn.EfficientAttention(64, 4, num_kv_heads=kv_heads)
    x = torch.randn(3, 20, 64, requires_grad=True)
    y = attn(x)
    q, k, v = attn.qkv(x).split([64, 16 * kv_heads, 16 * kv_heads], -1)
    heads = lambda t, n: t.view(3, 20, n, 16).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(heads(q, 4), heads(k, kv_heads), heads(v, kv_heads), is_causal=True,
                                         enable_gqa=True)
    ref = attn.out(ref.transpose(1, 2).reshape(3, 20, 64))
    assert close(y, ref, 1e-5)
    gx, = torch.autograd.grad(y.square().sum(), x)
    gref, = torch.autograd.grad(ref.square().sum(), x)
    assert close(gx, gref, 1e-4)
    assert len(flash_calls) == 1
    with pytest.raises(ValueError, match="num_kv_heads 3 must divide num_heads 4"):
        snn.EfficientAttention(64, 4, num_kv_heads=3)


def outputs_and_grads(model, run):
    model.zero_grad()
    out = run(model)
    out.float().square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def check_conversion(model, run, flash_calls, tol):
    before, grads_before = outputs_and_grads(model, run)
    assert snn.convert_model_to_efficient_attention(model) is model
    after, grads_after = outputs_and_grads(model, run)
    assert flash_calls, "no call reached scaletrain's flash attention"
    assert close(after, before, tol)
    assert len(grads_after) == len(grads_before)
    for a, b in zip(grads_after, grads_before):
        assert close(a, b, tol)


def test_converts_transformers_gpt2(flash_calls):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_layer=2, n_head=4, n_embd=64,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 97, (2, 24))
    check_conversion(model, lambda m: m(ids).logits, flash_calls, 2e-5)
    assert model.config._attn_implementation == "scaletrain"
    # A padding mask keeps transformers' SDPA path, and gives what the model gave before.
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    calls = len(flash_calls)
    padded = model(ids, attention_mask=mask).logits
    assert len(flash_calls) == calls
    model.set_attn_implementation("sdpa")
    assert torch.equal(padded, model(ids, attention_mask=mask).logits)


def test_converts_transformers_llama_with_grouped_query_attention(flash_calls):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 101, (2, 20))
    check_conversion(model, lambda m: m(ids).logits, flash_calls, 2e-5)
    assert flash_calls[0][1] == 4  # query heads; keys and values went in with their 2 heads


def test_converts_the_example_gpt(flash_calls):
    sys.path.insert(0, str(ROOT / "examples/python"))
    try:
        from train_gpt import GPT
    finally:
        sys.path.remove(str(ROOT / "examples/python"))
    torch.manual_seed(5)
    model = GPT(256, 32, 2, 4, 64)
    ids = torch.randint(0, 256, (2, 32))
    check_conversion(model, lambda m: m(ids), flash_calls, 2e-5)
    assert len(flash_calls) == 2  # one per block


def test_conversion_without_attention_says_so():
    with pytest.raises(ValueError, match="found no attention to convert in Linear"):
        snn.convert_model_to_efficient_attention(torch.nn.Linear(4, 4))


def test_a_model_on_efficient_attention_compiles_with_fullgraph():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), snn.EfficientAttention(64, 4, num_kv_heads=2),
                                torch.nn.LayerNorm(64))
    x = torch.randn(2, 16, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    want = model(x)
    got = compiled(x)
    assert torch.equal(got, want)
    g_want = torch.autograd.grad(want.sum(), list(model.parameters()))
    g_got = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_converts_transformers_gpt2_on_cuda_in_bf16(flash_calls):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    config = transformers.GPT2Config(vocab_size=97, n_positions=256, n_layer=2, n_head=4, n_embd=256,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).cuda()
    ids = torch.randint(0, 97, (2, 200), device="cuda")

    def run(m):
        with torch.autocast("cuda", torch.bfloat16):
            return m(ids).logits

    check_conversion(model, run, flash_calls, 5e-2)
    assert scaletrain.nn.flash_supported(torch.empty(1, 4, 8, 64, device="cuda", dtype=torch.bfloat16),
                                         torch.empty(1, 4, 8, 64, device="cuda", dtype=torch.bfloat16))


def rel_close(a, b, tol):
    """Largest error within tol of b's largest magnitude (gradients are small: no floor at 1)."""
    return (a.double() - b.double()).abs().max().item() <= tol * b.double().abs().max().item()


def reference_cross_entropy(logits, targets, classes, ignore_index=-100, reduction="mean"):
    """fp64 math: F.cross_entropy over the first `classes` columns."""
    return F.cross_entropy(logits[..., :classes].double().reshape(-1, classes), targets.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_fp64_torch(dtype, tol, reduction):
    torch.manual_seed(8)
    # (3, 13) rows of 50 columns of which 45 are classes (5 padding columns), a few ignored rows.
    padded = (torch.randn(3, 13, 50, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 45, (3, 13))
    targets[0, :4] = -100
    got = snn.cross_entropy(padded, targets, reduction=reduction, classes=45)
    want = reference_cross_entropy(padded.detach().double().requires_grad_(), targets, 45, reduction=reduction)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert close(got.double().reshape(-1), want.detach().reshape(-1), 1e-6 if dtype != torch.float64 else 1e-12)
    weights = torch.rand_like(want) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    (got.double() * weights.view(got.shape)).sum().backward()
    ref = padded.detach().double().requires_grad_()
    (reference_cross_entropy(ref, targets, 45, reduction=reduction) * weights).sum().backward()
    assert padded.grad.dtype == dtype
    assert torch.all(padded.grad[..., 45:] == 0)  # padding columns take no part
    assert torch.all(padded.grad[0, :4] == 0)  # nor ignored rows
    assert rel_close(padded.grad, ref.grad, tol)


def test_cross_entropy_reads_a_view_of_padded_logits_in_place(monkeypatch):
    torch.manual_seed(9)
    full = torch.randn(4, 6, 64, requires_grad=True)
    view = full[..., :50]  # (4, 6, 50) with rows 64 apart: no copy before the kernel
    seen = []
    forward = torch.ops.scaletrain.cross_entropy_forward

    def spy(rows, *args):
        seen.append((rows.shape, rows.stride(), rows.data_ptr() == full.data_ptr()))
        return forward(rows, *args)

    monkeypatch.setattr(torch.ops.scaletrain, "cross_entropy_forward", spy)
    targets = torch.randint(0, 50, (4, 6))
    snn.cross_entropy(view, targets).backward()
    assert seen == [(torch.Size([24, 50]), (64, 1), True)]
    ref = full.detach().double().requires_grad_()
    reference_cross_entropy(ref[..., :50], targets, 50).backward()
    assert rel_close(full.grad, ref.grad, 1e-6)


def test_cross_entropy_checks_its_arguments():
    logits, targets = torch.randn(5, 10), torch.randint(0, 10, (5,))
    with pytest.raises(ValueError, match=r"targets \(4,\) do not match logits \(5, 10\)"):
        snn.cross_entropy(logits, targets[:4])
    with pytest.raises(ValueError, match="classes = 11, expected 1..10"):
        snn.cross_entropy(logits, targets, classes=11)
    with pytest.raises(ValueError, match="targets must be int64"):
        snn.cross_entropy(logits, targets.int())
    with pytest.raises(ValueError, match="logits must be floating point"):
        snn.cross_entropy(targets.view(5, 1), targets)
    with pytest.raises(ValueError, match="reduction 'avg'"):
        snn.cross_entropy(logits, targets, reduction="avg")
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 10, expected a class in \[0, 10\)"):
        snn.cross_entropy(logits, torch.tensor([0, 1, 10, 2, 3]))


def test_cross_entropy_compiles_with_fullgraph():
    torch.manual_seed(10)
    head = torch.nn.Linear(16, 64)
    x, targets = torch.randn(3, 7, 16), torch.randint(0, 50, (3, 7))

    def loss_of(x):
        return snn.cross_entropy(head(x)[..., :50], targets)

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    want = loss_of(x)
    assert torch.equal(compiled(x), want)
    g_want = torch.autograd.grad(loss_of(x), list(head.parameters()))
    g_got = torch.autograd.grad(compiled(x), list(head.parameters()))
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)


def linear_loss_and_grads(fn, hidden, weight, scale=1.0):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 5, 4096])
def test_linear_cross_entropy_matches_fp64_torch(dtype, tol, reduction, chunk_rows):
    torch.manual_seed(11)
    # (3, 13) rows, a weight of 50 rows of which 45 are classes, a few ignored rows.
    hidden = torch.randn(3, 13, 24, dtype=torch.float64).to(dtype)
    weight = (torch.randn(50, 24, dtype=torch.float64) * 0.3).to(dtype)
    targets = torch.randint(0, 45, (3, 13))
    targets[0, :4] = -100
    got = linear_loss_and_grads(lambda h, w: snn.linear_cross_entropy(h, w, targets, reduction=reduction, classes=45,
                                                                      chunk_rows=chunk_rows), hidden, weight, 1.7)
    want = linear_loss_and_grads(lambda h, w: reference_cross_entropy(F.linear(h, w), targets, 45, reduction=reduction),
                                 hidden.double(), weight.double(), 1.7)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert close(got[0].double(), want[0], tol)
    assert rel_close(got[1], want[1], tol)
    assert rel_close(got[2], want[2], tol)
    assert torch.all(got[2][45:] == 0)  # rows past the classes never reach the loss
    with torch.no_grad():  # no gradient wanted: the same loss
        again = snn.linear_cross_entropy(hidden, weight, targets, reduction=reduction, classes=45, chunk_rows=chunk_rows)
    assert torch.equal(again, got[0])


def test_linear_cross_entropy_under_cpu_autocast_and_edge_cases():
    torch.manual_seed(12)
    hidden, weight, targets = torch.randn(2, 9, 16), torch.randn(40, 16) * 0.3, torch.randint(0, 40, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_loss_and_grads(lambda h, w: snn.linear_cross_entropy(h, w, targets, chunk_rows=4), hidden, weight)
    want = linear_loss_and_grads(lambda h, w: reference_cross_entropy(F.linear(h, w), targets, 40),
                                 hidden.bfloat16().double(), weight.bfloat16().double())
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32  # the inputs' dtypes
    assert close(got[0].double(), want[0], 1e-3)
    assert rel_close(got[1], want[1], 3e-2) and rel_close(got[2], want[2], 3e-2)
    none = torch.full((2, 9), -100)
    loss, g_hidden, g_weight = linear_loss_and_grads(lambda h, w: snn.linear_cross_entropy(h, w, none), hidden, weight)
    assert torch.isnan(loss) and torch.all(g_hidden == 0) and torch.all(g_weight == 0)
    with pytest.raises(ValueError, match=r"targets \(2, 8\) do not match hidden \(2, 9, 16\)"):
        snn.linear_cross_entropy(hidden, weight, targets[:, :8])
    with pytest.raises(ValueError, match="chunk_rows = 0, expected >= 1"):
        snn.linear_cross_entropy(hidden, weight, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="classes = 41, expected 1..40"):
        snn.linear_cross_entropy(hidden, weight, targets, classes=41)
    with pytest.raises(ValueError, match="reduction 'none'"):
        snn.linear_cross_entropy(hidden, weight, targets, reduction="none")


def test_linear_cross_entropy_compiles_with_fullgraph():
    torch.manual_seed(13)
    body = torch.nn.Linear(16, 16)
    weight = torch.nn.Parameter(torch.randn(64, 16) * 0.3)
    x, targets = torch.randn(3, 7, 16), torch.randint(0, 50, (3, 7))

    def loss_of(x):
        return snn.linear_cross_entropy(torch.tanh(body(x)), weight, targets, classes=50, chunk_rows=8)

    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")
    params = [weight, *body.parameters()]
    want = loss_of(x)
    g_want = torch.autograd.grad(want, params)
    got = compiled(x)
    g_got = torch.autograd.grad(got, params)
    assert torch.equal(got, want)
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)


def loss_and_grads(model, ids, **kwargs):
    model.zero_grad()
    loss = model(ids, labels=ids, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fused_loss_pads_gpt2s_vocabulary_without_changing_the_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(11)
    config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_layer=2, n_head=4, n_embd=32)
    model = transformers.GPT2LMHeadModel(config).eval()  # no dropout: the same forward twice
    ids = torch.randint(0, 97, (2, 20))
    logits_before = model(ids).logits
    loss_before, grads_before = loss_and_grads(model, ids)
    items_before, _ = loss_and_grads(model, ids, num_items_in_batch=torch.tensor(33))
    generated_before = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert snn.convert_model_to_fused_loss(model) is model
    assert model.lm_head.weight.shape == (128, 32) and model.transformer.wte.weight is model.lm_head.weight
    assert torch.all(model.lm_head.weight[97:] == 0)
    logits = model(ids).logits
    assert logits.shape == (2, 20, 97) and close(logits, logits_before, 1e-5)
    loss, grads = loss_and_grads(model, ids)
    assert close(loss, loss_before, 1e-6)
    for name, grad in grads.items():
        want = grads_before[name]
        if name == "transformer.wte.weight":
            assert torch.all(grad[97:] == 0)
            grad = grad[:97]
        assert close(grad, want, 1e-5), name
    items, _ = loss_and_grads(model, ids, num_items_in_batch=torch.tensor(33))
    assert close(items, items_before, 1e-6)
    assert torch.equal(model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0),
                       generated_before)


def test_fused_loss_pads_an_untied_llama_head_only():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(12)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 101, (2, 16))
    loss_before, grads_before = loss_and_grads(model, ids)
    snn.convert_model_to_fused_loss(model, pad_vocab_to=32)
    assert model.lm_head.weight.shape == (128, 32) and model.model.embed_tokens.weight.shape == (101, 32)
    loss, grads = loss_and_grads(model, ids)
    assert close(loss, loss_before, 1e-6)
    assert close(grads["lm_head.weight"][:101], grads_before["lm_head.weight"], 1e-5)
    assert torch.all(grads["lm_head.weight"][101:] == 0)
    with pytest.raises(ValueError, match="is not a transformers causal LM"):
        snn.convert_model_to_fused_loss(torch.nn.Linear(4, 4))


def test_convert_model_swaps_gelu_and_keeps_the_outputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(13)
    config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_layer=2, n_head=4, n_embd=32,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 97, (2, 20))
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    loss_before, grads_before = loss_and_grads(model, ids)
    snn.convert_model(model)
    assert isinstance(model.transformer.h[0].mlp.act, torch.nn.GELU)
    assert model.config._attn_implementation == "scaletrain"
    loss, grads = loss_and_grads(model, ids)
    assert close(loss, loss_before, 1e-5)
    for name, grad in grads.items():
        assert close(grad[:97] if name == "transformer.wte.weight" else grad, grads_before[name], 1e-4), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cross_entropy_on_cuda_in_bf16():
    torch.manual_seed(14)
    full = (torch.randn(300, 50304, device="cuda") * 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 50257, (300,), device="cuda")
    targets[:7] = -100
    loss = snn.cross_entropy(full[:, :50257], targets)
    loss.backward()
    ref = full.detach().double().requires_grad_()
    want = reference_cross_entropy(ref, targets, 50257)
    want.backward()
    assert close(loss.double(), want.detach(), 1e-5)
    assert torch.all(full.grad[:, 50257:] == 0)
    assert rel_close(full.grad, ref.grad, 1e-2)
