"""Attention modules and one-call model conversion onto scaletrain's flash attention.

- ``scaled_dot_product_attention(q, k, v, ...)``: ``torch.nn.functional.scaled_dot_product_attention``'s
  signature and results, through ``scaletrain.attention.flash_attention`` wherever its kernels apply
  (no mask, no dropout, a supported dtype, device and head_dim), else through torch's SDPA.
- ``EfficientAttention(embed_dim, num_heads, ...)``: multi-head self-attention (one qkv projection,
  flash attention, the output projection) to build models with.
- ``convert_model_to_efficient_attention(model)``: switches an existing model's attention to it in
  place: transformers models (GPT-2, Llama and the others on transformers' AttentionInterface) and
  any module with an ``attention_function`` attribute (a callable with SDPA's signature, as the
  GPT of examples/python/train_gpt.py has). Outputs and gradients stay those of the model before,
  within the rounding of the dtype.
- ``cross_entropy(logits, targets, ...)``: ``torch.nn.functional.cross_entropy`` in one fused pass
  (fp32 math on bf16/fp16 logits read in place: no fp32 copy of the logits), over the first
  ``classes`` columns when the output layer is padded.
- ``linear_cross_entropy(hidden, weight, targets, ...)``: the output layer and ``cross_entropy``
  together, a chunk of rows at a time, never holding the logits of the whole batch.
- ``convert_model_to_fused_loss(model, pad_vocab_to=64)``: a transformers causal LM's output layer
  padded to a multiple of 64 rows (fast GEMMs; the padded columns never reach the loss or the
  logits the model returns) and its loss computed by ``cross_entropy``.
- ``convert_activations(model)``: transformers' GELU modules written out in Python (``gelu_new``,
  ``gelu_fast``...) replaced by the same function in one kernel (``nn.GELU(approximate="tanh")``).
- ``convert_model(model)``: all three conversions.
"""

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaletrain.attention import flash_attention

__all__ = ["EfficientAttention", "convert_activations", "convert_model", "convert_model_to_efficient_attention",
           "convert_model_to_fused_loss", "cross_entropy", "flash_supported", "linear_cross_entropy",
           "scaled_dot_product_attention"]

_CUDA_HEAD_DIMS = (64, 128)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def flash_supported(query: Tensor, key: Tensor) -> bool:
    """Whether scaletrain's kernels take these tensors: CPU (float32, bfloat16, float16; head_dim up to
    256) or CUDA (bfloat16, float16; head_dim 64 or 128), 4 dimensions, heads a multiple of kv_heads."""
    if query.dim() != 4 or key.dim() != 4 or query.shape[1] % key.shape[1] != 0 or query.device != key.device:
        return False
    head_dim = query.shape[-1]
    if query.is_cuda:
        return query.dtype in _CUDA_DTYPES and head_dim in _CUDA_HEAD_DIMS
    return query.device.type == "cpu" and query.dtype in _CPU_DTYPES and head_dim <= 256


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` through scaletrain's flash attention.

    Flash attention runs when there is no ``attn_mask``, ``dropout_p`` is 0, ``is_causal`` has
    q_len == k_len (torch aligns the causal mask top left, scaletrain bottom right: the two agree
    only there), k and v have q's head count or ``enable_gqa`` is set, and ``flash_supported``
    says the kernels take the tensors; anything else goes to torch's SDPA unchanged.
    """
    grouped = key.dim() == 4 and query.dim() == 4 and key.shape[1] != query.shape[1]
    if (attn_mask is None and dropout_p == 0.0 and (not grouped or enable_gqa)
            and (not is_causal or query.shape[-2] == key.shape[-2]) and flash_supported(query, key)
            and value.dtype == query.dtype and value.shape[-1] == query.shape[-1]):
        return flash_attention(query, key, value, causal=is_causal, scale=scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


class EfficientAttention(nn.Module):
    """Multi-head self-attention on scaletrain's flash attention.

    ``forward(x)`` takes (batch, seq, embed_dim) and returns the same shape: one projection to q, k
    and v (``num_kv_heads`` key/value heads, default ``num_heads``: fewer gives grouped-query
    attention), attention (causal by default), the output projection. Dropout is not applied
    (flash attention has none).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, bias: bool = True,
                 causal: bool = True, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads != 0:
            raise ValueError(f"EfficientAttention: embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"EfficientAttention: num_kv_heads {num_kv_heads} must divide num_heads {num_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, embed_dim // num_heads
        self.causal = causal
        factory = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias, **factory)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                     self.num_kv_heads * self.head_dim], dim=-1)
        # (batch, seq, heads, dim) views seen as (batch, heads, seq, dim): read in place, no copy.
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        y = scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, width))


def _transformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """transformers' attention-function contract (query, key, value as (batch, heads, seq, dim);
    returns (batch, seq, heads, dim) and no weights), through flash attention where it applies and
    transformers' own SDPA path for everything else (masks, dropout, position bias, decoding with
    a cache)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, k_len = query.shape[2], key.shape[2]
    plain = (attention_mask is None and dropout == 0.0 and kwargs.get("position_bias") is None
             and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)
             and (not causal or q_len == k_len) and flash_supported(query, key) and value.dtype == query.dtype)
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = flash_attention(query, key, value, causal=bool(causal and q_len > 1), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _convert_transformers(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    if not isinstance(model, PreTrainedModel):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("scaletrain", _transformers_attention)
    AttentionMaskInterface.register("scaletrain", sdpa_mask)  # a plain causal mask is skipped (None), as for sdpa
    model.set_attn_implementation("scaletrain")
    return True


def convert_model_to_efficient_attention(model: nn.Module,
                                         attention_function: Callable = scaled_dot_product_attention) -> nn.Module:
    """Sends ``model``'s attention through scaletrain's flash attention, in place; returns ``model``.

    - transformers models (``PreTrainedModel``: GPT-2, Llama and the others built on transformers'
      AttentionInterface): registers the ``"scaletrain"`` attention implementation and selects it.
      Padding masks, attention dropout in training and decoding with a cache keep transformers'
      SDPA path.
    - every submodule with an ``attention_function`` attribute (a callable with
      ``torch.nn.functional.scaled_dot_product_attention``'s signature that its forward calls):
      the attribute becomes ``attention_function`` (default: this module's
      ``scaled_dot_product_attention``).

    Raises ValueError when the model has neither.
    """
    converted = _convert_transformers(model)
    for module in model.modules():
        if "attention_function" in vars(module) or hasattr(type(module), "attention_function"):
            module.attention_function = attention_function
            converted = True
    if not converted:
        raise ValueError(f"convert_model_to_efficient_attention: found no attention to convert in {type(model).__name__} "
                         "(expected a transformers PreTrainedModel, or modules with an attention_function attribute "
                         "that their forward calls)")
    return model


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, classes, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.classes, ctx.ignore_index = classes, ignore_index


def _cross_entropy_backward(ctx, grad_rows, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    if grad_rows is None:
        return None, None, None, None
    grad = torch.ops.scaletrain.cross_entropy_backward(grad_rows, logits, targets, lse, ctx.classes, ctx.ignore_index)
    return grad, None, None, None


torch.library.register_autograd("scaletrain::cross_entropy_forward", _cross_entropy_backward,
                                setup_context=_cross_entropy_setup)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean",
                  classes: Optional[int] = None) -> Tensor:
    """``F.cross_entropy(logits[..., :classes].float(), targets)`` in one pass over the logits.

    logits (..., C) in float32, bfloat16, float16 (float64: ATen's ops) with a dense last dimension,
    any other strides (a view of padded logits is read in place); targets (...) int64. Only the
    first ``classes`` columns (default C) take part: the others get zero gradient. Rows whose target
    is ``ignore_index`` count for nothing; ``mean`` divides by the rows that count (NaN when none
    do, as torch). ``reduction`` is "mean", "sum" or "none" (per-row losses, 0 for ignored rows).
    Returns float32 (float64 for float64 logits); the gradient has the logits' dtype. A target
    outside [0, classes) raises on the CPU and gives a NaN loss on CUDA (checked without waiting for
    the device). A ``torch.library`` operator: ``torch.compile(fullgraph=True)`` traces it.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction {reduction!r}, expected 'mean', 'sum' or 'none'")
    if logits.dim() < 1:
        raise ValueError("cross_entropy: logits must have a class dimension")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)} "
                         "(one target per row of the last dimension)")
    columns = logits.shape[-1]
    rows = logits.reshape(-1, columns)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    flat = targets.reshape(-1)
    loss_rows, _ = torch.ops.scaletrain.cross_entropy_forward(rows, flat, columns if classes is None else classes,
                                                              ignore_index)
    if reduction == "none":
        return loss_rows.view(targets.shape)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / (flat != ignore_index).sum()


def _linear_loss_setup(ctx, inputs, output):
    hidden, weight = inputs[0], inputs[1]
    _, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.dtypes = (hidden.dtype, weight.dtype)


def _linear_loss_backward(ctx, grad_sum, _grad_hidden, _grad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_sum is None or grad_hidden.numel() == 0:  # no gradient was made in forward
        return (None,) * 8
    return ((grad_hidden * grad_sum).to(ctx.dtypes[0]), (grad_weight * grad_sum).to(ctx.dtypes[1])) + (None,) * 6


torch.library.register_autograd("scaletrain::linear_cross_entropy_sum", _linear_loss_backward,
                                setup_context=_linear_loss_setup)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", classes: Optional[int] = None, chunk_rows: int = 4096) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight)[..., :classes].float(), targets)`` without the
    logits: the output layer and the loss run ``chunk_rows`` rows at a time, and each chunk's
    logits gradient is folded into the gradients of ``hidden`` and ``weight`` (fp32 sums) before the
    next chunk, so neither the logits of the whole batch nor their gradient ever exist (GPT-2 at
    16 x 1024 tokens: 1.6 GB each in bf16).

    hidden (..., features), weight (columns, features) with no bias (the output layer of a language
    model, padded or not), targets (...) int64. The GEMMs run in the autocast dtype when autocast
    is on for hidden's device, else in hidden's dtype; gradients come back in the inputs' dtypes.
    Only the first ``classes`` rows of weight (default all) are classes: the others get zero
    gradient. Rows whose target is ``ignore_index`` count for nothing; ``reduction`` "mean" divides
    by the rows that count (NaN when none do, with zero gradients), "sum" adds them. A
    ``torch.library`` operator: ``torch.compile(fullgraph=True)`` traces it. The gradient work is
    done in forward when a gradient will be wanted (grad mode on and hidden or weight requiring
    one); backward scales it.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction {reduction!r}, expected 'mean' or 'sum'")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} do not match hidden "
                         f"{tuple(hidden.shape)} (one target per row of the last dimension)")
    device = hidden.device.type
    compute_dtype = None
    if hidden.dtype != torch.float64 and torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum, _, _ = torch.ops.scaletrain.linear_cross_entropy_sum(
        hidden, weight, targets, weight.shape[0] if classes is None else classes, ignore_index, chunk_rows,
        compute_dtype, with_grad)
    if reduction == "sum":
        return loss_sum
    count = (targets != ignore_index).sum()
    # No rows that count: NaN, and no gradient through the division by zero.
    return torch.where(count > 0, loss_sum / count.clamp(min=1), torch.full_like(loss_sum, float("nan")))


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """transformers' causal-LM loss contract (``ForCausalLMLoss``: tokens < n predict n; a sum
    divided by ``num_items_in_batch`` when given, else the mean) on ``cross_entropy`` over the first
    ``vocab_size`` columns, reading the (bf16) logits in place instead of an fp32 copy."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(logits.device)
    if num_items_in_batch is None:
        return cross_entropy(logits, targets, ignore_index, "mean", classes=vocab_size)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return cross_entropy(logits, targets, ignore_index, "sum", classes=vocab_size) / num_items_in_batch


class PaddedVocabLinear(nn.Linear):
    """An output layer whose weight has more rows than the vocabulary (``vocab_size``): the matrix
    product runs on the padded weight (GEMM-friendly shapes) and the logits of the real vocabulary
    come back, a view (the loss reads them in place)."""

    vocab_size: int

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)[..., :self.vocab_size]


def _padded_rows(t: Tensor, rows: int) -> nn.Parameter:
    with torch.no_grad():
        pad = t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))
        return nn.Parameter(torch.cat([t, pad]), requires_grad=t.requires_grad)


def _linear_head(model: nn.Module):
    """The model's output layer when it is a plain nn.Linear (or one converted already), else None.
    Exactly nn.Linear: the class swap of convert_model_to_fused_loss would drop a subclass's own
    forward (quantized, LoRA...)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if type(head) in (nn.Linear, PaddedVocabLinear) else None


def convert_model_to_fused_loss(model: nn.Module, pad_vocab_to: int = 64) -> nn.Module:
    """A transformers causal LM (GPT-2, Llama...: ``get_output_embeddings()`` a plain ``nn.Linear``) with
    its output layer padded to a multiple of ``pad_vocab_to`` rows and its loss on ``cross_entropy``;
    in place, returns ``model``. Call it before making the optimizer (the padded weight is a new
    parameter).

    The padded rows are zeros; tied input embeddings are padded with the head (no token id reaches
    the new rows). ``model(ids).logits`` keeps ``config.vocab_size`` columns, and the loss, its
    gradients and the real rows' gradients are those of the model before (the padded rows get
    zero gradient, so weight decay keeps them zero). The model's state dict then holds the padded
    rows: ``weight[:config.vocab_size]`` are the model's. ``pad_vocab_to=1`` pads nothing and only
    fuses the loss.
    """
    if pad_vocab_to < 1:
        raise ValueError(f"convert_model_to_fused_loss: pad_vocab_to {pad_vocab_to}, expected >= 1")
    head = _linear_head(model)
    if head is None or not hasattr(model, "config") or not hasattr(type(model), "loss_function"):
        raise ValueError(f"convert_model_to_fused_loss: {type(model).__name__} is not a transformers causal LM with "
                         "a linear output layer (expected get_output_embeddings() to be a plain nn.Linear and a "
                         "loss_function)")
    vocab = head.vocab_size if isinstance(head, PaddedVocabLinear) else int(model.config.vocab_size)
    if not isinstance(head, PaddedVocabLinear) and head.out_features != vocab:
        raise ValueError(f"convert_model_to_fused_loss: the output layer has {head.out_features} rows, "
                         f"config.vocab_size is {vocab}")
    padded = math.ceil(vocab / pad_vocab_to) * pad_vocab_to
    if padded > head.weight.shape[0]:
        embedding = model.get_input_embeddings()
        tied = embedding is not None and embedding.weight is head.weight
        head.weight = _padded_rows(head.weight, padded)
        if head.bias is not None:
            head.bias = _padded_rows(head.bias, padded)
        head.out_features = padded
        if tied:
            embedding.weight = head.weight
            embedding.num_embeddings = padded
    if not isinstance(head, PaddedVocabLinear):
        head.__class__ = PaddedVocabLinear
        head.vocab_size = vocab
    model.loss_function = causal_lm_loss
    return model


def _gelu_tanh_modules():
    try:
        from transformers import activations
    except ImportError:
        return ()
    # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), written out in several kernels.
    return tuple(getattr(activations, name) for name in ("NewGELUActivation", "FastGELUActivation")
                 if hasattr(activations, name))


def convert_activations(model: nn.Module) -> nn.Module:
    """transformers' tanh-approximated GELU modules (``gelu_new``, ``gelu_fast``: several elementwise
    kernels forward and backward) replaced by ``nn.GELU(approximate="tanh")``, the same function in
    one kernel each way; in place, returns ``model`` (a model without them is left as it is)."""
    kinds = _gelu_tanh_modules()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if kinds and isinstance(child, kinds):
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model


def convert_model(model: nn.Module, pad_vocab_to: int = 64) -> nn.Module:
    """``convert_model_to_efficient_attention``, ``convert_model_to_fused_loss`` (transformers
    causal LMs) and ``convert_activations``, in place; returns ``model``. Call it before making the
    optimizer."""
    convert_model_to_efficient_attention(model)
    if _linear_head(model) is not None:
        convert_model_to_fused_loss(model, pad_vocab_to)
    return convert_activations(model)
