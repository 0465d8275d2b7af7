// CUDA kernels of the linear layers (include/scaletrain/model/fused_ops.h, linear and gelu_mlp):
// the column sums of d out (rows, cols) for the bias gradient, fp32 sums of bf16/fp16/fp32 rows;
// the MLP's tanh GELU, and its backward fused with those column sums.
//
// First pass: a block takes 128 columns of a slab of rows; each lane reads 4 columns (8 or 16
// bytes) of a row, the block's 8 warps take every 8th row of the slab, four rows in flight per
// warp; the warps' sums are added in a fixed order into one row of partials per slab. Second
// pass: a thread per column adds the slabs' partials in order. No atomics: deterministic. The
// GELU backward is the same first pass, whose rows are d pre = d act gelu'(pre), written back
// over d act together with the recomputed gelu(pre) as it goes.
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
  __device__ static float get(const float4& q, int e) { return reinterpret_cast<const float*>(&q)[e]; }
  __device__ static void set(float4& q, int e, float x) { reinterpret_cast<float*>(&q)[e] = x; }
};
template <>
struct Vec4<__nv_bfloat16> {
  using type = BFloat4;
  __device__ static float get(const BFloat4& q, int e) { return to_float(q.x[e]); }
  __device__ static void set(BFloat4& q, int e, float x) { q.x[e] = from_float<__nv_bfloat16>(x); }
};
template <>
struct Vec4<__half> {
  using type = Half4;
  __device__ static float get(const Half4& q, int e) { return to_float(q.x[e]); }
  __device__ static void set(Half4& q, int e, float x) { q.x[e] = from_float<__half>(x); }
};

// The tanh GELU in fp32 as ATen computes it, each rounding pinned so that the forward kernel and
// the backward's recomputation give the same bits.
constexpr float kGeluBeta = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluKappa = 0.044715f;
__device__ __forceinline__ float gelu_tanh_of(float x, float t) { return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.f, t)); }
__device__ __forceinline__ float gelu_tanh_inner(float x) {
  return tanhf(__fmul_rn(kGeluBeta, __fadd_rn(x, __fmul_rn(kGeluKappa, __fmul_rn(__fmul_rn(x, x), x)))));
}
__device__ __forceinline__ float gelu_tanh(float x) { return gelu_tanh_of(x, gelu_tanh_inner(x)); }
// dy gelu'(x), and gelu(x) into y.
__device__ __forceinline__ float gelu_tanh_backward(float x, float dy, float& y) {
  const float t = gelu_tanh_inner(x);
  y = gelu_tanh_of(x, t);
  const float inner_derivative = kGeluBeta * (1.f + 3.f * kGeluKappa * x * x);
  return dy * (0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * inner_derivative);
}

// The rows a slab pass reads: load() issues the loads of one 4-column group, use() adds it to the
// lane's sums (after whatever else the pass does with it).
template <typename T>
struct SumRows {
  using V = typename Vec4<T>::type;
  using Loaded = V;
  const T* in;
  __device__ Loaded load(int64_t i) const { return *reinterpret_cast<const V*>(in + i); }
  __device__ void use(const Loaded& q, int64_t, float (&acc)[4]) const {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] += Vec4<T>::get(q, e);
  }
};

template <typename T>
struct GeluBackwardRows {
  using V = typename Vec4<T>::type;
  struct Loaded {
    V pre, grad;
  };
  const T* pre;
  T* grad;  // in: d act; out: d pre
  T* act;   // out: gelu(pre)
  __device__ Loaded load(int64_t i) const {
    return {*reinterpret_cast<const V*>(pre + i), *reinterpret_cast<const V*>(grad + i)};
  }
  __device__ void use(const Loaded& q, int64_t i, float (&acc)[4]) const {
    V a, d;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float y;
      Vec4<T>::set(d, e, gelu_tanh_backward(Vec4<T>::get(q.pre, e), Vec4<T>::get(q.grad, e), y));
      Vec4<T>::set(a, e, y);
      acc[e] += Vec4<T>::get(d, e);  // the sum of d pre as stored (the GEMMs' operand)
    }
    *reinterpret_cast<V*>(act + i) = a;
    *reinterpret_cast<V*>(grad + i) = d;
  }
};

template <typename T>
__global__ void gelu_forward(const T* __restrict__ in, T* __restrict__ out, int64_t n) {
  using V = typename Vec4<T>::type;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x, first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t vectors = n / 4;
  for (int64_t i = first; i < vectors; i += stride) {
    const V q = reinterpret_cast<const V*>(in)[i];
    V y;
#pragma unroll
    for (int e = 0; e < 4; ++e) Vec4<T>::set(y, e, gelu_tanh(Vec4<T>::get(q, e)));
    reinterpret_cast<V*>(out)[i] = y;
  }
  const int64_t tail = vectors * 4 + first;
  if (tail < n) out[tail] = from_float<T>(gelu_tanh(to_float(in[tail])));
}

template <typename Rows>
__global__ void __launch_bounds__(kWarps * 32)
    column_sums_slab(const Rows pass, int64_t rows, int64_t cols, float* __restrict__ partials) {
  __shared__ float shared[kColsPerBlock];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col = int64_t{blockIdx.x} * kColsPerBlock + lane * 4;
  const int64_t first = int64_t{blockIdx.y} * kRowsPerSlab;
  const int64_t last = first + kRowsPerSlab < rows ? first + kRowsPerSlab : rows;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (col < cols) {
    int64_t row = first + warp;
    for (; row + (kUnroll - 1) * kWarps < last; row += kUnroll * kWarps) {
      typename Rows::Loaded q[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) q[u] = pass.load((row + u * kWarps) * cols + col);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) pass.use(q[u], (row + u * kWarps) * cols + col, acc);
    }
    for (; row < last; row += kWarps) pass.use(pass.load(row * cols + col), row * cols + col, acc);
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

namespace {

// The slab pass over `rows`, then (out not null) the slabs' sums into out.
template <typename Rows>
cudaError_t column_sum_passes(const Rows& pass, int64_t rows, int64_t cols, float* partials, void* out,
                             DType out_type, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  const int64_t slabs = column_sum_slabs(rows, cols);
  const dim3 grid(static_cast<unsigned>((cols + kColsPerBlock - 1) / kColsPerBlock), static_cast<unsigned>(slabs));
  column_sums_slab<<<grid, kWarps * 32, 0, stream>>>(pass, rows, cols, partials);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || out == nullptr) return status;
  column_sums_total<<<static_cast<unsigned>((cols + 255) / 256), 256, 0, stream>>>(partials, slabs, cols, out, out_type);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_column_sums(const void* in, DType in_type, int64_t rows, int64_t cols, float* partials, void* out,
                               DType out_type, cudaStream_t stream) {
  switch (in_type) {
    case DType::f32:
      return column_sum_passes(SumRows<float>{static_cast<const float*>(in)}, rows, cols, partials, out, out_type, stream);
    case DType::bf16:
      return column_sum_passes(SumRows<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(in)}, rows, cols, partials,
                               out, out_type, stream);
    case DType::f16:
      return column_sum_passes(SumRows<__half>{static_cast<const __half*>(in)}, rows, cols, partials, out, out_type,
                               stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_gelu(const void* in, void* out, DType type, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int threads = 256;
  const int64_t wanted = (n / 4 + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(wanted < 1 ? 1 : wanted < 8192 ? wanted : 8192);
  switch (type) {
    case DType::f32:
      gelu_forward<<<blocks, threads, 0, stream>>>(static_cast<const float*>(in), static_cast<float*>(out), n);
      break;
    case DType::bf16:
      gelu_forward<<<blocks, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(in),
                                                   static_cast<__nv_bfloat16*>(out), n);
      break;
    case DType::f16:
      gelu_forward<<<blocks, threads, 0, stream>>>(static_cast<const __half*>(in), static_cast<__half*>(out), n);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_gelu_backward(const void* pre, void* grad, void* act, DType type, int64_t rows, int64_t cols,
                                 float* partials, void* bias_grad, DType bias_type, cudaStream_t stream) {
  switch (type) {
    case DType::f32:
      return column_sum_passes(GeluBackwardRows<float>{static_cast<const float*>(pre), static_cast<float*>(grad),
                                                       static_cast<float*>(act)},
                               rows, cols, partials, bias_grad, bias_type, stream);
    case DType::bf16:
      return column_sum_passes(
          GeluBackwardRows<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(pre), static_cast<__nv_bfloat16*>(grad),
                                          static_cast<__nv_bfloat16*>(act)},
          rows, cols, partials, bias_grad, bias_type, stream);
    case DType::f16:
      return column_sum_passes(GeluBackwardRows<__half>{static_cast<const __half*>(pre), static_cast<__half*>(grad),
                                                        static_cast<__half*>(act)},
                               rows, cols, partials, bias_grad, bias_type, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace scaletrain::model::cuda
