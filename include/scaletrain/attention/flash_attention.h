#pragma once
// Flash attention: softmax(q k^T * scale) v computed tile by tile with an online softmax, so the
// q_len x k_len score matrix is never held (FlashAttention-2's algorithm: a Q tile at a time, K/V
// tiles streamed past it, fp32 accumulation, one log-sum-exp per query kept for backward). The
// backward recomputes the scores from the log-sum-exp and the row sums of dO * O.
//
//   auto out = scaletrain::attention::flash_attention(q, k, v, /*causal=*/true);  // (B, H, S, D)
//   out.sum().backward();
//
// CPU tensors: at::parallel_for over sequences and key/value heads; fp32, bf16 and fp16 inputs,
// fp32 arithmetic, head_dim up to 256. CUDA tensors (builds with CUDA, sm_80 and later): tensor-core
// kernels for bf16 and fp16 with head_dim 64 or 128, fp32 accumulation, any strides with a dense
// head_dim (rows not 16-byte aligned are copied first); on Hopper (sm_90) the forward and the
// backward run on warpgroup MMAs (cuda_hopper_kernels()), the dense forward's tiles loaded by the
// copy engine (TMA) for warp-specialised consumers.
//
// Semantics:
// - Layout of torch's scaled_dot_product_attention: q (batch, heads, q_len, head_dim), k and v
//   (batch, kv_heads, k_len, head_dim); heads a multiple of kv_heads (grouped-query attention:
//   query head h reads key/value head h / (heads / kv_heads); MQA is kv_heads = 1).
// - causal aligns the last query with the last key (bottom right, as FlashAttention >= 2.1 and as
//   a query block that continues a cached prefix): query i attends to keys j <= i + k_len - q_len.
//   A query that sees no key (q_len > k_len) gets a zero output, a -inf log-sum-exp and zero
//   gradients. torch's is_causal aligns top left instead; both agree when q_len == k_len.
// - scale defaults to 1 / sqrt(head_dim).
// - Inputs: one dtype (float32, bfloat16, float16), one device, the head_dim stride 1, head_dim in
//   [1, 256], nothing empty. Errors are std::invalid_argument naming the argument.
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace scaletrain::attention {

// Whether this build's CUDA kernels take `head_dim` (64 and 128; none in a build without CUDA).
bool cuda_supports_head_dim(int64_t head_dim);

// Whether the forward and backward on the current CUDA device run the Hopper kernels (wgmma,
// sm_90a): a build for sm_90, a device of compute capability 9.0, and SCALETRAIN_FLASH_SM90 not "0"
// in the environment (read at each call; "0" selects the portable mma.sync kernels, which other
// devices run). The deterministic backward's dQ kernel is the portable one on every device.
bool cuda_hopper_kernels();

// The CUDA forward kernel this thread launched last (empty before the first, and in a build
// without CUDA): "portable" (mma.sync), "cpasync" (the Hopper kernel that loads tiles with
// cp.async: packed sequences, and layouts the copy engine cannot take, such as a stride of 0 from
// expand()), "persistent/N" or "blocks/N" (the Hopper copy-engine kernel on a persistent grid or a
// block per work item, N consumer warpgroups). For finding out why a call is slower than expected.
std::string cuda_last_forward_kernel();

// Differentiable in q, k and v. Output in q's dtype and layout (batch, heads, q_len, head_dim).
at::Tensor flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal = false,
                           std::optional<double> scale = std::nullopt);

// Packed sequences of different lengths: q (total_q, heads, head_dim), k and v (total_k, kv_heads,
// head_dim); sequence i holds query rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1] and key rows
// cu_seqlens_k[i] .. cu_seqlens_k[i + 1]. cu_seqlens_*: int32 or int64, one dimension of
// batch + 1 entries, starting at 0, non-decreasing, ending at total_q / total_k (a sequence may be
// empty). Differentiable in q, k and v; output (total_q, heads, head_dim).
at::Tensor flash_attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, bool causal = false,
                                  std::optional<double> scale = std::nullopt);

// The kernels without autograd. Dense layout when both cu_seqlens are absent: q, k, v as for
// flash_attention, out (batch, heads, q_len, head_dim) and lse (batch, heads, q_len); packed layout
// when both are given: as for flash_attention_varlen, out (total_q, heads, head_dim) and lse
// (heads, total_q). out has q's dtype and at::empty_like(q)'s strides; lse is float32 (the natural
// log-sum-exp of each query's scores; -inf for a query that sees no key).
std::tuple<at::Tensor, at::Tensor> flash_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                                           const std::optional<at::Tensor>& cu_seqlens_k, bool causal,
                                                           std::optional<double> scale);
// {dq, dk, dv} in the inputs' dtypes and empty_like strides, from dout and what the forward returned.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, bool causal, std::optional<double> scale);

}  // namespace scaletrain::attention
