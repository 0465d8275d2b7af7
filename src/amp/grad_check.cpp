#include "scaletrain/amp/grad_check.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "scaletrain/core/version.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "grad_check_cuda.h"
#endif

namespace scaletrain::amp {
namespace {

void check_inputs(const std::vector<at::Tensor>& grads) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    const std::string name = "grads[" + std::to_string(i) + "]";
    if (!g.defined()) throw std::invalid_argument(name + ": undefined tensor (expected a gradient)");
    const auto type = g.scalar_type();
    if (type != at::kFloat && type != at::kHalf && type != at::kBFloat16)
      throw std::invalid_argument(name + ": dtype " + std::string(c10::toString(type)) + ", expected float32, bfloat16 or float16");
    if (!g.is_contiguous()) throw std::invalid_argument(name + ": not contiguous");
    if (g.device() != grads.front().device())
      throw std::invalid_argument(name + ": on " + g.device().str() + ", grads[0] is on " + grads.front().device().str() +
                                  " (expected one device)");
  }
  // In place over every tensor: a tensor given twice, or two views of the same memory, would be
  // unscaled (and clipped) twice. The tensors are contiguous, so each is one address range.
  struct Range {
    uintptr_t begin, end;
    size_t index;
  };
  std::vector<Range> ranges;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].numel() == 0) continue;
    const auto begin = reinterpret_cast<uintptr_t>(grads[i].data_ptr());
    ranges.push_back({begin, begin + static_cast<uintptr_t>(grads[i].nbytes()), i});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      const auto [first, second] = std::minmax(ranges[i - 1].index, ranges[i].index);
      throw std::invalid_argument("grads[" + std::to_string(second) + "]: shares memory with grads[" +
                                  std::to_string(first) +
                                  "] (the same tensor twice, or overlapping views; each gradient must appear once)");
    }
  }
}

constexpr int64_t kCpuChunk = 32768;

// The CPU path: chunked sums of squares in double, added in chunk order (deterministic for any
// thread count), then the same factor and second pass as on CUDA.
GradCheckResult unscale_check_clip_cpu(const std::vector<at::Tensor>& grads, double inv_scale, double max_norm,
                                       bool apply) {
  const bool write_in_first_pass = apply && max_norm <= 0;
  double squares = 0;
  bool found_inf = false;
  const float inv = static_cast<float>(inv_scale);
  for (const auto& g : grads) {
    const int64_t n = g.numel();
    const int64_t chunks = (n + kCpuChunk - 1) / kCpuChunk;
    std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
    std::vector<char> bad(static_cast<size_t>(chunks), 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "unscale_check_clip_cpu", [&] {
      scalar_t* data = g.data_ptr<scalar_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          double sum = 0;
          bool chunk_bad = false;
          for (int64_t i = c * kCpuChunk, stop = std::min(n, (c + 1) * kCpuChunk); i < stop; ++i) {
            const float v = static_cast<float>(data[i]) * inv;
            chunk_bad |= !std::isfinite(v);
            sum += static_cast<double>(v) * v;
            if (write_in_first_pass) data[i] = static_cast<scalar_t>(v);
          }
          partial[static_cast<size_t>(c)] = sum;
          bad[static_cast<size_t>(c)] = chunk_bad;
        }
      });
    });
    for (int64_t c = 0; c < chunks; ++c) {
      squares += partial[static_cast<size_t>(c)];
      found_inf |= bad[static_cast<size_t>(c)] != 0;
    }
  }
  const float norm = static_cast<float>(std::sqrt(squares));
  const float coef = max_norm > 0 ? std::min(1.f, static_cast<float>(max_norm) / (norm + 1e-6f)) : 1.f;
  const float factor = inv * coef;
  if (apply && !write_in_first_pass && !found_inf && factor != 1.f) {
    // In fp32 arithmetic: ATen would round a scalar factor to the tensor's dtype first (for
    // fp16 that loses digits once the factor is subnormal).
    for (const auto& g : grads) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "unscale_check_clip_cpu_scale", [&] {
        scalar_t* data = g.data_ptr<scalar_t>();
        at::parallel_for(0, g.numel(), kCpuChunk, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) data[i] = static_cast<scalar_t>(static_cast<float>(data[i]) * factor);
        });
      });
    }
  }
  auto values = at::empty({3}, at::kFloat);
  values[0] = found_inf ? 1.f : 0.f;
  values[1] = norm;
  values[2] = factor;
  return {values.narrow(0, 0, 2), values.narrow(0, 2, 1)};
}

#ifdef SCALETRAIN_WITH_CUDA
void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

GradCheckResult unscale_check_clip_cuda(const std::vector<at::Tensor>& grads, double inv_scale,
                                        const at::Tensor& inv_scale_tensor, double max_norm, bool apply) {
  const c10::cuda::CUDAGuard guard(grads.front().device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // Grouped by dtype: one set of launches per group, chunks numbered across groups.
  std::vector<cuda::GradSpan> groups[3];
  int64_t chunks = 0;
  for (const auto& g : grads) {
    const int group = g.scalar_type() == at::kFloat ? 0 : g.scalar_type() == at::kHalf ? 1 : 2;
    if (g.numel() == 0) continue;
    groups[group].push_back({g.data_ptr(), g.numel()});
    chunks += cuda::chunks_of(g.numel());
  }
  const cuda::GradType types[3] = {cuda::GradType::f32, cuda::GradType::f16, cuda::GradType::bf16};
  auto workspace = at::empty({cuda::kWorkspaceHeader + chunks}, grads.front().options().dtype(at::kFloat));
  cuda_check(cudaMemsetAsync(workspace.data_ptr<float>(), 0, sizeof(float), stream), "unscale_check_clip_");
  const bool write_in_first_pass = apply && max_norm <= 0;
  const cuda::InvScale inv{static_cast<float>(inv_scale),
                           inv_scale_tensor.defined() ? inv_scale_tensor.const_data_ptr<float>() : nullptr};
  int64_t first_chunk = 0;
  for (int t = 0; t < 3; ++t) {
    const auto& spans = groups[t];
    cuda_check(cuda::launch_check(spans.data(), static_cast<int64_t>(spans.size()), types[t], inv, write_in_first_pass,
                                  workspace.data_ptr<float>(), first_chunk, stream),
               "unscale_check_clip_ (check pass)");
    for (const auto& span : spans) first_chunk += cuda::chunks_of(span.numel);
  }
  cuda_check(cuda::launch_finalize(workspace.data_ptr<float>(), chunks, inv, static_cast<float>(max_norm), stream),
             "unscale_check_clip_ (norm)");
  if (apply && !write_in_first_pass) {
    for (int t = 0; t < 3; ++t) {
      cuda_check(cuda::launch_scale(groups[t].data(), static_cast<int64_t>(groups[t].size()), types[t],
                                    workspace.data_ptr<float>(), stream),
                 "unscale_check_clip_ (scale pass)");
    }
  }
  return {workspace.narrow(0, 0, 2), workspace.narrow(0, 2, 1)};
}
#endif

}  // namespace

bool GradCheckResult::found_inf() const { return values[0].item<float>() != 0.f; }
double GradCheckResult::norm() const { return values[1].item<float>(); }

namespace {

// inv_scale_tensor, when defined, replaces inv_scale (read on the device on CUDA).
GradCheckResult check_clip(const std::vector<at::Tensor>& grads, double inv_scale, const at::Tensor& inv_scale_tensor,
                           double max_norm, bool apply) {
  if (inv_scale_tensor.defined()) {
    if (inv_scale_tensor.numel() != 1 || inv_scale_tensor.scalar_type() != at::kFloat)
      throw std::invalid_argument("inv_scale: expected one float32 element, got " +
                                  std::to_string(inv_scale_tensor.numel()) + " of " +
                                  std::string(c10::toString(inv_scale_tensor.scalar_type())));
    if (!grads.empty() && inv_scale_tensor.device() != grads.front().device())
      throw std::invalid_argument("inv_scale: on " + inv_scale_tensor.device().str() + ", the gradients are on " +
                                  grads.front().device().str());
  } else if (!(inv_scale > 0) || !std::isfinite(inv_scale)) {
    throw std::invalid_argument("inv_scale: got " + std::to_string(inv_scale) + ", expected a finite number > 0");
  }
  if (std::isnan(max_norm) || max_norm < 0)
    throw std::invalid_argument("max_norm: got " + std::to_string(max_norm) +
                                ", expected a number >= 0 (0 or inf: no clipping)");
  if (std::isinf(max_norm)) max_norm = 0;
  if (grads.empty()) {
    if (inv_scale_tensor.defined())
      return {at::zeros({2}, inv_scale_tensor.options()), inv_scale_tensor.reshape({1}).clone()};
    return {at::zeros({2}, at::kFloat), at::full({1}, inv_scale, at::kFloat)};
  }
  check_inputs(grads);
  if (grads.front().is_cpu()) {
    if (inv_scale_tensor.defined()) inv_scale = inv_scale_tensor.item<float>();
    return unscale_check_clip_cpu(grads, inv_scale, max_norm, apply);
  }
#ifdef SCALETRAIN_WITH_CUDA
  if (grads.front().is_cuda()) return unscale_check_clip_cuda(grads, inv_scale, inv_scale_tensor, max_norm, apply);
#endif
  throw std::invalid_argument("grads: on " + grads.front().device().str() +
                              ", expected CPU or CUDA (this build has " +
#ifdef SCALETRAIN_WITH_CUDA
                              "CUDA"
#else
                              "no CUDA"
#endif
                              ")");
}

}  // namespace

GradCheckResult unscale_check_clip_(const std::vector<at::Tensor>& grads, double inv_scale, double max_norm) {
  return check_clip(grads, inv_scale, at::Tensor(), max_norm, /*apply=*/true);
}

GradCheckResult gradient_factor(const std::vector<at::Tensor>& grads, double inv_scale, double max_norm) {
  return check_clip(grads, inv_scale, at::Tensor(), max_norm, /*apply=*/false);
}

GradCheckResult gradient_factor(const std::vector<at::Tensor>& grads, const at::Tensor& inv_scale, double max_norm) {
  if (!inv_scale.defined()) throw std::invalid_argument("inv_scale: undefined tensor (expected one float32 element)");
  return check_clip(grads, 1.0, inv_scale, max_norm, /*apply=*/false);
}

std::vector<at::Tensor> gradients_of(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  return grads;
}

}  // namespace scaletrain::amp
