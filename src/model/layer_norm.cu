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
// x weight, plus d sum, written in x's type and, for the residual, in its type. Each warp adds its
// rows' d out x xhat and d out into its own slice of shared memory; the block adds the warps'
// slices in a fixed order and writes one row of partials; a second kernel adds the blocks'
// partials in a fixed order. No atomics: the gradients are deterministic.
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

// Two blocks of 8 warps per SM. A warp loads its row's x, d out and d sum together (one round trip
// to memory a row), keeps them in registers across the row's two reductions, and adds its columns'
// d weight and d bias terms into its own slice of shared memory: in registers, those sums took 48
// more registers a thread (spilling at 768 columns, one block an SM at 1024) and the row's loads
// waited on the reductions (measured on the H200 with benchmarks/cuda/layer_norm_variants.cu:
// 93 -> 68 us at 16384 x 768, 172 -> 94 us at 16384 x 1024).
template <int kChunks>
__global__ void __launch_bounds__(kBackwardWarps * 32, 2)
    layer_norm_backward(LayerNormBackwardArgs a, LayerNormShape s) {
  extern __shared__ float shared[];  // (warps, 2, cols): each warp's d weight and d bias terms
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float inv_cols = 1.f / static_cast<float>(s.cols);
  const bool param_sums = a.partials != nullptr;
  float* mine = shared + int64_t{warp} * 2 * s.cols;
  if (param_sums) {
    for (int64_t i = lane; i < 2 * s.cols; i += 32) mine[i] = 0.f;
  }
  for (int64_t row = int64_t{blockIdx.x} * kBackwardWarps + warp; row < s.rows;
       row += int64_t{gridDim.x} * kBackwardWarps) {
    const int64_t base = row * s.cols;
    const float mean = a.mean[row], rstd = a.rstd[row];
    float x[kChunks][4], dy[kChunks][4], ds[kChunks][4];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (int64_t{c} * 32 + lane) * 4;
      if (col >= s.cols) continue;
      load4(a.input, a.x_type, base + col, x[c]);
      load4(a.grad_out, a.out_type, base + col, dy[c]);
      if (a.grad_sum != nullptr) {
        load4(a.grad_sum, a.x_type, base + col, ds[c]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) ds[c][e] = 0.f;
      }
    }
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (int64_t{c} * 32 + lane) * 4;
      if (col >= s.cols) continue;
      float w[4];
      load4(a.weight, a.param_type, col, w);
      float4 dw = make_float4(0.f, 0.f, 0.f, 0.f), db = dw;
      if (param_sums) {
        dw = *reinterpret_cast<const float4*>(mine + col);
        db = *reinterpret_cast<const float4*>(mine + s.cols + col);
      }
      float* pw = &dw.x;
      float* pb = &db.x;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float xhat = (x[c][e] - mean) * rstd, g = dy[c][e] * w[e];
        sum_g += g;
        sum_gx += g * xhat;
        pw[e] += dy[c][e] * xhat;
        pb[e] += dy[c][e];
      }
      if (param_sums) {
        *reinterpret_cast<float4*>(mine + col) = dw;
        *reinterpret_cast<float4*>(mine + s.cols + col) = db;
      }
    }
    const float mean_g = warp_sum(sum_g) * inv_cols, mean_gx = warp_sum(sum_gx) * inv_cols;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (int64_t{c} * 32 + lane) * 4;
      if (col >= s.cols) continue;
      float w[4], dx[4];
      load4(a.weight, a.param_type, col, w);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float xhat = (x[c][e] - mean) * rstd, g = dy[c][e] * w[e];
        dx[e] = (g - mean_g - xhat * mean_gx) * rstd + ds[c][e];
      }
      store4(a.grad_x, a.x_type, base + col, dx);
      if (a.grad_residual != nullptr) store4(a.grad_residual, a.residual_type, base + col, dx);
    }
  }
  if (!param_sums) return;
  // The warps' slices added in a fixed order: one row of partials a block.
  __syncthreads();
  for (int64_t i = threadIdx.x; i < 2 * s.cols; i += blockDim.x) {
    float sum = 0.f;
    for (int w = 0; w < kBackwardWarps; ++w) sum += shared[int64_t{w} * 2 * s.cols + i];
    const int64_t which = i / s.cols, col = i % s.cols;
    a.partials[(which * gridDim.x + blockIdx.x) * s.cols + col] = sum;
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

constexpr size_t kBackwardMaxShared = kBackwardWarps * 2 * kLayerNormMaxCols * sizeof(float);  // 64 KB

size_t backward_shared_bytes(int64_t cols) { return kBackwardWarps * 2 * static_cast<size_t>(cols) * sizeof(float); }

// Lets the kernel take more than 48 KB of shared memory (once) and returns its blocks per SM.
template <int kChunks>
int backward_blocks_per_sm() {
  static const int blocks = [] {
    int n = 0;
    if (cudaFuncSetAttribute(layer_norm_backward<kChunks>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kBackwardMaxShared)) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, layer_norm_backward<kChunks>, kBackwardWarps * 32,
                                                      kBackwardMaxShared) != cudaSuccess) {
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
    const size_t shared = args.partials != nullptr ? backward_shared_bytes(shape.cols) : 0;
    if (shared > 48 * 1024) {  // per device: set again for whichever device is current
      const cudaError_t set = cudaFuncSetAttribute(layer_norm_backward<decltype(chunks)::value>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(kBackwardMaxShared));
      if (set != cudaSuccess) return set;
    }
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
