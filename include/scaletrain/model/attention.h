#pragma once
// The attention seam: every attention call of the model goes through `attention()`, which
// dispatches to the backend chosen in GPTOptions.
#include <ATen/core/Tensor.h>

#include "scaletrain/model/gpt_options.h"

namespace scaletrain::model {

// Attention on (batch, heads, seq, head_dim) tensors, the scaled_dot_product_attention layout.
//   mask: optional boolean (batch or 1, 1, q_len, k_len), true where a query may attend.
//   causal: when no mask is given, query i attends to keys j <= i + (k_len - q_len), so a query
//     block that continues a cached prefix stays causal.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     AttentionBackend backend, bool causal, const at::Tensor& mask = {},
                     double dropout_p = 0.0);

// Reference implementation: softmax(q k^T * scale + mask) v with the softmax in fp32.
at::Tensor math_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          bool causal, const at::Tensor& mask = {}, double dropout_p = 0.0);

}  // namespace scaletrain::model
