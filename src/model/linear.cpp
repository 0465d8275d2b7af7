// A linear layer whose backward sums the bias gradient with scaletrain's column-sum kernel, and
// the GPT MLP that keeps its GELU's input instead of its output for backward
// (include/scaletrain/model/fused_ops.h, linear and gelu_mlp; the kernels: linear.cu).
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

#ifdef SCALETRAIN_WITH_CUDA
// Whether the column kernels (linear.cu) take t: a dense CUDA (rows, cols) tensor of a kernel
// dtype, cols a multiple of 4, 16-byte aligned.
bool column_kernels_take(const at::Tensor& t) {
  return t.is_cuda() && t.dim() == 2 && t.is_contiguous() && core::dtype_of(t) != core::DType::none &&
         t.size(1) % 4 == 0 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Whether the kernels write column sums in `type`.
bool kernel_sum_type(at::ScalarType type) { return type == at::kFloat || type == at::kHalf || type == at::kBFloat16; }
#endif

// fp32 sums over the rows of d out (rows, cols), in `type`.
at::Tensor bias_gradient(const at::Tensor& grad, at::ScalarType type) {
#ifdef SCALETRAIN_WITH_CUDA
  if (column_kernels_take(grad) && kernel_sum_type(type)) {
    const int64_t cols = grad.size(1);
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
    // Only the gradients autograd asks for (a frozen weight costs no GEMM).
    const auto needs = [&](size_t i) { return ctx->needs_input_grad(i); };
    return {needs(0) ? at::mm(grad, weight) : at::Tensor(), needs(1) ? at::mm(grad.t(), x) : at::Tensor(),
            needs(2) ? bias_gradient(grad, bias_type) : at::Tensor()};
  }
};

at::Tensor gelu_forward(const at::Tensor& pre) {
#ifdef SCALETRAIN_WITH_CUDA
  if (column_kernels_take(pre)) {
    const c10::cuda::CUDAGuard guard(pre.device());
    auto act = at::empty_like(pre);
    const auto status = cuda::launch_gelu(pre.const_data_ptr(), act.data_ptr(), core::dtype_of(pre), pre.numel(),
                                          c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == cudaSuccess, "gelu_mlp: CUDA launch failed: ", cudaGetErrorString(status));
    return act;
  }
#endif
  return at::gelu(pre, "tanh");
}

struct GeluGradients {
  at::Tensor act, grad_pre, bias_grad;  // bias_grad: undefined without a bias
};

// gelu(pre) again, d pre from d act (overwritten on CUDA) and d pre's column sums in bias_type.
GeluGradients gelu_backward(const at::Tensor& pre, at::Tensor grad_act, std::optional<at::ScalarType> bias_type) {
#ifdef SCALETRAIN_WITH_CUDA
  if (column_kernels_take(pre) && column_kernels_take(grad_act) && grad_act.sizes() == pre.sizes() &&
      grad_act.scalar_type() == pre.scalar_type() && (!bias_type || kernel_sum_type(*bias_type))) {
    const c10::cuda::CUDAGuard guard(pre.device());
    const int64_t rows = pre.size(0), cols = pre.size(1);
    GeluGradients out{at::empty_like(pre), grad_act, {}};
    if (bias_type) out.bias_grad = at::empty({cols}, pre.options().dtype(*bias_type));
    auto partials = at::empty({cuda::column_sum_slabs(rows, cols), cols}, pre.options().dtype(at::kFloat));
    const auto status = cuda::launch_gelu_backward(
        pre.const_data_ptr(), grad_act.data_ptr(), out.act.data_ptr(), core::dtype_of(pre), rows, cols,
        partials.data_ptr<float>(), bias_type ? out.bias_grad.data_ptr() : nullptr,
        bias_type ? core::dtype_of(out.bias_grad) : core::DType::f32, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == cudaSuccess, "gelu_mlp backward: CUDA launch failed: ", cudaGetErrorString(status));
    return out;
  }
#endif
  GeluGradients out{at::gelu(pre, "tanh"), at::gelu_backward(grad_act, pre, "tanh"), {}};
  if (bias_type) out.bias_grad = bias_gradient(out.grad_pre, *bias_type);
  return out;
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

std::optional<at::Tensor> bias_in(const at::Tensor& bias, at::ScalarType type) {
  if (!bias.defined()) return std::nullopt;
  return bias.to(type);
}

// The bias's dtype, -1 without one (saved_data holds no optional).
int64_t bias_type_code(const at::Tensor& bias) { return bias.defined() ? static_cast<int64_t>(bias.scalar_type()) : -1; }
std::optional<at::ScalarType> bias_type_of(int64_t code) {
  if (code < 0) return std::nullopt;
  return static_cast<at::ScalarType>(code);
}

// fn(x2d, cast) with autocast excluded, where x2d is x as (rows, features) and cast(t) gives t in
// the type autocast would give a linear layer of x (differentiable: gradients return in t's
// dtype); fn's (rows, out_features) result takes x's leading dimensions.
template <typename Fn>
at::Tensor below_autocast(const at::Tensor& x, int64_t out_features, const Fn& fn) {
  const auto type = linear_input_type(x);
  const auto cast = [type](const at::Tensor& t) { return t.scalar_type() == type ? t : t.to(type); };
  const auto x2d = cast(x).reshape({-1, x.size(-1)});
  at::Tensor y;
  {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    y = fn(x2d, cast);
  }
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return y.view(shape);
}

class GeluMlpFunction : public torch::autograd::Function<GeluMlpFunction> {
 public:
  // x (rows, in), the weights in the compute type; biases in their own types or undefined. Saves x
  // and fc's output pre, not gelu(pre): backward recomputes it (one write more in a pass that
  // runs anyway) and the MLP holds a (rows, hidden) tensor less from forward to backward.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fc_weight,
                            const std::optional<at::Tensor>& fc_bias_in, const at::Tensor& proj_weight,
                            const std::optional<at::Tensor>& proj_bias_in) {
    const auto type = x.scalar_type();
    const auto fc_bias = fc_bias_in.value_or(at::Tensor()), proj_bias = proj_bias_in.value_or(at::Tensor());
    const auto pre = at::linear(x, fc_weight, bias_in(fc_bias, type));
    const auto out = at::linear(gelu_forward(pre), proj_weight, bias_in(proj_bias, type));
    ctx->save_for_backward({x, fc_weight, proj_weight, pre});
    ctx->saved_data["fc_bias_type"] = bias_type_code(fc_bias);
    ctx->saved_data["proj_bias_type"] = bias_type_code(proj_bias);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The GELU's gradient is written in place by a kernel: nothing of it would be recorded.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "gelu_mlp: its backward is differentiable once only (create_graph=True needs "
                "model.fused_ops: false, or gelu_mlp_reference)");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &fc_weight = saved[1], &proj_weight = saved[2], &pre = saved[3];
    const auto grad = grads[0].contiguous();
    // Only the gradients autograd asks for: with fc frozen (and x not needing one) there is no
    // GELU backward, only gelu(pre) for proj's weight gradient; a frozen weight costs no GEMM.
    const int64_t fc_bias_code = ctx->saved_data["fc_bias_type"].toInt();
    const auto proj_bias_type = bias_type_of(ctx->saved_data["proj_bias_type"].toInt());
    const auto needs = [&](size_t i) {  // i: the input; needs_input_grad counts the defined ones only
      if ((i == 2 && fc_bias_code < 0) || (i == 4 && !proj_bias_type)) return false;
      return ctx->needs_input_grad(i > 2 && fc_bias_code < 0 ? i - 1 : i);
    };
    at::Tensor x_grad, fc_weight_grad, fc_bias_grad, proj_weight_grad, proj_bias_grad;
    if (needs(0) || needs(1) || needs(2)) {
      const auto fc_bias_type = needs(2) ? bias_type_of(fc_bias_code) : std::nullopt;
      auto gelu = gelu_backward(pre, at::mm(grad, proj_weight), fc_bias_type);
      if (needs(3)) proj_weight_grad = at::mm(grad.t(), gelu.act);
      gelu.act.reset();
      if (needs(0)) x_grad = at::mm(gelu.grad_pre, fc_weight);
      if (needs(1)) fc_weight_grad = at::mm(gelu.grad_pre.t(), x);
      fc_bias_grad = gelu.bias_grad;
    } else if (needs(3)) {
      proj_weight_grad = at::mm(grad.t(), gelu_forward(pre));
    }
    if (needs(4)) proj_bias_grad = bias_gradient(grad, *proj_bias_type);
    return {x_grad, fc_weight_grad, fc_bias_grad, proj_weight_grad, proj_bias_grad};
  }
};

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!bias.defined() || x.dim() < 1 || x.scalar_type() == at::kDouble || weight.dim() != 2 ||
      x.size(-1) != weight.size(1) || bias.dim() != 1 || bias.size(0) != weight.size(0))
    return at::linear(x, weight, defined_or_none(bias));
  return below_autocast(x, weight.size(0), [&](const at::Tensor& x2d, const auto& cast) {
    return LinearFunction::apply(x2d, cast(weight), bias);
  });
}

at::Tensor gelu_mlp_reference(const at::Tensor& x, const at::Tensor& fc_weight, const at::Tensor& fc_bias,
                              const at::Tensor& proj_weight, const at::Tensor& proj_bias) {
  return at::linear(at::gelu(at::linear(x, fc_weight, defined_or_none(fc_bias)), "tanh"), proj_weight,
                    defined_or_none(proj_bias));
}

at::Tensor gelu_mlp(const at::Tensor& x, const at::Tensor& fc_weight, const at::Tensor& fc_bias,
                    const at::Tensor& proj_weight, const at::Tensor& proj_bias) {
  const auto bias_fits = [](const at::Tensor& b, const at::Tensor& w) {
    return !b.defined() || (b.dim() == 1 && b.size(0) == w.size(0));
  };
  // Shapes ATen would refuse, and fp64, go to the reference (which names the mismatch).
  if (x.dim() < 1 || x.scalar_type() == at::kDouble || fc_weight.dim() != 2 || proj_weight.dim() != 2 ||
      x.size(-1) != fc_weight.size(1) || proj_weight.size(1) != fc_weight.size(0) || !bias_fits(fc_bias, fc_weight) ||
      !bias_fits(proj_bias, proj_weight))
    return gelu_mlp_reference(x, fc_weight, fc_bias, proj_weight, proj_bias);
  return below_autocast(x, proj_weight.size(0), [&](const at::Tensor& x2d, const auto& cast) {
    return GeluMlpFunction::apply(x2d, cast(fc_weight), defined_or_none(fc_bias), cast(proj_weight),
                                  defined_or_none(proj_bias));
  });
}

}  // namespace scaletrain::model
