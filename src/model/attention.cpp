#include "scaletrain/model/attention.h"

#include <cmath>

#include <ATen/ATen.h>

#include "scaletrain/attention/flash_attention.h"

namespace scaletrain::model {
namespace {

// True where query i (of q_len, continuing after k_len - q_len cached keys) may see key j.
at::Tensor causal_mask(int64_t q_len, int64_t k_len, const at::Device& device) {
  auto rows = at::arange(q_len, at::TensorOptions().dtype(at::kLong).device(device)).unsqueeze(1);
  auto cols = at::arange(k_len, at::TensorOptions().dtype(at::kLong).device(device)).unsqueeze(0);
  return cols <= rows + (k_len - q_len);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention: q, k, v must be (batch, heads, seq, head_dim), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "attention: q ", q.sizes(), " and k ", k.sizes(), " disagree");
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype(), "attention: q, k, v dtypes differ");
}

}  // namespace

at::Tensor math_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          bool causal, const at::Tensor& mask, double dropout_p) {
  check_inputs(q, k, v);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = at::matmul(q.to(at::kFloat), k.to(at::kFloat).transpose(-2, -1)) * scale;
  at::Tensor allowed = mask.defined() ? mask
                       : causal       ? causal_mask(q.size(2), k.size(2), q.device())
                                      : at::Tensor();
  if (allowed.defined()) scores = scores.masked_fill(allowed.logical_not(), -INFINITY);
  auto probs = at::softmax(scores, -1);
  if (dropout_p > 0) probs = at::dropout(probs, dropout_p, /*train=*/true);
  return at::matmul(probs, v.to(at::kFloat)).to(q.scalar_type());
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     AttentionBackend backend, bool causal, const at::Tensor& mask,
                     double dropout_p) {
  switch (backend) {
    case AttentionBackend::math:
      return math_attention(q, k, v, causal, mask, dropout_p);
    case AttentionBackend::sdpa: {
      check_inputs(q, k, v);
      const int64_t q_len = q.size(2), k_len = k.size(2);
      if (mask.defined())
        return at::scaled_dot_product_attention(q, k, v, mask, dropout_p, /*is_causal=*/false);
      if (!causal || q_len == 1)  // one query continuing a prefix sees every key
        return at::scaled_dot_product_attention(q, k, v, {}, dropout_p, false);
      if (q_len == k_len) return at::scaled_dot_product_attention(q, k, v, {}, dropout_p, true);
      return at::scaled_dot_product_attention(q, k, v, causal_mask(q_len, k_len, q.device()),
                                              dropout_p, false);
    }
    case AttentionBackend::flash: {
      check_inputs(q, k, v);
      TORCH_CHECK(dropout_p == 0, "attention: flash applies no dropout, got dropout_p ", dropout_p);
      if (mask.defined()) return math_attention(q, k, v, causal, mask, dropout_p);  // padded batches
      // The CUDA kernels take 16-bit tensors: fp32 on a GPU (evaluation outside autocast) goes
      // through torch's SDPA.
      if (q.is_cuda() && q.scalar_type() == at::kFloat)
        return attention(q, k, v, AttentionBackend::sdpa, causal, mask, dropout_p);
      // Its causal alignment is this seam's: a query block continuing a cached prefix.
      return scaletrain::attention::flash_attention(q, k, v, causal);
    }
  }
  TORCH_CHECK(false, "attention: unknown backend");
}

}  // namespace scaletrain::model
