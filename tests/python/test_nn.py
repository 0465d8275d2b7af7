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
