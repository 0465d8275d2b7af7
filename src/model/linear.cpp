// A linear layer whose backward sums the bias gradient with scaletrain's column-sum kernel
// (include/scaletrain/model/fused_ops.h, linear; the kernel: linear.cu).
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA
#include "scaletrain/model/fused_ops.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/tensor_dtype.h"
#include "linear_cuda.h"
#endif

namespace scaletrain::model {
namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fp32 sums over the rows of d out (rows, cols), in `type`.
at::Tensor bias_gradient(const at::Tensor& grad, at::ScalarType type) {
#ifdef SCALETRAIN_WITH_CUDA
  const int64_t cols = grad.size(1);
  const bool kernel_out = type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
  if (grad.is_cuda() && core::dtype_of(grad) != core::DType::none && kernel_out && cols % 4 == 0 &&
      reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0) {
    const c10::cuda::CUDAGuard guard(grad.device());
    auto out = at::empty({cols}, grad.options().dtype(type));
    auto partials = at::empty({cuda::column_sum_slabs(grad.size(0), cols), cols}, grad.options().dtype(at::kFloat));
    const auto status = cuda::launch_column_sums(grad.const_data_ptr(), core::dtype_of(grad), grad.size(0), cols,
                                                 partials.data_ptr<float>(), out.data_ptr(), core::dtype_of(out),
                                                 c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == cudaSuccess, "linear backward: CUDA launch failed: ", cudaGetErrorString(status));
    return out;
  }
#endif
  return grad.sum(0, /*keepdim=*/false, at::promote_types(grad.scalar_type(), at::kFloat)).to(type);
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  // x (rows, in), weight (out, in) in the compute type; bias (out) in its own type: its gradient
  // is summed in fp32 and returned in that type (no rounding to the compute type in between).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias_type"] = static_cast<int64_t>(bias.scalar_type());
    return at::linear(x, weight, bias.to(x.scalar_type()));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const auto grad = grads[0].contiguous();
    const auto bias_type = static_cast<at::ScalarType>(ctx->saved_data["bias_type"].toInt());
    return {at::mm(grad, weight), at::mm(grad.t(), x), bias_gradient(grad, bias_type)};
  }
};

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!bias.defined() || x.dim() < 1 || x.scalar_type() == at::kDouble || weight.dim() != 2 ||
      x.size(-1) != weight.size(1) || bias.dim() != 1 || bias.size(0) != weight.size(0))
    return at::linear(x, weight, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
  // The casts autocast would make for linear (differentiable: the gradients return in the
  // parameters' dtype), then the op below autocast.
  const auto type = linear_input_type(x);
  const auto cast = [type](const at::Tensor& t) { return t.scalar_type() == type ? t : t.to(type); };
  const auto xc = cast(x), wc = cast(weight);
  at::Tensor y;
  {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    y = LinearFunction::apply(xc.reshape({-1, x.size(-1)}), wc, bias);
  }
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return y.view(shape);
}

}  // namespace scaletrain::model
