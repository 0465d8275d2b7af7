// The fused residual-add + LayerNorm (include/scaletrain/model/fused_ops.h, add_layer_norm): the
// checks, the CPU kernel, the autograd function, and the CUDA launches (layer_norm.cu).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA
#include "scaletrain/model/fused_ops.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/tensor_dtype.h"
#include "layer_norm_cuda.h"
#endif

namespace scaletrain::model {
namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows of the CPU backward's fixed blocks: each block sums its rows' d weight and d bias, then the
// blocks' sums are added in order (the same result on any number of threads).
constexpr int64_t kCpuRowsPerBlock = 64;

bool kernel_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// (rows, cols) dense, and for CUDA 16-byte aligned (a view may start anywhere): what the kernels read.
at::Tensor dense_rows(const at::Tensor& t, int64_t cols) {
  auto rows = t.reshape({-1, cols}).contiguous();
  if (rows.is_cuda() && reinterpret_cast<uintptr_t>(rows.const_data_ptr()) % 16 != 0) rows = rows.clone();
  return rows;
}

struct NormStats {
  at::Tensor mean, rstd;  // (rows) fp32
};

// sum of f(c) for c < n in 16 independent fp32 lanes, added in fp64 at the end: vectorisable,
// no long chain of dependent adds, and no lane sums more than n / 16 terms.
template <typename F>
double lane_sum(int64_t n, F&& f) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += f(c + j);
  }
  double total = 0.0;
  for (; c < n; ++c) total += f(c);
  for (float a : acc) total += a;
  return total;
}

// CPU forward on fp32 rows: out (rows, cols) fp32, and the rows' mean and 1/std.
NormStats layer_norm_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps,
                         const at::Tensor& out) {
  const int64_t rows = input.size(0), cols = input.size(1);
  auto mean = at::empty({rows}, input.options()), rstd = at::empty({rows}, input.options());
  const float *x = input.const_data_ptr<float>(), *w = weight.const_data_ptr<float>();
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float *y = out.data_ptr<float>(), *m = mean.data_ptr<float>(), *r = rstd.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = x + row * cols;
      // A row's sums in fp64: long rows stay exact in fp32.
      const double total = lane_sum(cols, [&](int64_t c) { return xr[c]; });
      const auto mu = static_cast<float>(total / static_cast<double>(cols));
      const double squares = lane_sum(cols, [&](int64_t c) {
        const float d = xr[c] - mu;
        return d * d;
      });
      const auto rs = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(cols) + eps));
      float* yr = y + row * cols;
      if (b != nullptr) {
        for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - mu) * rs * w[c] + b[c];
      } else {
        for (int64_t c = 0; c < cols; ++c) yr[c] = (xr[c] - mu) * rs * w[c];
      }
      m[row] = mu;
      r[row] = rs;
    }
  });
  return {mean, rstd};
}

struct NormGrads {
  at::Tensor input, weight, bias;  // fp32
};

// CPU backward on fp32 rows: d input (plus grad_sum when defined), d weight and d bias.
NormGrads layer_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grad_sum, const at::Tensor& input,
                                  const NormStats& stats, const at::Tensor& weight) {
  const int64_t rows = input.size(0), cols = input.size(1);
  const int64_t blocks = (rows + kCpuRowsPerBlock - 1) / kCpuRowsPerBlock;
  auto dx = at::empty_like(input), partials = at::zeros({2, std::max<int64_t>(blocks, 1), cols}, input.options());
  const float *x = input.const_data_ptr<float>(), *dy = grad_out.const_data_ptr<float>();
  const float* ds = grad_sum.defined() ? grad_sum.const_data_ptr<float>() : nullptr;
  const float *m = stats.mean.const_data_ptr<float>(), *r = stats.rstd.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  float *out = dx.data_ptr<float>(), *part = partials.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> xhat(cols), g(cols);
    for (int64_t block = first; block < last; ++block) {
      float* __restrict__ dw = part + block * cols;
      float* __restrict__ db = part + (blocks + block) * cols;
      float* __restrict__ xh = xhat.data();
      float* __restrict__ gw = g.data();
      for (int64_t row = block * kCpuRowsPerBlock; row < std::min(rows, (block + 1) * kCpuRowsPerBlock); ++row) {
        const int64_t base = row * cols;
        const float mu = m[row], rs = r[row];
        const float* __restrict__ xr = x + base;
        const float* __restrict__ dyr = dy + base;
        for (int64_t c = 0; c < cols; ++c) {
          xh[c] = (xr[c] - mu) * rs;
          gw[c] = dyr[c] * w[c];
          dw[c] += dyr[c] * xh[c];
          db[c] += dyr[c];
        }
        const double sum_g = lane_sum(cols, [&](int64_t c) { return g[c]; });
        const double sum_gx = lane_sum(cols, [&](int64_t c) { return g[c] * xhat[c]; });
        const auto mean_g = static_cast<float>(sum_g / static_cast<double>(cols));
        const auto mean_gx = static_cast<float>(sum_gx / static_cast<double>(cols));
        if (ds != nullptr) {
          for (int64_t c = 0; c < cols; ++c) out[base + c] = (g[c] - mean_g - xhat[c] * mean_gx) * r[row] + ds[base + c];
        } else {
          for (int64_t c = 0; c < cols; ++c) out[base + c] = (g[c] - mean_g - xhat[c] * mean_gx) * r[row];
        }
      }
    }
  });
  auto sums = partials.sum(1);  // ATen's sum over the blocks: the same order on any thread count
  return {dx, sums[0], sums[1]};
}

struct NormTypes {
  at::ScalarType x, residual, out, param;
  bool has_residual, has_bias;
};

class AddLayerNormFunction : public torch::autograd::Function<AddLayerNormFunction> {
 public:
  // x, residual (undefined: none): (rows, cols) dense; weight, bias (undefined: none): (cols).
  // Returns {sum, out} with a residual, else {out}.
  // (Optional, not undefined, tensors: the autograd function records every tensor input's device.)
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& residual_in,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias_in, double eps,
                               at::ScalarType out_type) {
    const at::Tensor residual = residual_in.value_or(at::Tensor()), bias = bias_in.value_or(at::Tensor());
    const int64_t rows = x.size(0), cols = x.size(1);
    const NormTypes types{x.scalar_type(), residual.defined() ? residual.scalar_type() : x.scalar_type(), out_type,
                          weight.scalar_type(), residual.defined(), bias.defined()};
    at::Tensor sum, out, input;
    NormStats stats;
    if (x.is_cuda()) {
#ifdef SCALETRAIN_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x.device());
      out = at::empty({rows, cols}, x.options().dtype(out_type));
      if (types.has_residual) sum = at::empty_like(x);
      const auto f32 = x.options().dtype(at::kFloat);
      stats = {at::empty({rows}, f32), at::empty({rows}, f32)};
      const cuda::LayerNormForwardArgs args{x.const_data_ptr(), core::dtype_of(x),
                                            residual.defined() ? residual.const_data_ptr() : nullptr,
                                            core::dtype_of(residual), weight.const_data_ptr(),
                                            bias.defined() ? bias.const_data_ptr() : nullptr, core::dtype_of(weight),
                                            sum.defined() ? sum.data_ptr() : nullptr, out.data_ptr(),
                                            core::dtype_of(out), stats.mean.data_ptr<float>(),
                                            stats.rstd.data_ptr<float>()};
      const auto status = cuda::launch_layer_norm_forward(args, {rows, cols, static_cast<float>(eps)},
                                                          c10::cuda::getCurrentCUDAStream().stream());
      TORCH_CHECK(status == cudaSuccess, "add_layer_norm: CUDA launch failed: ", cudaGetErrorString(status));
#endif
      input = types.has_residual ? sum : x;
    } else {
      // The sum as ATen's add rounds it; the normalisation in fp32 on the rounded sum.
      if (types.has_residual) sum = x + residual;
      input = types.has_residual ? sum : x;
      auto out32 = at::empty({rows, cols}, x.options().dtype(at::kFloat));
      stats = layer_norm_cpu(input.to(at::kFloat).contiguous(), weight.to(at::kFloat).contiguous(),
                             bias.defined() ? bias.to(at::kFloat).contiguous() : bias, eps, out32);
      out = out32.to(out_type);
    }
    ctx->save_for_backward({input, weight, stats.mean, stats.rstd});
    ctx->saved_data["types"] = std::vector<int64_t>{static_cast<int64_t>(types.x), static_cast<int64_t>(types.residual),
                                                    static_cast<int64_t>(types.out), static_cast<int64_t>(types.param),
                                                    types.has_residual, types.has_bias};
    if (types.has_residual) return {sum, out};
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1];
    const NormStats stats{saved[2], saved[3]};
    const auto t = ctx->saved_data["types"].toIntVector();
    const NormTypes types{static_cast<at::ScalarType>(t[0]), static_cast<at::ScalarType>(t[1]),
                          static_cast<at::ScalarType>(t[2]), static_cast<at::ScalarType>(t[3]), t[4] != 0, t[5] != 0};
    const at::Tensor grad_sum = types.has_residual ? grads[0] : at::Tensor();
    const at::Tensor grad_out = grads[types.has_residual ? 1 : 0];
    const int64_t rows = input.size(0), cols = input.size(1);
    at::Tensor dx, dr, dw, db;
    if (!grad_out.defined()) {
      // Only the sum was used: its gradient passes to x and the residual.
      dx = grad_sum.to(types.x);
      dr = grad_sum.to(types.residual);
    } else if (input.is_cuda()) {
#ifdef SCALETRAIN_WITH_CUDA
      const c10::cuda::CUDAGuard guard(input.device());
      const auto dy = dense_rows(grad_out.to(types.out), cols);
      const auto ds = grad_sum.defined() ? dense_rows(grad_sum.to(types.x), cols) : grad_sum;
      dx = at::empty_like(input);
      if (types.has_residual && types.residual != types.x) dr = at::empty_like(input, input.options().dtype(types.residual));
      const auto param_options = weight.options();
      dw = at::empty({cols}, param_options);
      if (types.has_bias) db = at::empty({cols}, param_options);
      auto partials = at::empty({2, cuda::layer_norm_backward_blocks(rows, cols), cols},
                                input.options().dtype(at::kFloat));
      const cuda::LayerNormBackwardArgs args{dy.const_data_ptr(), core::dtype_of(dy),
                                             ds.defined() ? ds.const_data_ptr() : nullptr, input.const_data_ptr(),
                                             core::dtype_of(input), stats.mean.const_data_ptr<float>(),
                                             stats.rstd.const_data_ptr<float>(), weight.const_data_ptr(),
                                             core::dtype_of(weight), dx.data_ptr(),
                                             dr.defined() ? dr.data_ptr() : nullptr, core::dtype_of(dr),
                                             partials.data_ptr<float>(), dw.data_ptr(),
                                             db.defined() ? db.data_ptr() : nullptr};
      const auto status = cuda::launch_layer_norm_backward(args, {rows, cols, 0.f},
                                                           c10::cuda::getCurrentCUDAStream().stream());
      TORCH_CHECK(status == cudaSuccess, "add_layer_norm backward: CUDA launch failed: ", cudaGetErrorString(status));
#endif
      if (types.has_residual && !dr.defined()) dr = dx;  // the same type: one tensor serves both
    } else {
      const auto f32 = [](const at::Tensor& v) { return v.defined() ? v.to(at::kFloat).contiguous() : v; };
      const auto g = layer_norm_backward_cpu(f32(grad_out), f32(grad_sum), f32(input), stats, f32(weight));
      dx = g.input.to(types.x);
      if (types.has_residual) dr = g.input.to(types.residual);
      dw = g.weight.to(types.param);
      if (types.has_bias) db = g.bias.to(types.param);
    }
    return {dx, types.has_residual ? dr : at::Tensor(), dw, db, at::Tensor(), at::Tensor()};
  }
};

// Whether the kernels take these tensors; otherwise add_layer_norm runs the reference.
bool kernels_take(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
                  at::ScalarType out_type) {
  if (!kernel_type(x.scalar_type()) || !kernel_type(out_type) || !weight.defined() ||
      !kernel_type(weight.scalar_type()) || x.numel() == 0)
    return false;
  if (bias.defined() && bias.scalar_type() != weight.scalar_type()) return false;
  if (residual.defined() && (!kernel_type(residual.scalar_type()) ||
                             at::result_type(x, residual) != x.scalar_type() || residual.sizes() != x.sizes()))
    return false;
  if (!x.is_cuda()) return x.is_cpu();
#ifdef SCALETRAIN_WITH_CUDA
  const int64_t cols = x.size(-1);
  return cols % cuda::kLayerNormColStep == 0 && cols <= cuda::kLayerNormMaxCols;
#else
  return false;
#endif
}

}  // namespace

at::ScalarType linear_input_type(const at::Tensor& x) {
  const auto device_type = x.device().type();
  if (x.scalar_type() != at::kDouble && at::autocast::is_autocast_available(device_type) &&
      at::autocast::is_autocast_enabled(device_type))
    return at::autocast::get_autocast_dtype(device_type);
  return x.scalar_type();
}

AddNorm add_layer_norm_reference(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                 const at::Tensor& bias, double eps, std::optional<at::ScalarType> out_type) {
  auto sum = residual.defined() ? x + residual : x;
  auto normed = at::layer_norm(sum, {sum.size(-1)}, weight, bias, eps);
  if (out_type && normed.scalar_type() != *out_type) normed = normed.to(*out_type);
  return {sum, normed};
}

AddNorm add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                       const at::Tensor& bias, double eps, std::optional<at::ScalarType> out_type) {
  TORCH_CHECK(x.defined() && x.dim() >= 1, "add_layer_norm: x must have a feature dimension");
  const int64_t cols = x.size(-1);
  TORCH_CHECK(!residual.defined() || residual.sizes() == x.sizes(), "add_layer_norm: residual ", residual.sizes(),
              " does not match x ", x.sizes());
  TORCH_CHECK(weight.defined() && weight.dim() == 1 && weight.size(0) == cols, "add_layer_norm: weight must be (",
              cols, "), got ", weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == cols), "add_layer_norm: bias must be (", cols,
              "), got ", bias.sizes());
  for (const auto* t : {&residual, &weight, &bias}) {
    TORCH_CHECK(!t->defined() || t->device() == x.device(), "add_layer_norm: every tensor must be on x's device (",
                x.device(), "), got one on ", t->device());
  }
  TORCH_CHECK(eps > 0.0, "add_layer_norm: eps = ", eps, ", expected > 0");
  const at::ScalarType sum_type = residual.defined() ? at::result_type(x, residual) : x.scalar_type();
  const at::ScalarType out = out_type.value_or(sum_type);
  if (!kernels_take(x, residual, weight, bias, out)) return add_layer_norm_reference(x, residual, weight, bias, eps, out_type);
  const auto maybe = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  const auto outputs = AddLayerNormFunction::apply(dense_rows(x, cols),
                                                   maybe(residual.defined() ? dense_rows(residual, cols) : residual),
                                                   weight.contiguous(), maybe(bias.defined() ? bias.contiguous() : bias),
                                                   eps, out);
  const auto shaped = [&](const at::Tensor& t) { return x.dim() == 2 ? t : t.view(x.sizes()); };
  if (residual.defined()) return {shaped(outputs[0]), shaped(outputs[1])};
  return {x, shaped(outputs[0])};
}

}  // namespace scaletrain::model
