// The flash-attention kernels as dispatcher operators, so that Python and torch.compile can call
// and trace them:
//   torch.ops.scaletrain.flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
//       -> (out, lse)      (cu_seqlens None: the dense layout)
//   torch.ops.scaletrain.flash_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q,
//       cu_seqlens_k, causal, scale) -> (dq, dk, dv)
// One implementation for every backend (it names the device it cannot run on), and Meta kernels
// that give the shapes without reading anything (fake tensors, torch.compile). The autograd
// formula is registered from Python (python/scaletrain/attention.py); C++ callers use
// attention::flash_attention, which has its own autograd function.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "scaletrain/attention/flash_attention.h"

namespace scaletrain::attention {
namespace {

// std::invalid_argument -> c10::ValueError, which Python raises as ValueError.
template <typename F>
auto as_value_error(F&& f) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

using Offsets = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const Offsets& cu_q, const Offsets& cu_k, bool causal,
                                              std::optional<double> scale) {
  return as_value_error([&] { return flash_attention_forward(q, k, v, cu_q, cu_k, causal, scale); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& out, const at::Tensor& lse,
                                                           const Offsets& cu_q, const Offsets& cu_k, bool causal,
                                                           std::optional<double> scale) {
  return as_value_error(
      [&] { return flash_attention_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale); });
}

// Shapes and strides as the kernels give them: out and the gradients at::empty_like their inputs,
// lse (batch, heads, q_len) dense or (heads, total_q) packed.
std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&,
                                                const Offsets& cu_q, const Offsets&, bool, std::optional<double>) {
  const auto lse_options = q.options().dtype(at::kFloat);
  at::Tensor lse = cu_q.has_value() ? at::empty_symint({q.sym_size(1), q.sym_size(0)}, lse_options)
                                    : at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)}, lse_options);
  return {at::empty_like(q), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(const at::Tensor&, const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor&, const at::Tensor&,
                                                             const Offsets&, const Offsets&, bool,
                                                             std::optional<double>) {
  return {at::empty_like(q), at::empty_like(k), at::empty_like(v)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scaletrain, m) {
  m.def("flash_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
        "bool causal=False, float? scale=None) -> (Tensor, Tensor)");
  m.def("flash_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, bool causal=False, float? scale=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scaletrain, CompositeExplicitAutograd, m) {
  m.impl("flash_attention_forward", &forward_op);
  m.impl("flash_attention_backward", &backward_op);
}

TORCH_LIBRARY_IMPL(scaletrain, Meta, m) {
  m.impl("flash_attention_forward", &forward_meta);
  m.impl("flash_attention_backward", &backward_meta);
}

}  // namespace scaletrain::attention
