// The fused cross-entropy as dispatcher operators, so that Python and torch.compile can call and
// trace it (the formula: include/scaletrain/model/fused_ops.h, cross_entropy_rows and
// linear_cross_entropy_sum):
//   torch.ops.scaletrain.cross_entropy_forward(logits, targets, classes, ignore_index=-100)
//       -> (loss_rows, lse)
//   torch.ops.scaletrain.cross_entropy_backward(grad_rows, logits, targets, lse, classes,
//       ignore_index=-100) -> grad_logits
//   torch.ops.scaletrain.linear_cross_entropy_sum(hidden, weight, targets, classes, ignore_index,
//       chunk_rows, compute_dtype=None, with_grad=True) -> (loss_sum, grad_hidden, grad_weight)
// Meta kernels give the shapes without reading anything; the autograd formula is registered from
// Python (python/scaletrain/nn.py). C++ callers use model::cross_entropy and linear_cross_entropy.
#include <torch/library.h>

#include <ATen/ATen.h>

#include "scaletrain/model/fused_ops.h"

namespace scaletrain::model {
namespace {

at::ScalarType loss_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& logits, const at::Tensor&, int64_t, int64_t) {
  const auto options = logits.options().dtype(loss_type(logits));
  return {at::empty_symint({logits.sym_size(0)}, options), at::empty_symint({logits.sym_size(0)}, options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_meta(const at::Tensor& hidden, const at::Tensor& weight,
                                                               const at::Tensor&, int64_t, int64_t, int64_t,
                                                               std::optional<at::ScalarType> compute_dtype,
                                                               bool with_grad) {
  const bool wide = compute_dtype.value_or(hidden.scalar_type()) == at::kDouble;
  const auto options = hidden.options().dtype(wide ? at::kDouble : at::kFloat);
  if (!with_grad) return {at::empty({}, options), at::empty({0}, options), at::empty({0}, options)};
  return {at::empty({}, options), at::empty_symint(hidden.sym_sizes(), options),
          at::empty_symint(weight.sym_sizes(), options)};
}

at::Tensor backward_meta(const at::Tensor&, const at::Tensor& logits, const at::Tensor&, const at::Tensor&, int64_t,
                         int64_t) {
  return at::empty_symint({logits.sym_size(0), logits.sym_size(1)}, logits.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scaletrain, m) {
  m.def("cross_entropy_forward(Tensor logits, Tensor targets, int classes, int ignore_index=-100) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_rows, Tensor logits, Tensor targets, Tensor lse, int classes, "
        "int ignore_index=-100) -> Tensor");
  m.def("linear_cross_entropy_sum(Tensor hidden, Tensor weight, Tensor targets, int classes, int ignore_index, "
        "int chunk_rows, ScalarType? compute_dtype=None, bool with_grad=True) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scaletrain, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_forward", &cross_entropy_rows);
  m.impl("cross_entropy_backward", &cross_entropy_rows_backward);
  m.impl("linear_cross_entropy_sum", &linear_cross_entropy_sum);
}

TORCH_LIBRARY_IMPL(scaletrain, Meta, m) {
  m.impl("cross_entropy_forward", &forward_meta);
  m.impl("cross_entropy_backward", &backward_meta);
  m.impl("linear_cross_entropy_sum", &linear_sum_meta);
}

}  // namespace scaletrain::model
