// CUDA kernels of the fused GPT ops (see include/scaletrain/model/fused_ops.h).
//
// RoPE: one thread per (token, head, group of kVec pair indices) reads the q, k and v elements of
// its pairs from the qkv projection, rotates q's and k's in fp32 and writes all three in the
// (batch, seq, heads, head_dim) layout that scaled_dot_product_attention takes without a copy.
// Products and sums are rounded one by one (__fmul_rn, __fadd_rn: no contraction into FMAs), so
// the results are those of the unfused ATen expression, bit for bit.
//
// Cross-entropy: one thread block per row. Forward streams the row once with an online maximum
// and sum of exponentials (16-byte loads), combines the threads' pairs, and writes the row's loss
// and log-sum-exp; backward streams the row again and writes (softmax - one-hot) x scale in the
// logits' dtype, zeros past `classes`.
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda_convert.cuh"
#include "fused_ops_cuda.h"

namespace scaletrain::model::cuda {
namespace {

using core::cuda::from_float;
using core::cuda::to_float;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T x[V];
};

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_float(pack.x[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int j = 0; j < V; ++j) pack.x[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

template <typename T, int V>
__device__ __forceinline__ void copy(const T* from, T* to) {
  *reinterpret_cast<Pack<T, V>*>(to) = *reinterpret_cast<const Pack<T, V>*>(from);
}

int64_t blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  return blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks;
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The (token, head, first pair index) of work item i, and its offset into the tables.
struct RopeItem {
  int64_t row, head, j, table;
};

__device__ __forceinline__ RopeItem rope_item(int64_t i, const RopeShape& s, int64_t groups, int vec) {
  RopeItem it;
  it.j = (i % groups) * vec;
  it.head = (i / groups) % s.heads;
  it.row = i / (groups * s.heads);
  it.table = (it.row / s.seq) * s.table_batch_stride + (it.row % s.seq) * s.half + it.j;
  return it;
}

template <typename T, int V>
__global__ void rope_forward(const T* __restrict__ qkv, const float* __restrict__ cos, const float* __restrict__ sin,
                             T* __restrict__ q, T* __restrict__ k, T* __restrict__ v, RopeShape s) {
  const int64_t groups = s.half / V, dim = 2 * s.half, width = s.heads * dim;
  const int64_t total = s.batch * s.seq * s.heads * groups;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const RopeItem it = rope_item(i, s, groups, V);
    float c[V], sn[V];
    load<float, V>(cos + it.table, c);
    load<float, V>(sin + it.table, sn);
    const T* in = qkv + it.row * 3 * width + it.head * dim + it.j;
    const int64_t out = it.row * width + it.head * dim + it.j;
    T* const outs[2] = {q + out, k + out};
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      float x1[V], x2[V], y1[V], y2[V];
      load<T, V>(in + part * width, x1);
      load<T, V>(in + part * width + s.half, x2);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        y1[e] = __fsub_rn(__fmul_rn(x1[e], c[e]), __fmul_rn(x2[e], sn[e]));  // x1 cos - x2 sin
        y2[e] = __fadd_rn(__fmul_rn(x2[e], c[e]), __fmul_rn(x1[e], sn[e]));  // x2 cos + x1 sin
      }
      store<T, V>(outs[part], y1);
      store<T, V>(outs[part] + s.half, y2);
    }
    copy<T, V>(in + 2 * width, v + out);
    copy<T, V>(in + 2 * width + s.half, v + out + s.half);
  }
}

template <typename T, int V>
__global__ void rope_backward(const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv,
                              HeadStrides sq, HeadStrides sk, HeadStrides sv, const float* __restrict__ cos,
                              const float* __restrict__ sin, T* __restrict__ dqkv, RopeShape s) {
  const int64_t groups = s.half / V, dim = 2 * s.half, width = s.heads * dim;
  const int64_t total = s.batch * s.seq * s.heads * groups;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const RopeItem it = rope_item(i, s, groups, V);
    const int64_t b = it.row / s.seq, t = it.row % s.seq;
    float c[V], sn[V];
    load<float, V>(cos + it.table, c);
    load<float, V>(sin + it.table, sn);
    T* out = dqkv + it.row * 3 * width + it.head * dim + it.j;
    const T* grads[2] = {dq + b * sq.batch + it.head * sq.head + t * sq.seq + it.j,
                         dk + b * sk.batch + it.head * sk.head + t * sk.seq + it.j};
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      float g1[V], g2[V], d1[V], d2[V];
      load<T, V>(grads[part], g1);
      load<T, V>(grads[part] + s.half, g2);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        d1[e] = __fadd_rn(__fmul_rn(g1[e], c[e]), __fmul_rn(g2[e], sn[e]));  // g1 cos + g2 sin
        d2[e] = __fsub_rn(__fmul_rn(g2[e], c[e]), __fmul_rn(g1[e], sn[e]));  // g2 cos - g1 sin
      }
      store<T, V>(out + part * width, d1);
      store<T, V>(out + part * width + s.half, d2);
    }
    const T* gv = dv + b * sv.batch + it.head * sv.head + t * sv.seq + it.j;
    copy<T, V>(gv, out + 2 * width);
    copy<T, V>(gv + s.half, out + 2 * width + s.half);
  }
}

template <typename T>
cudaError_t rope_forward_typed(const void* qkv, const float* cos, const float* sin, void* q, void* k, void* v,
                               const RopeShape& s, cudaStream_t stream) {
  constexpr int V = 4;
  // Dense tensors from the caching allocator: every group of V pair indices is V-aligned when
  // half is a multiple of V (and the tables' rows, half floats, are 16-byte aligned).
  const bool vec = s.half % V == 0 && aligned16(qkv) && aligned16(cos) && aligned16(sin) && aligned16(q) &&
                   aligned16(k) && aligned16(v);
  const int64_t items = s.batch * s.seq * s.heads * (vec ? s.half / V : s.half);
  const auto* in = static_cast<const T*>(qkv);
  auto *oq = static_cast<T*>(q), *ok = static_cast<T*>(k), *ov = static_cast<T*>(v);
  if (vec)
    rope_forward<T, V><<<blocks_for(items), kThreads, 0, stream>>>(in, cos, sin, oq, ok, ov, s);
  else
    rope_forward<T, 1><<<blocks_for(items), kThreads, 0, stream>>>(in, cos, sin, oq, ok, ov, s);
  return cudaGetLastError();
}

bool strides_multiple_of(const HeadStrides& h, int64_t v) {
  return h.batch % v == 0 && h.head % v == 0 && h.seq % v == 0;
}

template <typename T>
cudaError_t rope_backward_typed(const void* dq, const void* dk, const void* dv, const HeadStrides& sq,
                                const HeadStrides& sk, const HeadStrides& sv, const float* cos, const float* sin,
                                void* dqkv, const RopeShape& s, cudaStream_t stream) {
  constexpr int V = 4;
  const bool vec = s.half % V == 0 && aligned16(dq) && aligned16(dk) && aligned16(dv) && aligned16(cos) &&
                   aligned16(sin) && aligned16(dqkv) && strides_multiple_of(sq, V) && strides_multiple_of(sk, V) &&
                   strides_multiple_of(sv, V);
  const int64_t items = s.batch * s.seq * s.heads * (vec ? s.half / V : s.half);
  const auto *gq = static_cast<const T*>(dq), *gk = static_cast<const T*>(dk), *gv = static_cast<const T*>(dv);
  auto* out = static_cast<T*>(dqkv);
  if (vec)
    rope_backward<T, V><<<blocks_for(items), kThreads, 0, stream>>>(gq, gk, gv, sq, sk, sv, cos, sin, out, s);
  else
    rope_backward<T, 1><<<blocks_for(items), kThreads, 0, stream>>>(gq, gk, gv, sq, sk, sv, cos, sin, out, s);
  return cudaGetLastError();
}

// ---- cross-entropy ----

// Adds x to the running (max, sum of exp(x - max)) pair.
__device__ __forceinline__ void online_add(float& m, float& sum, float x) {
  if (x > m) {
    sum = sum * expf(m - x) + 1.f;  // m = -inf at the start: 0 * 0 + 1
    m = x;
  } else {
    sum += x == -INFINITY ? 0.f : expf(x - m);  // NaN propagates
  }
}

// Adds V values at once: their maximum first, one rescale of the pair, then V exponentials that do
// not wait on one another (element by element, each exponential waited on the previous rescale and
// sum, and the kernel ran at half the bytes' speed). Same semantics: -inf adds nothing, NaN
// propagates (fmaxf skips it, its exponential does not), +inf makes the sum NaN.
template <int V>
__device__ __forceinline__ void online_add(float& m, float& sum, const float (&x)[V]) {
  float top = x[0];
#pragma unroll
  for (int e = 1; e < V; ++e) top = fmaxf(top, x[e]);
  if (top > m) {
    sum = m == -INFINITY ? sum * 0.f : sum * expf(m - top);
    m = top;
  }
  float part = 0.f;
  if (m == -INFINITY) {  // only -inf and NaN so far: -inf adds nothing (exp(-inf - -inf) would be NaN)
#pragma unroll
    for (int e = 0; e < V; ++e) part += x[e] == -INFINITY ? 0.f : expf(x[e] - m);
  } else {
    // The fast exponential (ex2.approx of x * log2 e, relative error about 2^-21 on terms of at
    // most 1): the pass is bound by its instructions otherwise, not by its bytes.
#pragma unroll
    for (int e = 0; e < V; ++e) part += __expf(x[e] - m);
  }
  sum += part;
}

// Merges another thread's pair. A pair that saw only NaN and -inf has max -inf and sum NaN: the
// products with 0 below keep that NaN (0 * NaN = NaN, 0 * 0 = 0) instead of dropping it.
__device__ __forceinline__ void online_combine(float& m, float& sum, float m2, float sum2) {
  if (m2 > m) {
    sum = (m == -INFINITY ? sum * 0.f : sum * expf(m - m2)) + sum2;
    m = m2;
  } else if (m2 != -INFINITY) {
    sum += sum2 * expf(m2 - m);
  } else {
    sum += sum2 * 0.f;
  }
}

// log(sum(exp(x))) from the pair; NaN for a +inf maximum, as ATen's log_softmax (inf - inf).
__device__ __forceinline__ float log_sum_exp(float m, float sum) { return m == INFINITY ? NAN : m + logf(sum); }

template <typename T>
__global__ void cross_entropy_forward(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                                      CrossEntropyShape s, float* __restrict__ loss, float* __restrict__ lse) {
  constexpr int V = 16 / sizeof(T);
  __shared__ float shared_m[kThreads / 32], shared_s[kThreads / 32];
  const int64_t r = blockIdx.x;
  const T* row = logits + r * s.row_stride;
  float m = -INFINITY, sum = 0.f;
  // Thread i sums the groups of V elements i, i + blockDim, ... then the tail, whether the row is
  // aligned for vector loads or not: the same order, so a row's lse does not depend on its address.
  const int64_t vectors = s.classes / V;
  const bool aligned = aligned16(row);
  const auto load_vector = [&](int64_t i, float (&x)[V]) {
    if (aligned) {
      load<T, V>(row + i * V, x);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] = to_float(row[i * V + e]);
    }
  };
  int64_t i = threadIdx.x;
  for (; i + blockDim.x < vectors; i += 2 * blockDim.x) {  // two loads in flight
    float x[V], y[V];
    load_vector(i, x);
    load_vector(i + blockDim.x, y);
    online_add(m, sum, x);
    online_add(m, sum, y);
  }
  if (i < vectors) {
    float x[V];
    load_vector(i, x);
    online_add(m, sum, x);
  }
  for (int64_t c = vectors * V + threadIdx.x; c < s.classes; c += blockDim.x) online_add(m, sum, to_float(row[c]));
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    online_combine(m, sum, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, sum, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared_m[warp] = m, shared_s[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) online_combine(m, sum, shared_m[w], shared_s[w]);
    const float row_lse = log_sum_exp(m, sum);
    const int64_t t = targets[r];
    float value;
    if (t == s.ignore_index) value = 0.f;
    else if (t < 0 || t >= s.classes) value = NAN;
    else value = row_lse - to_float(row[t]);
    loss[r] = value;
    lse[r] = row_lse;
  }
}

__device__ __forceinline__ float ce_grad(float x, int64_t c, int64_t t, float row_lse, float g, int64_t classes) {
  return c < classes ? __fmul_rn(expf(x - row_lse) - (c == t ? 1.f : 0.f), g) : 0.f;
}

template <typename T>
__global__ void cross_entropy_backward(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                                       const float* __restrict__ lse, const float* __restrict__ scale,
                                       int64_t scale_stride, CrossEntropyShape s, int64_t columns,
                                       T* __restrict__ grad) {
  constexpr int V = 16 / sizeof(T);
  const int64_t r = blockIdx.x;
  const T* row = logits + r * s.row_stride;
  T* out = grad + r * columns;
  const int64_t t = targets[r];
  const bool counts = t != s.ignore_index && t >= 0 && t < s.classes;
  const float g = counts ? scale[r * scale_stride] : 0.f, row_lse = lse[r];
  // Columns past `classes` are not read: the row may hold fewer readable elements than `columns`.
  const int64_t vectors = aligned16(row) && aligned16(out) ? s.classes / V : 0;
  for (int64_t i = threadIdx.x; i < vectors; i += blockDim.x) {
    float x[V], y[V];
    load<T, V>(row + i * V, x);
#pragma unroll
    for (int e = 0; e < V; ++e) y[e] = counts ? ce_grad(x[e], i * V + e, t, row_lse, g, s.classes) : 0.f;
    store<T, V>(out + i * V, y);
  }
  for (int64_t c = vectors * V + threadIdx.x; c < columns; c += blockDim.x) {
    const float y = counts && c < s.classes ? ce_grad(to_float(row[c]), c, t, row_lse, g, s.classes) : 0.f;
    out[c] = from_float<T>(y);
  }
}

template <typename T>
cudaError_t cross_entropy_forward_typed(const void* logits, const int64_t* targets, const CrossEntropyShape& s,
                                        float* loss, float* lse, cudaStream_t stream) {
  if (s.rows == 0) return cudaSuccess;
  cross_entropy_forward<T><<<s.rows, kThreads, 0, stream>>>(static_cast<const T*>(logits), targets, s, loss, lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t cross_entropy_backward_typed(const void* logits, const int64_t* targets, const float* lse,
                                         const float* scale, int64_t scale_stride, const CrossEntropyShape& s,
                                         int64_t columns, void* grad, cudaStream_t stream) {
  if (s.rows == 0) return cudaSuccess;
  cross_entropy_backward<T><<<s.rows, kThreads, 0, stream>>>(static_cast<const T*>(logits), targets, lse, scale,
                                                              scale_stride, s, columns, static_cast<T*>(grad));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_rope_forward(DType type, const void* qkv, const float* cos, const float* sin, void* q, void* k,
                                void* v, const RopeShape& shape, cudaStream_t stream) {
  switch (type) {
    case DType::f32: return rope_forward_typed<float>(qkv, cos, sin, q, k, v, shape, stream);
    case DType::f16: return rope_forward_typed<__half>(qkv, cos, sin, q, k, v, shape, stream);
    case DType::bf16: return rope_forward_typed<__nv_bfloat16>(qkv, cos, sin, q, k, v, shape, stream);
    case DType::none: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_rope_backward(DType type, const void* dq, const void* dk, const void* dv, const HeadStrides& sq,
                                 const HeadStrides& sk, const HeadStrides& sv, const float* cos, const float* sin,
                                 void* dqkv, const RopeShape& shape, cudaStream_t stream) {
  switch (type) {
    case DType::f32: return rope_backward_typed<float>(dq, dk, dv, sq, sk, sv, cos, sin, dqkv, shape, stream);
    case DType::f16: return rope_backward_typed<__half>(dq, dk, dv, sq, sk, sv, cos, sin, dqkv, shape, stream);
    case DType::bf16:
      return rope_backward_typed<__nv_bfloat16>(dq, dk, dv, sq, sk, sv, cos, sin, dqkv, shape, stream);
    case DType::none: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_cross_entropy_forward(DType type, const void* logits, const int64_t* targets,
                                         const CrossEntropyShape& shape, float* loss, float* lse,
                                         cudaStream_t stream) {
  switch (type) {
    case DType::f32: return cross_entropy_forward_typed<float>(logits, targets, shape, loss, lse, stream);
    case DType::f16: return cross_entropy_forward_typed<__half>(logits, targets, shape, loss, lse, stream);
    case DType::bf16: return cross_entropy_forward_typed<__nv_bfloat16>(logits, targets, shape, loss, lse, stream);
    case DType::none: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_cross_entropy_backward(DType type, const void* logits, const int64_t* targets, const float* lse,
                                          const float* scale, int64_t scale_stride, const CrossEntropyShape& shape,
                                          int64_t columns, void* grad, cudaStream_t stream) {
  switch (type) {
    case DType::f32:
      return cross_entropy_backward_typed<float>(logits, targets, lse, scale, scale_stride, shape, columns, grad, stream);
    case DType::f16:
      return cross_entropy_backward_typed<__half>(logits, targets, lse, scale, scale_stride, shape, columns, grad,
                                                  stream);
    case DType::bf16:
      return cross_entropy_backward_typed<__nv_bfloat16>(logits, targets, lse, scale, scale_stride, shape, columns,
                                                         grad, stream);
    case DType::none: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace scaletrain::model::cuda
