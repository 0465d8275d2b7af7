// CUDA kernels of the fused residual-add + LayerNorm (include/scaletrain/model/fused_ops.h,
// add_layer_norm).
//
// Forward: one warp per row, the row in registers (4 columns per lane per 128-column chunk, kChunks
// chunks): it reads x and the residual once, writes their sum in x's type, and normalises the
// rounded sum in fp32 (mean, then the variance of the deviations from it: two passes over
// registers) into the output's type; the mean and 1/std of each row are kept for backward.
//
// Backward: persistent blocks of warps, a warp per row in turn. Each row is read once (the
// normalised input, d out, d sum): d input = rstd (g - mean(g) - xhat mean(g xhat)) with g = d out
// x weight, plus d sum, written in x's type and, for the residual, in its type. Each lane keeps
// its columns' sums of d out x xhat and d out over the rows its warp saw; the warps of a block add
// theirs in a fixed order into shared memory and the block writes one row of partials; a second
// kernel adds the blocks' partials in a fixed order. No atomics: the gradients are deterministic.
//
// The element types are run-time arguments (uniform branches): the rows are bytes-bound and a
// few instantiations (one per row width) keep the build short.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda_convert.cuh"
#include "layer_norm_cuda.h"

namespace scaletrain::model::cuda {
namespace {

using core::cuda::BFloat4;
using core::cuda::from_float;
using core::cuda::Half4;
using core::cuda::store_as;
using core::cuda::to_float;

constexpr int kForwardWarps = 4;
constexpr int kBackwardWarps = 8;
constexpr int kColsPerChunk = 32 * 4;


template <typename Pack>
__device__ __forceinline__ void unpack(const Pack& p, float (&v)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) v[e] = to_float(p.x[e]);
}

// Four elements at p[i..i+3] of a `type` array as fp32.
__device__ __forceinline__ void load4(const void* p, DType type, int64_t i, float (&v)[4]) {
  if (type == DType::f32) {
    const float4 q = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else if (type == DType::bf16) {
    unpack(*reinterpret_cast<const BFloat4*>(static_cast<const __nv_bfloat16*>(p) + i), v);
  } else {
    unpack(*reinterpret_cast<const Half4*>(static_cast<const __half*>(p) + i), v);
  }
}

__device__ __forceinline__ void store4(void* p, DType type, int64_t i, const float (&v)[4]) {
  if (type == DType::f32) {
    *reinterpret_cast<float4*>(static_cast<float*>(p) + i) = make_float4(v[0], v[1], v[2], v[3]);
  } else if (type == DType::bf16) {
    BFloat4 q;
#pragma unroll
    for (int e = 0; e < 4; ++e) q.x[e] = from_float<__nv_bfloat16>(v[e]);
    *reinterpret_cast<BFloat4*>(static_cast<__nv_bfloat16*>(p) + i) = q;
  } else {
    Half4 q;
#pragma unroll
    for (int e = 0; e < 4; ++e) q.x[e] = from_float<__half>(v[e]);
    *reinterpret_cast<Half4*>(static_cast<__half*>(p) + i) = q;
  }
}

// x rounded to `type` and back, as a stored value of that type reads.
__device__ __forceinline__ float round_to(DType type, float x) {
  if (type == DType::bf16) return to_float(from_float<__nv_bfloat16>(x));
  if (type == DType::f16) return to_float(from_float<__half>(x));
  return x;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <int kChunks>
__global__ void __launch_bounds__(kForwardWarps * 32)
    layer_norm_forward(LayerNormForwardArgs a, LayerNormShape s) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t{blockIdx.x} * kForwardWarps + threadIdx.x / 32;
  if (row >= s.rows) return;
  const int64_t base = row * s.cols;
  float v[kChunks][4];
  float total = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t col = (int64_t{c} * 32 + lane) * 4;
    if (col >= s.cols) continue;
    load4(a.x, a.x_type, base + col, v[c]);
    if (a.residual != nullptr) {
      float r[4];
      load4(a.residual, a.residual_type, base + col, r);
#pragma unroll
      for (int e = 0; e < 4; ++e) v[c][e] = round_to(a.x_type, v[c][e] + r[e]);
      store4(a.sum, a.x_type, base + col, v[c]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) total += v[c][e];
  }
  const float inv_cols = 1.f / static_cast<float>(s.cols);
  const float mean = warp_sum(total) * inv_cols;
  float squares = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t col = (int64_t{c} * 32 + lane) * 4;
    if (col >= s.cols) continue;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float d = v[c][e] - mean;
      squares += d * d;
    }
  }
  const float rstd = rsqrtf(warp_sum(squares) * inv_cols + s.eps);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t col = (int64_t{c} * 32 + lane) * 4;
    if (col >= s.cols) continue;
    float w[4], b[4] = {0.f, 0.f, 0.f, 0.f}, y[4];
    load4(a.weight, a.param_type, col, w);
    if (a.bias != nullptr) load4(a.bias, a.param_type, col, b);
#pragma unroll
    for (int e = 0; e < 4; ++e) y[e] = (v[c][e] - mean) * rstd * w[e] + b[e];
    store4(a.out, a.out_type, base + col, y);
  }
  if (lane == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// Two blocks per SM where the row fits in 128 registers a thread (up to 768 columns).
template <int kChunks>
__global__ void __launch_bounds__(kBackwardWarps * 32, kChunks <= 6 ? 2 : 1)
    layer_norm_backward(LayerNormBackwardArgs a, LayerNormShape s) {
  extern __shared__ float shared[];  // (2, cols): the block's d weight and d bias
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float inv_cols = 1.f / static_cast<float>(s.cols);
  float dw[kChunks][4], db[kChunks][4];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dw[c][e] = db[c][e] = 0.f;
  }
  for (int64_t row = int64_t{blockIdx.x} * kBackwardWarps + warp; row < s.rows;
       row += int64_t{gridDim.x} * kBackwardWarps) {
    const int64_t base = row * s.cols;
    const float mean = a.mean[row], rstd = a.rstd[row];
    float xhat[kChunks][4], g[kChunks][4];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (int64_t{c} * 32 + lane) * 4;
      if (col >= s.cols) continue;
      float x[4], dy[4], w[4];
      load4(a.input, a.x_type, base + col, x);
      load4(a.grad_out, a.out_type, base + col, dy);
      load4(a.weight, a.param_type, col, w);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        xhat[c][e] = (x[e] - mean) * rstd;
        g[c][e] = dy[e] * w[e];
        sum_g += g[c][e];
        sum_gx += g[c][e] * xhat[c][e];
        dw[c][e] += dy[e] * xhat[c][e];
        db[c][e] += dy[e];
      }
    }
    const float mean_g = warp_sum(sum_g) * inv_cols, mean_gx = warp_sum(sum_gx) * inv_cols;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (int64_t{c} * 32 + lane) * 4;
      if (col >= s.cols) continue;
      float dx[4], ds[4] = {0.f, 0.f, 0.f, 0.f};
      if (a.grad_sum != nullptr) load4(a.grad_sum, a.x_type, base + col, ds);
#pragma unroll
      for (int e = 0; e < 4; ++e) dx[e] = (g[c][e] - mean_g - xhat[c][e] * mean_gx) * rstd + ds[e];
      store4(a.grad_x, a.x_type, base + col, dx);
      if (a.grad_residual != nullptr) store4(a.grad_residual, a.residual_type, base + col, dx);
    }
  }
  if (a.partials == nullptr) return;
  // The warps add their sums into shared memory one after another (a fixed order).
  for (int w = 0; w < kBackwardWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int64_t col = (int64_t{c} * 32 + lane) * 4;
        if (col >= s.cols) continue;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          shared[col + e] = w == 0 ? dw[c][e] : shared[col + e] + dw[c][e];
          shared[s.cols + col + e] = w == 0 ? db[c][e] : shared[s.cols + col + e] + db[c][e];
        }
      }
    }
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < 2 * s.cols; i += blockDim.x) {
    const int64_t which = i / s.cols, col = i % s.cols;
    a.partials[(which * gridDim.x + blockIdx.x) * s.cols + col] = shared[i];
  }
}

// Column sums of the blocks' partials, in a fixed order: each block takes 32 columns of d weight
// or d bias, its 8 warps a strided slice of the blocks each, then warp 0 adds the 8 slices.
constexpr int kReduceSlices = 8;

__global__ void __launch_bounds__(32 * kReduceSlices)
    layer_norm_param_grads(const float* __restrict__ partials, int64_t blocks, int64_t cols, void* grad_weight,
                           void* grad_bias, DType type) {
  __shared__ float slices[kReduceSlices][32];
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int64_t i = int64_t{blockIdx.x} * 32 + lane;  // over (2, cols)
  float sum = 0.f;
  if (i < 2 * cols) {
    const int64_t which = i / cols, col = i % cols;
    for (int64_t b = slice; b < blocks; b += kReduceSlices) sum += partials[(which * blocks + b) * cols + col];
  }
  slices[slice][lane] = sum;
  __syncthreads();
  if (slice != 0 || i >= 2 * cols) return;
  for (int k = 1; k < kReduceSlices; ++k) sum += slices[k][lane];
  const int64_t which = i / cols, col = i % cols;
  void* out = which == 0 ? grad_weight : grad_bias;
  if (out == nullptr) return;
  store_as(out, type, col, sum);
}

// Calls f(std::integral_constant<int, kChunks>) for the fewest chunks that cover `cols`
// (instantiated for rows of up to 256, 512, 768 and 1024 columns).
template <typename F>
cudaError_t with_chunks(int64_t cols, F&& f) {
  const int64_t chunks = (cols + kColsPerChunk - 1) / kColsPerChunk;
  if (chunks <= 2) return f(std::integral_constant<int, 2>{});
  if (chunks <= 4) return f(std::integral_constant<int, 4>{});
  if (chunks <= 6) return f(std::integral_constant<int, 6>{});
  if (chunks <= 8) return f(std::integral_constant<int, 8>{});
  return cudaErrorInvalidValue;
}

template <int kChunks>
int backward_blocks_per_sm() {
  static const int blocks = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, layer_norm_backward<kChunks>, kBackwardWarps * 32,
                                                      2 * kLayerNormMaxCols * sizeof(float)) != cudaSuccess) {
      return 1;
    }
    return n > 0 ? n : 1;
  }();
  return blocks;
}

int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 1;
  }
  return count > 0 ? count : 1;
}

}  // namespace

cudaError_t launch_layer_norm_forward(const LayerNormForwardArgs& args, const LayerNormShape& shape,
                                      cudaStream_t stream) {
  if (shape.rows == 0) return cudaSuccess;
  return with_chunks(shape.cols, [&](auto chunks) {
    const int64_t blocks = (shape.rows + kForwardWarps - 1) / kForwardWarps;
    layer_norm_forward<decltype(chunks)::value><<<blocks, kForwardWarps * 32, 0, stream>>>(args, shape);
    return cudaGetLastError();
  });
}

int64_t layer_norm_backward_blocks(int64_t rows, int64_t cols) {
  int64_t per_sm = 1;
  with_chunks(cols, [&](auto chunks) {
    per_sm = backward_blocks_per_sm<decltype(chunks)::value>();
    return cudaSuccess;
  });
  const int64_t wanted = (rows + kBackwardWarps - 1) / kBackwardWarps;
  const int64_t resident = per_sm * sm_count();
  return wanted < resident ? (wanted > 0 ? wanted : 1) : resident;
}

cudaError_t launch_layer_norm_backward(const LayerNormBackwardArgs& args, const LayerNormShape& shape,
                                       cudaStream_t stream) {
  const int64_t blocks = layer_norm_backward_blocks(shape.rows, shape.cols);
  const cudaError_t status = with_chunks(shape.cols, [&](auto chunks) {
    const size_t shared = 2 * shape.cols * sizeof(float);
    layer_norm_backward<decltype(chunks)::value><<<blocks, kBackwardWarps * 32, shared, stream>>>(args, shape);
    return cudaGetLastError();
  });
  if (status != cudaSuccess || args.partials == nullptr) return status;
  const int64_t reduce_blocks = (2 * shape.cols + 31) / 32;
  layer_norm_param_grads<<<reduce_blocks, 32 * kReduceSlices, 0, stream>>>(
      args.partials, blocks, shape.cols, args.grad_weight, args.grad_bias, args.param_type);
  return cudaGetLastError();
}

}  // namespace scaletrain::model::cuda
