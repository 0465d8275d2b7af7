// The fused gradient pass as dispatcher operators, so that Python scripts and torch.compile call
// and trace it:
//   torch.ops.scaletrain.unscale_check_clip_(grads, inv_scale, max_norm) -> (values, factor)
//       multiplies every gradient by inv_scale x clip coefficient in place;
//   torch.ops.scaletrain.gradient_factor(grads, inv_scale, max_norm) -> (values, factor)
//       the same checks and factor without writing (inv_scale a one-element float32 tensor).
// values = {found_inf (0 or 1), norm of the unscaled gradients}; factor = the one-element
// multiplier. One implementation for every backend, and Meta kernels for fake tensors.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "scaletrain/amp/grad_check.h"

namespace scaletrain::amp {
namespace {

void check_grads(const std::vector<at::Tensor>& grads, const char* op) {
  TORCH_CHECK_VALUE(!grads.empty(), "scaletrain::", op, ": grads is empty (expected at least one gradient)");
}

std::tuple<at::Tensor, at::Tensor> unscale_check_clip_op(at::TensorList grads, double inv_scale, double max_norm) {
  std::vector<at::Tensor> list(grads.begin(), grads.end());
  check_grads(list, "unscale_check_clip_");
  try {
    auto result = unscale_check_clip_(list, inv_scale, max_norm);
    return {result.values, result.factor.clone()};  // an operator's outputs must not alias (one buffer holds both)
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

std::tuple<at::Tensor, at::Tensor> gradient_factor_op(at::TensorList grads, const at::Tensor& inv_scale,
                                                      double max_norm) {
  std::vector<at::Tensor> list(grads.begin(), grads.end());
  check_grads(list, "gradient_factor");
  try {
    auto result = gradient_factor(list, inv_scale, max_norm);
    return {result.values, result.factor.clone()};
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

std::tuple<at::Tensor, at::Tensor> result_meta(at::TensorList grads) {
  const auto options = grads.front().options().dtype(at::kFloat);
  return {at::empty({2}, options), at::empty({1}, options)};
}

std::tuple<at::Tensor, at::Tensor> unscale_check_clip_meta(at::TensorList grads, double, double) {
  return result_meta(grads);
}

std::tuple<at::Tensor, at::Tensor> gradient_factor_meta(at::TensorList grads, const at::Tensor&, double) {
  return result_meta(grads);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(scaletrain, m) {
  m.def("unscale_check_clip_(Tensor(a!)[] grads, float inv_scale, float max_norm=0.) -> (Tensor, Tensor)");
  m.def("gradient_factor(Tensor[] grads, Tensor inv_scale, float max_norm=0.) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scaletrain, CompositeExplicitAutograd, m) {
  m.impl("unscale_check_clip_", &unscale_check_clip_op);
  m.impl("gradient_factor", &gradient_factor_op);
}

TORCH_LIBRARY_IMPL(scaletrain, Meta, m) {
  m.impl("unscale_check_clip_", &unscale_check_clip_meta);
  m.impl("gradient_factor", &gradient_factor_meta);
}

}  // namespace scaletrain::amp
