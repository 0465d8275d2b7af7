#include "scaletrain/model/fused_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/tensor_dtype.h"
#include "fused_ops_cuda.h"
#endif

// This file is compiled with -ffp-contract=off (src/CMakeLists.txt): the CPU kernels round each
// product and sum as the unfused ATen expressions do.
namespace scaletrain::model {
namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

#ifdef SCALETRAIN_WITH_CUDA
void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(status));
}

cuda::DType kernel_dtype(const at::Tensor& t, const char* what) {
  const auto type = core::dtype_of(t);
  TORCH_CHECK(type != cuda::DType::none, what, ": CUDA tensors must be float32, float16 or bfloat16, got ",
              t.scalar_type());
  return type;
}
#endif

// Calls f(T{}) for the element types the kernels take (fp32, fp16, bf16).
template <typename F>
void dispatch_kernel_types(at::ScalarType type, const char* what, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, what, ": kernels take float32, float16 or bfloat16, got ", type);
  }
}

// ---- RoPE ----

struct RopeDims {
  int64_t batch, seq, heads, half, table_batch_stride;
  int64_t dim() const { return 2 * half; }
  int64_t width() const { return heads * dim(); }
};

RopeDims rope_dims(const at::Tensor& qkv, const at::Tensor& cos, int64_t heads) {
  const int64_t width = qkv.size(2) / 3, half = width / heads / 2;
  return {qkv.size(0), qkv.size(1), heads, half, cos.size(0) == 1 ? 0 : qkv.size(1) * half};
}

// x1 cos - x2 sin and x2 cos + x1 sin, each product and sum rounded to fp32 (forward), or the
// transposed rotation g1 cos + g2 sin and g2 cos - g1 sin (backward).
template <typename T>
void rotate_pairs(const T* a, int64_t a_step, const T* b_half, T* out, T* out_half, const float* c, const float* s,
                  int64_t half, bool backward) {
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = static_cast<float>(a[j * a_step]), x2 = static_cast<float>(b_half[j * a_step]);
    if (!backward) {
      out[j] = static_cast<T>(x1 * c[j] - x2 * s[j]);
      out_half[j] = static_cast<T>(x2 * c[j] + x1 * s[j]);
    } else {
      out[j] = static_cast<T>(x1 * c[j] + x2 * s[j]);
      out_half[j] = static_cast<T>(x2 * c[j] - x1 * s[j]);
    }
  }
}

template <typename T>
void rope_forward_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const RopeDims& d,
                      const std::array<at::Tensor, 3>& out) {
  const T* in = qkv.const_data_ptr<T>();
  const float *c = cos.const_data_ptr<float>(), *s = sin.const_data_ptr<float>();
  T* outs[3] = {out[0].data_ptr<T>(), out[1].data_ptr<T>(), out[2].data_ptr<T>()};
  const int64_t width = d.width(), dim = d.dim();
  at::parallel_for(0, d.batch * d.seq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t table = (row / d.seq) * d.table_batch_stride + (row % d.seq) * d.half;
      const T* x = in + row * 3 * width;
      for (int64_t h = 0; h < d.heads; ++h) {
        for (int part = 0; part < 2; ++part) {
          const T* xh = x + part * width + h * dim;
          T* y = outs[part] + row * width + h * dim;
          rotate_pairs(xh, 1, xh + d.half, y, y + d.half, c + table, s + table, d.half, false);
        }
      }
      std::copy(x + 2 * width, x + 3 * width, outs[2] + row * width);
    }
  });
}

// grads[i]: (batch, seq, heads, head_dim), any strides.
template <typename T>
void rope_backward_cpu(const std::array<at::Tensor, 3>& grads, const at::Tensor& cos, const at::Tensor& sin,
                       const RopeDims& d, const at::Tensor& dqkv) {
  const float *c = cos.const_data_ptr<float>(), *s = sin.const_data_ptr<float>();
  T* out = dqkv.data_ptr<T>();
  const int64_t width = d.width(), dim = d.dim();
  at::parallel_for(0, d.batch * d.seq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / d.seq, t = row % d.seq;
      const int64_t table = b * d.table_batch_stride + t * d.half;
      for (int64_t h = 0; h < d.heads; ++h) {
        for (int part = 0; part < 3; ++part) {
          const auto& g = grads[part];
          const T* gh = g.const_data_ptr<T>() + b * g.stride(0) + t * g.stride(1) + h * g.stride(2);
          const int64_t step = g.stride(3);
          T* y = out + row * 3 * width + part * width + h * dim;
          if (part < 2) {
            rotate_pairs(gh, step, gh + d.half * step, y, y + d.half, c + table, s + table, d.half, true);
          } else {
            for (int64_t j = 0; j < dim; ++j) y[j] = gh[j * step];
          }
        }
      }
    }
  });
}

class RopeQKVFunction : public torch::autograd::Function<RopeQKVFunction> {
 public:
  // cos, sin: (1 or batch, seq, half) fp32, dense. Returns q, k, v as (batch, seq, heads, head_dim).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, const at::Tensor& cos,
                               const at::Tensor& sin, int64_t heads) {
    const RopeDims d = rope_dims(qkv, cos, heads);
    const auto options = qkv.options();
    std::array<at::Tensor, 3> out;
    for (auto& t : out) t = at::empty({d.batch, d.seq, heads, d.dim()}, options);
    if (qkv.is_cuda()) {
#ifdef SCALETRAIN_WITH_CUDA
      const c10::cuda::CUDAGuard guard(qkv.device());
      const cuda::RopeShape shape{d.batch, d.seq, d.heads, d.half, d.table_batch_stride};
      check_launch(cuda::launch_rope_forward(kernel_dtype(qkv, "rope_qkv"), qkv.const_data_ptr(),
                                             cos.const_data_ptr<float>(), sin.const_data_ptr<float>(),
                                             out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(), shape,
                                             c10::cuda::getCurrentCUDAStream().stream()),
                   "rope_qkv");
#endif
    } else {
      dispatch_kernel_types(qkv.scalar_type(), "rope_qkv",
                            [&](auto tag) { rope_forward_cpu<decltype(tag)>(qkv, cos, sin, d, out); });
    }
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["seq"] = d.seq;
    return {out[0], out[1], out[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &cos = saved[0], &sin = saved[1];
    const int64_t heads = ctx->saved_data["heads"].toInt();
    at::Tensor like;  // a defined gradient gives the shape and options
    for (const auto& g : grads) {
      if (g.defined()) like = g;
    }
    std::array<at::Tensor, 3> g3;
    for (size_t i = 0; i < 3; ++i) {
      g3[i] = grads[i].defined() ? grads[i] : at::zeros_like(like);
      if (g3[i].scalar_type() != like.scalar_type()) g3[i] = g3[i].to(like.scalar_type());
    }
    const int64_t batch = like.size(0), seq = like.size(1), width = like.size(2) * like.size(3);
    auto dqkv = at::empty({batch, seq, 3 * width}, like.options());
    const RopeDims d = rope_dims(dqkv, cos, heads);
    if (like.is_cuda()) {
#ifdef SCALETRAIN_WITH_CUDA
      for (auto& g : g3) {
        if (g.stride(3) != 1) g = g.contiguous();
      }
      const auto strides = [](const at::Tensor& g) { return cuda::HeadStrides{g.stride(0), g.stride(2), g.stride(1)}; };
      const c10::cuda::CUDAGuard guard(like.device());
      const cuda::RopeShape shape{d.batch, d.seq, d.heads, d.half, d.table_batch_stride};
      check_launch(cuda::launch_rope_backward(kernel_dtype(like, "rope_qkv backward"), g3[0].const_data_ptr(),
                                              g3[1].const_data_ptr(), g3[2].const_data_ptr(), strides(g3[0]),
                                              strides(g3[1]), strides(g3[2]), cos.const_data_ptr<float>(),
                                              sin.const_data_ptr<float>(), dqkv.data_ptr(), shape,
                                              c10::cuda::getCurrentCUDAStream().stream()),
                   "rope_qkv backward");
#endif
    } else {
      dispatch_kernel_types(like.scalar_type(), "rope_qkv backward",
                            [&](auto tag) { rope_backward_cpu<decltype(tag)>(g3, cos, sin, d, dqkv); });
    }
    return {dqkv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// (seq, half) or (batch, seq, half) -> (1 or batch, seq, half) in `dtype`, dense.
at::Tensor rope_table(const at::Tensor& table, const char* name, const at::Tensor& qkv, int64_t half,
                      at::ScalarType dtype) {
  TORCH_CHECK(table.defined() && (table.dim() == 2 || table.dim() == 3), "rope_qkv: ", name,
              " must be (seq, head_dim / 2) or (batch, seq, head_dim / 2), got ",
              table.defined() ? table.sizes() : at::IntArrayRef{});
  const auto t3 = table.dim() == 2 ? table.unsqueeze(0) : table;
  TORCH_CHECK((t3.size(0) == 1 || t3.size(0) == qkv.size(0)) && t3.size(1) == qkv.size(1) && t3.size(2) == half,
              "rope_qkv: ", name, " ", table.sizes(), " does not fit qkv ", qkv.sizes(), " (batch ", qkv.size(0),
              ", seq ", qkv.size(1), ", head_dim / 2 = ", half, ")");
  TORCH_CHECK(table.device() == qkv.device(), "rope_qkv: ", name, " is on ", table.device(), ", qkv on ",
              qkv.device());
  return t3.to(dtype).contiguous();
}

// ---- cross-entropy ----

// The running (max, sum of exp(x - max)) pair of the online softmax, as the CUDA kernel keeps it.
struct OnlineSum {
  float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
  void add(float x) {
    if (x > m) {
      sum = sum * std::exp(m - x) + 1.f;
      m = x;
    } else {
      sum += x == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(x - m);
    }
  }
};

struct CrossEntropyDims {
  int64_t rows, columns, row_stride, classes, ignore_index;
};

template <typename T>
void cross_entropy_forward_cpu(const at::Tensor& logits, const int64_t* targets, const CrossEntropyDims& d,
                               float* loss, float* lse) {
  const T* base = logits.const_data_ptr<T>();
  at::parallel_for(0, d.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * d.row_stride;
      OnlineSum acc;
      for (int64_t c = 0; c < d.classes; ++c) acc.add(static_cast<float>(row[c]));
      // NaN for a +inf maximum, as ATen's log_softmax (inf - inf).
      lse[r] = acc.m == std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::quiet_NaN()
                                                                : acc.m + std::log(acc.sum);
      const int64_t t = targets[r];
      loss[r] = t == d.ignore_index ? 0.f : lse[r] - static_cast<float>(row[t]);
    }
  });
}

template <typename T>
void cross_entropy_backward_cpu(const at::Tensor& logits, const int64_t* targets, const float* lse, const float* scales,
                                int64_t scale_stride, const CrossEntropyDims& d, T* grad) {
  const T* base = logits.const_data_ptr<T>();
  at::parallel_for(0, d.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * d.row_stride;
      T* out = grad + r * d.columns;
      const int64_t t = targets[r];
      const bool counts = t != d.ignore_index;
      const float scale = scales[r * scale_stride];
      for (int64_t c = 0; c < d.columns; ++c) {
        const float p = counts && c < d.classes ? std::exp(static_cast<float>(row[c]) - lse[r]) : 0.f;
        out[c] = static_cast<T>(counts && c < d.classes ? (p - (c == t ? 1.f : 0.f)) * scale : 0.f);
      }
    }
  });
}

// The rows' losses and log-sum-exp (the kernels; fp64 logits: ATen's ops in fp64).
std::tuple<at::Tensor, at::Tensor> cross_entropy_rows_impl(const at::Tensor& logits, const at::Tensor& targets,
                                                           int64_t classes, int64_t ignore_index) {
  const CrossEntropyDims d{logits.size(0), logits.size(1), logits.stride(0), classes, ignore_index};
  if (logits.scalar_type() == at::kDouble) {
    const auto counts = targets.ne(ignore_index);
    const auto lse = at::logsumexp(logits.narrow(1, 0, classes), {1});
    const auto picked = logits.gather(1, targets.where(counts, 0).unsqueeze(1)).squeeze(1);
    return {(lse - picked).where(counts, 0.0), lse};
  }
  const auto f32 = logits.options().dtype(at::kFloat);
  auto loss_rows = at::empty({d.rows}, f32), lse = at::empty({d.rows}, f32);
  if (logits.is_cuda()) {
#ifdef SCALETRAIN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    check_launch(cuda::launch_cross_entropy_forward(kernel_dtype(logits, "cross_entropy"), logits.const_data_ptr(),
                                                    targets.const_data_ptr<int64_t>(),
                                                    {d.rows, d.classes, d.row_stride, d.ignore_index},
                                                    loss_rows.data_ptr<float>(), lse.data_ptr<float>(),
                                                    c10::cuda::getCurrentCUDAStream().stream()),
                 "cross_entropy");
#endif
  } else {
    const int64_t* t = targets.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < d.rows; ++r) {
      if (t[r] != ignore_index && (t[r] < 0 || t[r] >= classes)) {
        TORCH_CHECK(false, "cross_entropy: targets[" + std::to_string(r) + "] = " + std::to_string(t[r]) +
                               ", expected a class in [0, " + std::to_string(classes) + ") or ignore_index (" +
                               std::to_string(ignore_index) + ")");
      }
    }
    dispatch_kernel_types(logits.scalar_type(), "cross_entropy", [&](auto tag) {
      cross_entropy_forward_cpu<decltype(tag)>(logits, t, d, loss_rows.data_ptr<float>(), lse.data_ptr<float>());
    });
  }
  return {loss_rows, lse};
}

// d loss / d logits (rows, columns), dense, from d loss / d loss_rows: `scale` (rows) or one value.
at::Tensor cross_entropy_rows_backward_impl(const at::Tensor& scale, const at::Tensor& logits,
                                            const at::Tensor& targets, const at::Tensor& lse, int64_t classes,
                                            int64_t ignore_index) {
  const CrossEntropyDims d{logits.size(0), logits.size(1), logits.stride(0), classes, ignore_index};
  if (logits.scalar_type() == at::kDouble) {
    const auto counts = targets.ne(ignore_index);
    auto grad = at::zeros({d.rows, d.columns}, logits.options());
    auto p = (logits.narrow(1, 0, classes) - lse.unsqueeze(1)).exp();
    p.scatter_add_(1, targets.where(counts, 0).unsqueeze(1), at::full({d.rows, 1}, -1.0, p.options()));
    const auto g = scale.to(at::kDouble).expand({d.rows}).where(counts, 0.0);
    grad.narrow(1, 0, classes).copy_(p * g.unsqueeze(1));
    return grad;
  }
  // One value for every row (a mean or a sum of the rows) or one per row.
  at::Tensor g = scale.to(at::kFloat);
  int64_t scale_stride = 0;
  if (g.dim() == 1 && g.stride(0) != 0) {
    g = g.contiguous();
    scale_stride = 1;
  } else if (g.dim() == 1) {
    g = g.select(0, 0);  // expanded: one value
  }
  auto grad = at::empty({d.rows, d.columns}, logits.options());
  if (logits.is_cuda()) {
#ifdef SCALETRAIN_WITH_CUDA
    g = g.to(logits.device());
    const c10::cuda::CUDAGuard guard(logits.device());
    check_launch(cuda::launch_cross_entropy_backward(
                     kernel_dtype(logits, "cross_entropy backward"), logits.const_data_ptr(),
                     targets.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(), g.const_data_ptr<float>(),
                     scale_stride, {d.rows, d.classes, d.row_stride, d.ignore_index}, d.columns, grad.data_ptr(),
                     c10::cuda::getCurrentCUDAStream().stream()),
                 "cross_entropy backward");
#endif
  } else {
    g = g.cpu();
    dispatch_kernel_types(logits.scalar_type(), "cross_entropy backward", [&](auto tag) {
      using T = decltype(tag);
      cross_entropy_backward_cpu<T>(logits, targets.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                                    g.const_data_ptr<float>(), scale_stride, d, grad.data_ptr<T>());
    });
  }
  return grad;
}

class CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
 public:
  // logits: (rows, columns), last dimension dense; targets: (rows) int64, dense.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            int64_t classes, int64_t ignore_index, bool mean) {
    auto [loss_rows, lse] = cross_entropy_rows_impl(logits, targets, classes, ignore_index);
    auto loss = loss_rows.sum();
    at::Tensor count;
    if (mean) {
      count = targets.ne(ignore_index).sum().to(at::kFloat);
      loss = loss / count;
    }
    ctx->save_for_backward({logits, targets, lse, count});
    ctx->saved_data["classes"] = classes;
    ctx->saved_data["ignore_index"] = ignore_index;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &logits = saved[0], &targets = saved[1], &lse = saved[2], &count = saved[3];
    auto scale = grads[0].to(at::kFloat);
    if (count.defined()) scale = scale / count;
    auto grad = cross_entropy_rows_backward_impl(scale.reshape({}).contiguous(), logits, targets, lse,
                                                 ctx->saved_data["classes"].toInt(),
                                                 ctx->saved_data["ignore_index"].toInt());
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// out = a b, or out += a b with `accumulate`, out in fp32 (or fp64): cuBLAS's fp32-output GEMM for
// bf16 / fp16 operands on CUDA, else the operands converted to out's dtype.
void matmul_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool low = a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf;
  if (low && a.is_cuda()) {
    if (accumulate) at::addmm_out(out, out, a, b, at::kFloat);
    else at::mm_out(out, a, b, at::kFloat);
    return;
  }
  const auto wide_a = a.to(out.scalar_type()), wide_b = b.to(out.scalar_type());
  if (accumulate) out.addmm_(wide_a, wide_b);
  else at::mm_out(out, wide_a, wide_b);
}

// The chunk loop of linear_cross_entropy, without autograd: the sum of the rows' losses and, with
// `with_grad`, d sum / d hidden and d sum / d weight (fp32, fp64 for fp64 GEMMs).
struct LinearLossSum {
  at::Tensor loss, grad_hidden, grad_weight;
};

LinearLossSum chunked_loss_sum(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                               int64_t classes, int64_t ignore_index, int64_t chunk_rows, at::ScalarType dtype,
                               bool with_grad) {
  // The casts are made here, once: autocast would cast again (and not to fp32 outputs).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto h = hidden.to(dtype), w = weight.to(dtype);
  const int64_t rows = h.size(0);
  const auto wide = h.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  LinearLossSum out{at::zeros({}, wide), {}, {}};
  at::Tensor unit;
  if (with_grad) {
    out.grad_hidden = at::empty({rows, h.size(1)}, wide);
    // The first chunk writes it, the others add; zeros only when there is no chunk.
    out.grad_weight = rows > 0 ? at::empty({w.size(0), w.size(1)}, wide) : at::zeros({w.size(0), w.size(1)}, wide);
    unit = at::ones({}, wide);  // d sum / d loss_rows of every row
  }
  for (int64_t first = 0; first < rows; first += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - first);
    const auto h_chunk = h.narrow(0, first, n), t_chunk = targets.narrow(0, first, n);
    const auto logits = at::mm(h_chunk, w.t());
    const auto [loss_rows, lse] = cross_entropy_rows_impl(logits, t_chunk, classes, ignore_index);
    out.loss.add_(loss_rows.sum());
    if (!with_grad) continue;
    const auto grad_logits = cross_entropy_rows_backward_impl(unit, logits, t_chunk, lse, classes, ignore_index);
    matmul_into(out.grad_hidden.narrow(0, first, n), grad_logits, w, false);
    matmul_into(out.grad_weight, grad_logits.t(), h_chunk, first > 0);
  }
  return out;
}

class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  // hidden (rows, features), weight (columns, features), targets (rows) int64 dense; the GEMMs in
  // `dtype`. with_grad: make d hidden and d weight (for d loss = 1) chunk by chunk.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& targets, int64_t classes, int64_t ignore_index, bool mean,
                            int64_t chunk_rows, at::ScalarType dtype, bool with_grad) {
    auto sum = chunked_loss_sum(hidden, weight, targets, classes, ignore_index, chunk_rows, dtype, with_grad);
    at::Tensor count, loss = sum.loss;
    if (mean) {
      count = targets.ne(ignore_index).sum().to(loss.scalar_type());
      loss = loss / count;
    }
    ctx->save_for_backward({sum.grad_hidden, sum.grad_weight, count});
    ctx->saved_data["hidden_type"] = hidden.scalar_type();
    ctx->saved_data["weight_type"] = weight.scalar_type();
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_hidden = saved[0], &grad_weight = saved[1], &count = saved[2];
    variable_list out(9);
    if (!grad_hidden.defined()) return out;
    auto factor = grads[0].to(grad_hidden.scalar_type());
    // A mean over no rows: NaN loss, zero gradients (every row's logits gradient is zero), as cross_entropy.
    if (count.defined()) factor = at::where(count > 0, factor / count, at::zeros_like(factor));
    out[0] = (grad_hidden * factor).to(ctx->saved_data["hidden_type"].toScalarType());
    out[1] = (grad_weight * factor).to(ctx->saved_data["weight_type"].toScalarType());
    return out;
  }
};

// Messages from std::to_string, not integers streamed by c10::str: on the GPU host (Ubuntu 24.04,
// g++ 13) these checks segfaulted when the error carried a streamed int64 to Python, while one
// streaming only a dtype and strings raised. Flash attention's checks build strings too.
std::string shape_text(at::IntArrayRef shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

[[noreturn]] void value_error(const std::string& message) { TORCH_CHECK_VALUE(false, message); }

// The checks of the row functions: what the kernels read.
void check_rows(const std::string& what, const at::Tensor& logits, const at::Tensor& targets, int64_t classes) {
  if (!logits.defined() || logits.dim() != 2)
    value_error(what + ": logits must be (rows, classes), got " + (logits.defined() ? shape_text(logits.sizes()) : "undefined"));
  if (!at::isFloatingType(logits.scalar_type()))
    value_error(what + ": logits must be floating point, got " + c10::toString(logits.scalar_type()));
  if (logits.stride(1) != 1 || logits.stride(0) < logits.size(1))
    value_error(what + ": logits must have a dense last dimension (strides " + shape_text(logits.strides()) + ")");
  if (classes < 1 || classes > logits.size(1))
    value_error(what + ": classes = " + std::to_string(classes) + ", expected 1.." + std::to_string(logits.size(1)) +
                " (the logits' last dimension)");
  if (!targets.defined() || targets.scalar_type() != at::kLong || targets.dim() != 1 || targets.size(0) != logits.size(0))
    value_error(what + ": targets must be int64 (rows) = (" + std::to_string(logits.size(0)) + ",), got " +
                (targets.defined() ? shape_text(targets.sizes()) + " " + c10::toString(targets.scalar_type())
                                   : std::string("undefined")));
  if (targets.device() != logits.device())
    value_error(what + ": targets are on " + targets.device().str() + ", logits on " + logits.device().str());
  if (logits.size(0) > std::numeric_limits<int32_t>::max())
    value_error(what + ": " + std::to_string(logits.size(0)) + " rows, at most 2^31 - 1 (one CUDA block each)");
}

void check_cuda_built(const at::Tensor& t, const char* what) {
#ifndef SCALETRAIN_WITH_CUDA
  TORCH_CHECK(!t.is_cuda(), what, ": this build of scaletrain has no CUDA kernels");
#else
  (void)t;
  (void)what;
#endif
}

}  // namespace

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half).to(cos.scalar_type());
  auto x2 = x.narrow(-1, half, half).to(cos.scalar_type());
  return at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1).to(x.scalar_type());
}

QKV rope_qkv_reference(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  const int64_t batch = qkv.size(0), seq = qkv.size(1), dim = qkv.size(2) / (3 * heads);
  // unbind, not three selects: its backward stacks the three gradients in one pass, where each
  // select's backward would zero-fill a gradient of the whole qkv output and copy into it.
  const auto parts = qkv.view({batch, seq, 3, heads, dim}).permute({2, 0, 3, 1, 4}).unbind(0);
  // (seq, half) broadcasts against (batch, heads, seq, half); (batch, seq, half) needs the head axis.
  const auto c = cos.dim() == 3 ? cos.unsqueeze(1) : cos, s = sin.dim() == 3 ? sin.unsqueeze(1) : sin;
  return {apply_rope(parts[0], c, s), apply_rope(parts[1], c, s), parts[2]};
}

QKV rope_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  TORCH_CHECK(qkv.defined() && qkv.dim() == 3, "rope_qkv: qkv must be (batch, seq, 3 * heads * head_dim), got ",
              qkv.defined() ? qkv.sizes() : at::IntArrayRef{});
  TORCH_CHECK(heads >= 1 && qkv.size(2) % (3 * heads) == 0 && (qkv.size(2) / (3 * heads)) % 2 == 0,
              "rope_qkv: qkv's last dimension ", qkv.size(2), " is not 3 x heads (", heads, ") x an even head_dim");
  TORCH_CHECK(at::isFloatingType(qkv.scalar_type()), "rope_qkv: qkv must be floating point, got ", qkv.scalar_type());
  const int64_t half = qkv.size(2) / (3 * heads) / 2;
  // fp64 (reference models in tests) keeps the expression: it is exact enough, the kernels are fp32 inside.
  const bool fp64 = qkv.scalar_type() == at::kDouble;
  const auto table_type = fp64 ? at::kDouble : at::kFloat;
  const auto c = rope_table(cos, "cos", qkv, half, table_type), s = rope_table(sin, "sin", qkv, half, table_type);
  if (fp64) return rope_qkv_reference(qkv, c, s, heads);
  check_cuda_built(qkv, "rope_qkv");
  const auto out = RopeQKVFunction::apply(qkv.contiguous(), c, s, heads);
  return {out[0].transpose(1, 2), out[1].transpose(1, 2), out[2].transpose(1, 2)};
}

at::Tensor cross_entropy_reference(const at::Tensor& logits, const at::Tensor& targets, int64_t classes,
                                   int64_t ignore_index, LossReduction reduction) {
  // At least fp32 first: for low-precision (or column-narrowed) logits that conversion is the one copy.
  const auto rows = logits.narrow(-1, 0, classes).to(at::promote_types(logits.scalar_type(), at::kFloat));
  return at::cross_entropy_loss(rows.reshape({-1, classes}), targets.reshape({-1}), {},
                                reduction == LossReduction::mean ? at::Reduction::Mean : at::Reduction::Sum,
                                ignore_index);
}

at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets, int64_t classes, int64_t ignore_index,
                         LossReduction reduction) {
  TORCH_CHECK(logits.defined() && logits.dim() >= 1, "cross_entropy: logits must have a class dimension");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "cross_entropy: logits must be floating point, got ",
              logits.scalar_type());
  const int64_t columns = logits.size(-1);
  TORCH_CHECK(classes >= 1 && classes <= columns, "cross_entropy: classes = ", classes, ", expected 1..", columns,
              " (the logits' last dimension)");
  TORCH_CHECK(targets.defined() && targets.scalar_type() == at::kLong, "cross_entropy: targets must be int64",
              targets.defined() ? ", got " + std::string(c10::toString(targets.scalar_type())) : std::string());
  TORCH_CHECK(targets.numel() * columns == logits.numel(), "cross_entropy: targets ", targets.sizes(),
              " do not match logits ", logits.sizes(), " (one target per row)");
  TORCH_CHECK(targets.device() == logits.device(), "cross_entropy: targets are on ", targets.device(), ", logits on ",
              logits.device());
  if (logits.scalar_type() == at::kDouble) return cross_entropy_reference(logits, targets, classes, ignore_index, reduction);
  check_cuda_built(logits, "cross_entropy");
  auto rows = logits.reshape({-1, columns});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  TORCH_CHECK(rows.size(0) <= std::numeric_limits<int32_t>::max(), "cross_entropy: ", rows.size(0),
              " rows, at most 2^31 - 1 (one CUDA block each)");
  return CrossEntropyFunction::apply(rows, targets.reshape({-1}).contiguous(), classes, ignore_index,
                                     reduction == LossReduction::mean);
}

namespace {

// The checks of linear_cross_entropy and its operator; returns the number of rows.
int64_t check_linear_loss(const std::string& what, const at::Tensor& hidden, const at::Tensor& weight,
                          const at::Tensor& targets, int64_t classes, int64_t chunk_rows) {
  if (!hidden.defined() || hidden.dim() < 1 || !at::isFloatingType(hidden.scalar_type()))
    value_error(what + ": hidden must be a floating-point tensor (..., features)");
  if (!weight.defined() || weight.dim() != 2 || weight.size(1) != hidden.size(-1) ||
      !at::isFloatingType(weight.scalar_type()))
    value_error(what + ": weight must be floating point (columns, " + std::to_string(hidden.size(-1)) + "), got " +
                (weight.defined() ? shape_text(weight.sizes()) : std::string("undefined")));
  if (weight.device() != hidden.device())
    value_error(what + ": weight is on " + weight.device().str() + ", hidden on " + hidden.device().str());
  const int64_t rows = hidden.numel() / std::max<int64_t>(hidden.size(-1), 1);
  if (!targets.defined() || targets.scalar_type() != at::kLong || targets.numel() != rows ||
      targets.device() != hidden.device())
    value_error(what + ": targets must be int64 on " + hidden.device().str() + " with one target per row of hidden (" +
                std::to_string(rows) + "), got " +
                (targets.defined() ? shape_text(targets.sizes()) + " " + c10::toString(targets.scalar_type()) + " on " +
                                         targets.device().str()
                                   : std::string("undefined")));
  if (classes < 1 || classes > weight.size(0))
    value_error(what + ": classes = " + std::to_string(classes) + ", expected 1.." + std::to_string(weight.size(0)) +
                " (weight's rows)");
  if (chunk_rows < 1) value_error(what + ": chunk_rows = " + std::to_string(chunk_rows) + ", expected >= 1");
  check_cuda_built(hidden, what.c_str());
  return rows;
}

}  // namespace

at::Tensor linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                int64_t classes, int64_t ignore_index, LossReduction reduction, int64_t chunk_rows) {
  const int64_t rows = check_linear_loss("linear_cross_entropy", hidden, weight, targets, classes, chunk_rows);
  // The GEMMs' dtype: what linear would use (autocast's, else the inputs').
  const at::ScalarType dtype = linear_input_type(hidden);
  const bool with_grad = at::GradMode::is_enabled() && (hidden.requires_grad() || weight.requires_grad());
  return LinearCrossEntropyFunction::apply(hidden.reshape({rows, hidden.size(-1)}), weight,
                                           targets.reshape({-1}).contiguous(), classes, ignore_index,
                                           reduction == LossReduction::mean, chunk_rows, dtype, with_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_sum(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t classes,
    int64_t ignore_index, int64_t chunk_rows, std::optional<at::ScalarType> compute_dtype, bool with_grad) {
  const int64_t rows = check_linear_loss("linear_cross_entropy_sum", hidden, weight, targets, classes, chunk_rows);
  auto sum = chunked_loss_sum(hidden.reshape({rows, hidden.size(-1)}), weight, targets.reshape({-1}).contiguous(),
                              classes, ignore_index, chunk_rows, compute_dtype.value_or(hidden.scalar_type()),
                              with_grad);
  if (!with_grad) return {sum.loss, sum.loss.new_empty({0}), sum.loss.new_empty({0})};
  return {sum.loss, sum.grad_hidden.view(hidden.sizes()), sum.grad_weight};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_rows(const at::Tensor& logits, const at::Tensor& targets,
                                                      int64_t classes, int64_t ignore_index) {
  check_rows("cross_entropy_forward", logits, targets, classes);
  check_cuda_built(logits, "cross_entropy_forward");
  return cross_entropy_rows_impl(logits, targets.contiguous(), classes, ignore_index);
}

at::Tensor cross_entropy_rows_backward(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& targets,
                                       const at::Tensor& lse, int64_t classes, int64_t ignore_index) {
  check_rows("cross_entropy_backward", logits, targets, classes);
  check_cuda_built(logits, "cross_entropy_backward");
  if (grad_rows.numel() != 1 && (grad_rows.dim() != 1 || grad_rows.size(0) != logits.size(0)))
    value_error("cross_entropy_backward: grad_rows " + shape_text(grad_rows.sizes()) + ", expected (" +
                std::to_string(logits.size(0)) + ",)");
  if (lse.dim() != 1 || lse.size(0) != logits.size(0))
    value_error("cross_entropy_backward: lse " + shape_text(lse.sizes()) + ", expected (" +
                std::to_string(logits.size(0)) + ",)");
  return cross_entropy_rows_backward_impl(grad_rows.numel() == 1 ? grad_rows.reshape({}) : grad_rows, logits,
                                          targets.contiguous(), lse.contiguous(), classes, ignore_index);
}

}  // namespace scaletrain::model
