// Multi-tensor kernels of the fused gradient pass (see include/scaletrain/amp/grad_check.h).
//
// One launch covers up to kMaxTensors tensors: their pointers, sizes and first chunk travel in
// the kernel's parameter block, each thread block handles one chunk of kChunkElements elements
// of one tensor (found by binary search over the chunk offsets) with 16-byte vector loads, four
// in flight per thread. Per chunk sums of squares go to a workspace and are added in a fixed
// order by one block, so the norm is deterministic.
#include <cfloat>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "grad_check_cuda.h"
#include "core/cuda_convert.cuh"

namespace scaletrain::amp::cuda {
namespace {

constexpr int kThreads = 256;
// 256 tensors (6 KB of kernel parameters; sm_70 and later take up to 32 KB): one launch for
// the 148 parameters of GPT-2 124M. Each launch boundary drains and refills the GPU (~10 us).
constexpr int kMaxTensors = 256;

struct TensorBatch {
  void* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_begin[kMaxTensors + 1];  // chunk offsets within this launch
  int count;
};

using core::cuda::from_float;
using core::cuda::to_float;

// The tensor and the element range of this block's chunk.
template <typename T>
struct Chunk {
  T* data;
  int64_t size;
};

template <typename T>
__device__ __forceinline__ Chunk<T> locate_chunk(const TensorBatch& batch) {
  int64_t chunk = blockIdx.x;
  int lo = 0, hi = batch.count - 1;
  while (lo < hi) {  // last tensor whose first chunk is <= chunk
    int mid = (lo + hi + 1) / 2;
    if (batch.chunk_begin[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  int64_t start = (chunk - batch.chunk_begin[lo]) * kChunkElements;
  int64_t size = batch.numel[lo] - start;
  if (size > kChunkElements) size = kChunkElements;
  return {static_cast<T*>(batch.data[lo]) + start, size};
}

// Calls f(value) -> new value (or ignored when !kWrite) on every element of the chunk, kUnroll
// 16-byte vectors in flight per thread.
template <typename T, bool kWrite, typename F>
__device__ __forceinline__ void for_each_element(Chunk<T> chunk, F f) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kUnroll = 4;
  auto apply = [&f](uint4& raw) {
    T* values = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) values[j] = from_float<T>(f(to_float(values[j])));
  };
  int64_t vectors = 0;
  if (reinterpret_cast<uintptr_t>(chunk.data) % 16 == 0) {
    vectors = chunk.size / kVec;
    uint4* vec = reinterpret_cast<uint4*>(chunk.data);
    constexpr int64_t kStride = int64_t{kThreads} * kUnroll;
    const int64_t unrolled = vectors / kStride * kStride;
    for (int64_t i = threadIdx.x; i < unrolled; i += kStride) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = vec[i + u * kThreads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        apply(raw[u]);
        if (kWrite) vec[i + u * kThreads] = raw[u];
      }
    }
    for (int64_t i = unrolled + threadIdx.x; i < vectors; i += kThreads) {
      uint4 raw = vec[i];
      apply(raw);
      if (kWrite) vec[i] = raw;
    }
  }
  for (int64_t i = vectors * kVec + threadIdx.x; i < chunk.size; i += kThreads) {
    float out = f(to_float(chunk.data[i]));
    if (kWrite) chunk.data[i] = from_float<T>(out);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc value) {
  __shared__ Acc warp_sums[32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : Acc(0);
  if (warp == 0)
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;  // valid in thread 0
}

// Pass 1: inf/NaN flag and sum of squares of g * inv_scale; with kWrite also g = g * inv_scale.
template <typename T, bool kWrite>
__global__ void __launch_bounds__(kThreads) check_kernel(TensorBatch batch, InvScale inv, float* workspace,
                                                         int64_t first_chunk) {
  const float inv_scale = inv.device ? *inv.device : inv.value;
  const Chunk<T> chunk = locate_chunk<T>(batch);
  float squares = 0.f;
  bool bad = false;
  for_each_element<T, kWrite>(chunk, [&](float g) {
    const float v = g * inv_scale;
    bad |= !(fabsf(v) <= FLT_MAX);  // false for inf and NaN
    squares = fmaf(v, v, squares);
    return v;
  });
  const bool any_bad = __syncthreads_or(bad);
  squares = block_sum(squares);
  if (threadIdx.x == 0) {
    workspace[kWorkspaceHeader + first_chunk + blockIdx.x] = squares;
    if (any_bad) workspace[0] = 1.f;
  }
}

__global__ void __launch_bounds__(1024) finalize_kernel(float* workspace, int64_t chunks, InvScale inv,
                                                        float max_norm) {
  const float inv_scale = inv.device ? *inv.device : inv.value;
  double sum = 0;
  for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) sum += workspace[kWorkspaceHeader + i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    const float norm = static_cast<float>(sqrt(sum));
    float coef = 1.f;
    if (max_norm > 0.f) coef = fminf(1.f, max_norm / (norm + 1e-6f));
    workspace[1] = norm;
    workspace[2] = inv_scale * coef;
  }
}

// Pass 2: g *= factor, skipped by every block when found_inf or factor == 1.
template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(TensorBatch batch, const float* workspace) {
  const float found_inf = workspace[0], factor = workspace[2];
  if (found_inf != 0.f || factor == 1.f) return;
  for_each_element<T, true>(locate_chunk<T>(batch), [factor](float g) { return g * factor; });
}

// Splits `spans` into batches of at most kMaxTensors and calls launch(batch, blocks, chunk offset).
template <typename Launch>
cudaError_t for_each_batch(const GradSpan* spans, int64_t count, Launch launch) {
  int64_t chunk_offset = 0;
  for (int64_t first = 0; first < count; first += kMaxTensors) {
    TensorBatch batch{};
    batch.count = static_cast<int>(count - first < kMaxTensors ? count - first : kMaxTensors);
    int64_t chunks = 0;
    for (int i = 0; i < batch.count; ++i) {
      batch.data[i] = spans[first + i].data;
      batch.numel[i] = spans[first + i].numel;
      batch.chunk_begin[i] = chunks;
      chunks += chunks_of(spans[first + i].numel);
    }
    batch.chunk_begin[batch.count] = chunks;
    if (chunks > 0) launch(batch, chunks, chunk_offset);
    chunk_offset += chunks;
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_check_typed(const GradSpan* spans, int64_t count, InvScale inv_scale, bool write, float* workspace,
                               int64_t first_chunk, cudaStream_t stream) {
  return for_each_batch(spans, count, [&](const TensorBatch& batch, int64_t blocks, int64_t offset) {
    auto kernel = write ? check_kernel<T, true> : check_kernel<T, false>;
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch, inv_scale, workspace, first_chunk + offset);
  });
}

template <typename T>
cudaError_t launch_scale_typed(const GradSpan* spans, int64_t count, const float* workspace, cudaStream_t stream) {
  return for_each_batch(spans, count, [&](const TensorBatch& batch, int64_t blocks, int64_t) {
    scale_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch, workspace);
  });
}

}  // namespace

cudaError_t launch_check(const GradSpan* spans, int64_t count, GradType type, InvScale inv_scale, bool write,
                         float* workspace, int64_t first_chunk, cudaStream_t stream) {
  switch (type) {
    case GradType::f32: return launch_check_typed<float>(spans, count, inv_scale, write, workspace, first_chunk, stream);
    case GradType::f16: return launch_check_typed<__half>(spans, count, inv_scale, write, workspace, first_chunk, stream);
    case GradType::bf16:
      return launch_check_typed<__nv_bfloat16>(spans, count, inv_scale, write, workspace, first_chunk, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_finalize(float* workspace, int64_t chunks, InvScale inv_scale, float max_norm, cudaStream_t stream) {
  finalize_kernel<<<1, 1024, 0, stream>>>(workspace, chunks, inv_scale, max_norm);
  return cudaGetLastError();
}

cudaError_t launch_scale(const GradSpan* spans, int64_t count, GradType type, const float* workspace,
                         cudaStream_t stream) {
  switch (type) {
    case GradType::f32: return launch_scale_typed<float>(spans, count, workspace, stream);
    case GradType::f16: return launch_scale_typed<__half>(spans, count, workspace, stream);
    case GradType::bf16: return launch_scale_typed<__nv_bfloat16>(spans, count, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

namespace {

__global__ void update_scale_kernel(double* state, float* scale, float* inv_scale, const float* found_inf,
                                    ScaleRule rule) {
  update_scale(state, *found_inf != 0.f, rule);
  *scale = static_cast<float>(state[kScale]);
  *inv_scale = static_cast<float>(1.0 / state[kScale]);
}

}  // namespace

cudaError_t launch_update_scale(double* state, float* scale, float* inv_scale, const float* found_inf,
                                const ScaleRule& rule, cudaStream_t stream) {
  update_scale_kernel<<<1, 1, 0, stream>>>(state, scale, inv_scale, found_inf, rule);
  return cudaGetLastError();
}

}  // namespace scaletrain::amp::cuda
