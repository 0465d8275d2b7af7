"""Flash attention: softmax(q k^T * scale) v computed tile by tile (FlashAttention-2's algorithm),
never holding the q_len x k_len score matrix, with a backward that recomputes the scores from the
saved log-sum-exp.

``flash_attention(q, k, v, causal=False, scale=None)`` takes the layout of
``torch.nn.functional.scaled_dot_product_attention``: q (batch, heads, q_len, head_dim), k and v
(batch, kv_heads, k_len, head_dim) with heads a multiple of kv_heads (grouped-query attention).
``flash_attention_varlen`` takes packed sequences and their offsets.

- causal aligns the last query with the last key: query i attends to keys j <= i + k_len - q_len
  (torch's ``is_causal`` aligns top left; the two agree when q_len == k_len). A query that sees no
  key gets a zero output and zero gradients.
- scale defaults to 1 / sqrt(head_dim).
- CPU tensors: float32, bfloat16 or float16, head_dim up to 256. CUDA tensors: bfloat16 or
  float16, head_dim 64 or 128, tensor-core kernels (sm_80 and later; on sm_90 the forward and
  backward run on warpgroup MMAs unless SCALETRAIN_FLASH_SM90=0 is set). fp32 accumulation on both.

Both are built on the dispatcher operators ``torch.ops.scaletrain.flash_attention_forward`` and
``flash_attention_backward`` (with fake-tensor kernels and an autograd formula registered here), so
``torch.compile(fullgraph=True)`` traces them without graph breaks.
"""

from typing import Optional

import torch
from torch import Tensor

from scaletrain import _C  # noqa: F401  (registers the scaletrain operators)

__all__ = ["flash_attention", "flash_attention_varlen", "cuda_hopper_kernels", "cuda_last_forward_kernel"]


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = torch.ops.scaletrain.flash_attention_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("scaletrain::flash_attention_forward", _backward, setup_context=_setup_context)


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """Attention over packed sequences of different lengths.

    q is (total_q, heads, head_dim), k and v (total_k, kv_heads, head_dim); sequence i holds query
    rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` and key rows ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]``
    (int32 or int64 offsets starting at 0, non-decreasing, ending at the row counts; a sequence may
    be empty). Returns (total_q, heads, head_dim) in q's dtype; differentiable in q, k and v.
    """
    out, _ = torch.ops.scaletrain.flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    return out


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """Attention in the scaled_dot_product_attention layout (batch, heads, seq, head_dim).

    k and v may have fewer heads than q (a divisor: grouped-query or multi-query attention).
    Any strides with a dense head_dim (a transposed (batch, seq, heads, head_dim) buffer is read in
    place). Returns (batch, heads, q_len, head_dim) in q's dtype and strides; differentiable in q,
    k and v.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v: {q.dim()}, {k.dim()} and {v.dim()} dimensions, expected 4 "
                         "(batch, heads, seq, head_dim)")
    out, _ = torch.ops.scaletrain.flash_attention_forward(q, k, v, None, None, causal, scale)
    return out


def cuda_hopper_kernels() -> bool:
    """Whether CUDA calls on the current device run the Hopper kernels (a build for sm_90, a device
    of compute capability 9.0, and SCALETRAIN_FLASH_SM90 not "0" in the environment)."""
    return _C.attention.cuda_hopper_kernels()


def cuda_last_forward_kernel() -> str:
    """The CUDA forward kernel this thread launched last ("" before the first): "portable"
    (mma.sync), "cpasync" (the Hopper kernel that loads tiles with cp.async: packed sequences, and
    layouts the copy engine cannot take, such as keys or values from expand()), "persistent/N" or
    "blocks/N" (the Hopper copy-engine kernel on a persistent grid or a block per work item, N
    consumer warpgroups). For finding out why a call runs slower than expected."""
    return _C.attention.cuda_last_forward_kernel()
