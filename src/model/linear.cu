// CUDA kernel of the linear layer's bias gradient (include/scaletrain/model/fused_ops.h, linear):
// the column sums of d out (rows, cols), fp32 sums of bf16/fp16/fp32 rows.
//
// First pass: a block takes 128 columns of a slab of rows; each lane reads 4 columns (8 or 16
// bytes) of a row, the block's 8 warps take every 8th row of the slab, four rows in flight per
// warp; the warps' sums are added in a fixed order into one row of partials per slab. Second
// pass: a thread per column adds the slabs' partials in order. No atomics: deterministic.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda_convert.cuh"
#include "linear_cuda.h"

namespace scaletrain::model::cuda {
namespace {

using core::cuda::BFloat4;
using core::cuda::from_float;
using core::cuda::Half4;
using core::cuda::store_as;
using core::cuda::to_float;

constexpr int kWarps = 8;
constexpr int kColsPerBlock = 128;
constexpr int kUnroll = 4;
constexpr int64_t kRowsPerSlab = 256;


template <typename T>
struct Vec4;
template <>
struct Vec4<float> {
  using type = float4;
  __device__ static void add(const float4& q, float (&acc)[4]) { acc[0] += q.x, acc[1] += q.y, acc[2] += q.z, acc[3] += q.w; }
};
template <>
struct Vec4<__nv_bfloat16> {
  using type = BFloat4;
  __device__ static void add(const BFloat4& q, float (&acc)[4]) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] += to_float(q.x[e]);
  }
};
template <>
struct Vec4<__half> {
  using type = Half4;
  __device__ static void add(const Half4& q, float (&acc)[4]) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] += to_float(q.x[e]);
  }
};

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    column_sums_slab(const T* __restrict__ in, int64_t rows, int64_t cols, float* __restrict__ partials) {
  using V = typename Vec4<T>::type;
  __shared__ float shared[kColsPerBlock];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col = int64_t{blockIdx.x} * kColsPerBlock + lane * 4;
  const int64_t first = int64_t{blockIdx.y} * kRowsPerSlab;
  const int64_t last = first + kRowsPerSlab < rows ? first + kRowsPerSlab : rows;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (col < cols) {
    int64_t row = first + warp;
    for (; row + (kUnroll - 1) * kWarps < last; row += kUnroll * kWarps) {
      V q[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) q[u] = *reinterpret_cast<const V*>(in + (row + u * kWarps) * cols + col);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) Vec4<T>::add(q[u], acc);
    }
    for (; row < last; row += kWarps) Vec4<T>::add(*reinterpret_cast<const V*>(in + row * cols + col), acc);
  }
  // The warps' sums, added in order.
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int e = 0; e < 4; ++e) shared[lane * 4 + e] = w == 0 ? acc[e] : shared[lane * 4 + e] + acc[e];
    }
    __syncthreads();
  }
  if (threadIdx.x < kColsPerBlock && int64_t{blockIdx.x} * kColsPerBlock + threadIdx.x < cols)
    partials[int64_t{blockIdx.y} * cols + int64_t{blockIdx.x} * kColsPerBlock + threadIdx.x] = shared[threadIdx.x];
}

__global__ void column_sums_total(const float* __restrict__ partials, int64_t slabs, int64_t cols, void* out,
                                  DType type) {
  const int64_t col = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float sum = 0.f;
  for (int64_t s = 0; s < slabs; ++s) sum += partials[s * cols + col];
  store_as(out, type, col, sum);
}

}  // namespace

int64_t column_sum_slabs(int64_t rows, int64_t) { return rows > 0 ? (rows + kRowsPerSlab - 1) / kRowsPerSlab : 1; }

cudaError_t launch_column_sums(const void* in, DType in_type, int64_t rows, int64_t cols, float* partials, void* out,
                               DType out_type, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  const int64_t slabs = column_sum_slabs(rows, cols);
  const dim3 grid(static_cast<unsigned>((cols + kColsPerBlock - 1) / kColsPerBlock), static_cast<unsigned>(slabs));
  switch (in_type) {
    case DType::f32:
      column_sums_slab<<<grid, kWarps * 32, 0, stream>>>(static_cast<const float*>(in), rows, cols, partials);
      break;
    case DType::bf16:
      column_sums_slab<<<grid, kWarps * 32, 0, stream>>>(static_cast<const __nv_bfloat16*>(in), rows, cols, partials);
      break;
    case DType::f16:
      column_sums_slab<<<grid, kWarps * 32, 0, stream>>>(static_cast<const __half*>(in), rows, cols, partials);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  column_sums_total<<<static_cast<unsigned>((cols + 255) / 256), 256, 0, stream>>>(partials, slabs, cols, out, out_type);
  return cudaGetLastError();
}

}  // namespace scaletrain::model::cuda
