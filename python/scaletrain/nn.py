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
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaletrain.attention import flash_attention

__all__ = ["EfficientAttention", "convert_model_to_efficient_attention", "flash_supported",
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
