// CUDA kernels of the linear layers (include/scaletrain/model/fused_ops.h, linear and gelu_mlp):
// the column sums of d out (rows, cols) for the bias gradient, fp32 sums of bf16/fp16/fp32 rows;
// the MLP's tanh GELU, and its backward fused with those column sums.
//
// First pass: a block takes 32 N columns of a slab of rows; each lane reads N columns of a row
// (the sums: 16 bytes, N = 4 fp32 or 8 bf16/fp16 values, or N = 4, 8 bytes, for 16-bit rows whose
// width is not a multiple of 8; the GELU backward: N = 4), the block's 8 warps take every 8th row
// of the slab, four rows in flight per warp; the warps' sums are added in a fixed order into one
// row of partials per slab. Second
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

using core::cuda::from_float;
using core::cuda::store_as;
using core::cuda::to_float;

constexpr int kWarps = 8;
constexpr int kUnroll = 4;
constexpr int64_t kRowsPerSlab = 256;

// N consecutive values of T, for one 8- or 16-byte load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T x[N];
  __device__ float get(int e) const { return to_float(x[e]); }
  __device__ void set(int e, float v) { x[e] = from_float<T>(v); }
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

// The rows a slab pass reads: load() issues the loads of one lane's N columns of a row, use() adds
// them to the lane's sums (after whatever else the pass does with them).
template <typename T, int N>
struct SumRows {
  static constexpr int kN = N;
  using V = Pack<T, N>;
  using Loaded = V;
  const T* in;
  __device__ Loaded load(int64_t i) const { return *reinterpret_cast<const V*>(in + i); }
  __device__ void use(const Loaded& q, int64_t, float (&acc)[N]) const {
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] += q.get(e);
  }
};

template <typename T, int N>
struct GeluBackwardRows {
  static constexpr int kN = N;
  using V = Pack<T, N>;
  struct Loaded {
    V pre, grad;
  };
  const T* pre;
  T* grad;  // in: d act; out: d pre
  T* act;   // out: gelu(pre)
  __device__ Loaded load(int64_t i) const {
    return {*reinterpret_cast<const V*>(pre + i), *reinterpret_cast<const V*>(grad + i)};
  }
  __device__ void use(const Loaded& q, int64_t i, float (&acc)[N]) const {
    V a, d;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      float y;
      d.set(e, gelu_tanh_backward(q.pre.get(e), q.grad.get(e), y));
      a.set(e, y);
      acc[e] += d.get(e);  // the sum of d pre as stored (the GEMMs' operand)
    }
    *reinterpret_cast<V*>(act + i) = a;
    *reinterpret_cast<V*>(grad + i) = d;
  }
};

// N = 16 / sizeof(T) values per thread and step; n need not be a multiple of N.
template <typename T>
__global__ void gelu_forward(const T* __restrict__ in, T* __restrict__ out, int64_t n) {
  constexpr int N = 16 / sizeof(T);
  using V = Pack<T, N>;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x, first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t vectors = n / N;
  for (int64_t i = first; i < vectors; i += stride) {
    const V q = reinterpret_cast<const V*>(in)[i];
    V y;
#pragma unroll
    for (int e = 0; e < N; ++e) y.set(e, gelu_tanh(q.get(e)));
    reinterpret_cast<V*>(out)[i] = y;
  }
  const int64_t tail = vectors * N + first;
  if (tail < n) out[tail] = from_float<T>(gelu_tanh(to_float(in[tail])));
}

template <typename Rows>
__global__ void __launch_bounds__(kWarps * 32)
    column_sums_slab(const Rows pass, int64_t rows, int64_t cols, float* __restrict__ partials) {
  constexpr int N = Rows::kN, kColsPerBlock = 32 * N;
  __shared__ float shared[kColsPerBlock];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col = int64_t{blockIdx.x} * kColsPerBlock + lane * N;
  const int64_t first = int64_t{blockIdx.y} * kRowsPerSlab;
  const int64_t last = first + kRowsPerSlab < rows ? first + kRowsPerSlab : rows;
  float acc[N];
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = 0.f;
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
      for (int e = 0; e < N; ++e) shared[lane * N + e] = w == 0 ? acc[e] : shared[lane * N + e] + acc[e];
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < kColsPerBlock; c += kWarps * 32) {
    if (int64_t{blockIdx.x} * kColsPerBlock + c < cols)
      partials[int64_t{blockIdx.y} * cols + int64_t{blockIdx.x} * kColsPerBlock + c] = shared[c];
  }
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
  constexpr int kColsPerBlock = 32 * Rows::kN;
  const int64_t slabs = column_sum_slabs(rows, cols);
  const dim3 grid(static_cast<unsigned>((cols + kColsPerBlock - 1) / kColsPerBlock), static_cast<unsigned>(slabs));
  column_sums_slab<<<grid, kWarps * 32, 0, stream>>>(pass, rows, cols, partials);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || out == nullptr) return status;
  column_sums_total<<<static_cast<unsigned>((cols + 255) / 256), 256, 0, stream>>>(partials, slabs, cols, out, out_type);
  return cudaGetLastError();
}

// 16-byte accesses where every row starts 16-byte aligned (the callers align the base), else 8.
template <typename T>
bool wide_rows(int64_t cols) {
  return cols % (16 / static_cast<int64_t>(sizeof(T))) == 0;
}

template <typename T>
cudaError_t sum_columns(const void* in, int64_t rows, int64_t cols, float* partials, void* out, DType out_type,
                        cudaStream_t stream) {
  const auto* p = static_cast<const T*>(in);
  if (wide_rows<T>(cols))
    return column_sum_passes(SumRows<T, 16 / sizeof(T)>{p}, rows, cols, partials, out, out_type, stream);
  return column_sum_passes(SumRows<T, 4>{p}, rows, cols, partials, out, out_type, stream);
}

// Four columns a lane for every dtype: with 8 bf16 columns (16 bytes) the GPT-2 124M pass measured
// 1.48 against 1.43 ms a step on the H200 (3072 columns give 768 blocks of 256 columns x 256 rows,
// below one wave of 1056; 1536 blocks with four).
template <typename T>
cudaError_t gelu_backward_columns(const void* pre, void* grad, void* act, int64_t rows, int64_t cols, float* partials,
                                  void* bias_grad, DType bias_type, cudaStream_t stream) {
  return column_sum_passes(GeluBackwardRows<T, 4>{static_cast<const T*>(pre), static_cast<T*>(grad), static_cast<T*>(act)},
                           rows, cols, partials, bias_grad, bias_type, stream);
}

template <typename T>
cudaError_t gelu(const void* in, void* out, int64_t n, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t wanted = (n / (16 / static_cast<int64_t>(sizeof(T))) + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(wanted < 1 ? 1 : wanted < 8192 ? wanted : 8192);
  gelu_forward<<<blocks, threads, 0, stream>>>(static_cast<const T*>(in), static_cast<T*>(out), n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_column_sums(const void* in, DType in_type, int64_t rows, int64_t cols, float* partials, void* out,
                               DType out_type, cudaStream_t stream) {
  switch (in_type) {
    case DType::f32:
      return sum_columns<float>(in, rows, cols, partials, out, out_type, stream);
    case DType::bf16:
      return sum_columns<__nv_bfloat16>(in, rows, cols, partials, out, out_type, stream);
    case DType::f16:
      return sum_columns<__half>(in, rows, cols, partials, out, out_type, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_gelu(const void* in, void* out, DType type, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (type) {
    case DType::f32:
      return gelu<float>(in, out, n, stream);
    case DType::bf16:
      return gelu<__nv_bfloat16>(in, out, n, stream);
    case DType::f16:
      return gelu<__half>(in, out, n, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_gelu_backward(const void* pre, void* grad, void* act, DType type, int64_t rows, int64_t cols,
                                 float* partials, void* bias_grad, DType bias_type, cudaStream_t stream) {
  switch (type) {
    case DType::f32:
      return gelu_backward_columns<float>(pre, grad, act, rows, cols, partials, bias_grad, bias_type, stream);
    case DType::bf16:
      return gelu_backward_columns<__nv_bfloat16>(pre, grad, act, rows, cols, partials, bias_grad, bias_type, stream);
    case DType::f16:
      return gelu_backward_columns<__half>(pre, grad, act, rows, cols, partials, bias_grad, bias_type, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace scaletrain::model::cuda
