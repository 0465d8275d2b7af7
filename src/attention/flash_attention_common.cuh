#pragma once
// Device helpers shared by the flash attention kernels (flash_attention.cu, sm_80 and later;
// flash_attention_sm90.cu, sm_90a): PTX wrappers, the mma.sync m16n8k16 operations and fragment
// packing, and where a sequence's rows are.
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash_attention_cuda.h"

namespace scaletrain::attention::cuda {

inline constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; `bytes` 0 writes zeros without reading.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};
template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

// The A fragment (m16 x k16) made of two adjacent m16n8 accumulator tiles (k 0-7, then 8-15): the
// accumulator layout is the A layout, so P and dS feed the next product from registers.
template <typename T>
__device__ __forceinline__ void to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = Mma<T>::pack(lo[0], lo[1]);
  a[1] = Mma<T>::pack(lo[2], lo[3]);
  a[2] = Mma<T>::pack(hi[0], hi[1]);
  a[3] = Mma<T>::pack(hi[2], hi[3]);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Where a sequence's rows start and how many there are.
struct Sequence {
  int q_start, lq, k_start, lk;
};
__device__ __forceinline__ Sequence sequence_of(const Shape& s, int b) {
  if (s.cu_q == nullptr) return {0, s.q_len, 0, s.k_len};
  const int q0 = s.cu_q[b], k0 = s.cu_k[b];
  return {q0, s.cu_q[b + 1] - q0, k0, s.cu_k[b + 1] - k0};
}

template <typename T>
__device__ __forceinline__ const T* at_row(const void* base, const Strides& st, int b, int row, int h) {
  return static_cast<const T*>(base) + b * st.batch + static_cast<int64_t>(row) * st.row + h * st.head;
}
template <typename T>
__device__ __forceinline__ T* at_row(void* base, const Strides& st, int b, int row, int h) {
  return static_cast<T*>(base) + b * st.batch + static_cast<int64_t>(row) * st.row + h * st.head;
}

// kRows floats from src (consecutive) to shared memory; rows >= valid are zero-filled.
template <int kRows, int kThreads>
__device__ __forceinline__ void load_row_floats(float* dst, const float* src, int valid, const float* safe) {
  for (int r = threadIdx.x; r < kRows; r += kThreads)
    cp_async4(smem_u32(dst + r), r < valid ? src + r : safe, r < valid ? 4 : 0);
}

// The steps of a backward block (kBN keys from n0 of one key/value head and sequence): one per query
// head of the group and query tile of kBM rows that sees a key of the block, heads outer.
template <int kBM>
struct KeySteps {
  int kvh, group, m_first, per_head, steps;
  __device__ KeySteps(const Shape& s, const Sequence& seq, int kv_head, int n0)
      : kvh(kv_head), group(s.heads / s.kv_heads) {
    // Causal query i sees key j when i >= j - (lk - lq).
    m_first = s.causal ? max(0, n0 - (seq.lk - seq.lq)) / kBM : 0;
    per_head = max(0, (seq.lq + kBM - 1) / kBM - m_first);
    steps = n0 < seq.lk ? per_head * group : 0;
  }
  __device__ int head(int step) const { return kvh * group + step / per_head; }
  __device__ int m0(int step) const { return (m_first + step % per_head) * kBM; }
};

// ---- the forward's softmax, shared by both forward kernels. A thread holds, for one m16 tile, two
// rows (half r = 0, 1: rows lane / 4 and lane / 4 + 8) of kN m16n8 accumulator blocks: s[j][2r] and
// s[j][2r + 1] are row half r, columns 8j + 2 (lane % 4) + {0, 1}.

// Scores of columns (keys) >= lk, or beyond the causal diagonal, to -inf; `row` is the thread's
// first query row (half 0), n0 the first key of the blocks.
template <int kN>
__device__ __forceinline__ void mask_scores(float (&s)[kN][4], int n0, int row, int lane, int lk, bool causal,
                                            int shift) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = n0 + j * 8 + (lane & 3) * 2 + (e & 1), r = row + (e >> 1) * 8;
      if (col >= lk || (causal && col > r + shift)) s[j][e] = -INFINITY;
    }
}

// One online-softmax step in the exp2 domain: new row maxima (of raw scores), the scores replaced by
// exp2(score * scale_log2 - max * scale_log2) (one FFMA and one MUFU op each), the row sums, and the
// factors by which the output accumulators must be rescaled (the change of maximum).
template <int kN>
__device__ __forceinline__ void softmax_step(float (&s)[kN][4], float (&row_max)[2], float (&row_sum)[2],
                                             float scale_log2, float (&correction)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = row_max[r];
#pragma unroll
    for (int j = 0; j < kN; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
    correction[r] = fast_exp2(row_max[r] * scale_log2 - base);
    row_max[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      s[j][2 * r] = fast_exp2(fmaf(s[j][2 * r], scale_log2, -base));
      s[j][2 * r + 1] = fast_exp2(fmaf(s[j][2 * r + 1], scale_log2, -base));
      sum += s[j][2 * r] + s[j][2 * r + 1];
    }
    row_sum[r] = row_sum[r] * correction[r] + sum;
  }
}

template <int kM>
__device__ __forceinline__ void rescale_rows(float (&o)[kM][4], const float (&correction)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < kM; ++j) o[j][2 * r] *= correction[r], o[j][2 * r + 1] *= correction[r];
}

// softmax_step with the output accumulators o (kM blocks) rescaled at once.
template <int kN, int kM>
__device__ __forceinline__ void online_softmax(float (&s)[kN][4], float (&o)[kM][4], float (&row_max)[2],
                                               float (&row_sum)[2], float scale_log2) {
  float correction[2];
  softmax_step(s, row_max, row_sum, scale_log2, correction);
  rescale_rows(o, correction);
}

// After the last step: each row's 1 / sum (0 for a row that saw no key) and natural log-sum-exp
// (-inf for such a row), from this thread's share of the sums.
__device__ __forceinline__ void finish_rows(const float (&row_max)[2], const float (&row_sum)[2], float scale,
                                            float (&inv)[2], float (&lse)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    inv[r] = sum > 0.f ? 1.f / sum : 0.f;
    lse[r] = sum > 0.f ? row_max[r] * scale + logf(sum) : -INFINITY;
  }
}

// ---- the backward's probabilities. A thread holds, for one m16 tile of keys (its rows key_a and
// key_a + 8), kN m16n8 blocks of a query tile from m0 (columns 8j + 2 (lane % 4) + {0, 1}; lse and
// delta: the tile's rows). The S^T and dP^T accumulators become P^T = exp(S^T scale - lse) (0 where
// masked or past a sequence) and dS^T = P^T (dP^T - delta).
template <int kN>
__device__ __forceinline__ void backward_probs(float (&s)[kN][4], float (&dp)[kN][4], const float* lse,
                                               const float* delta, int key_a, int m0, int lane, const Sequence& seq,
                                               bool causal, bool need_mask, float scale_log2) {
  const int shift = seq.lk - seq.lq;
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = j * 8 + (lane & 3) * 2 + (e & 1), key = key_a + (e >> 1) * 8;
      float p = fast_exp2(fmaf(s[j][e], scale_log2, -lse[c] * kLog2e));
      if (need_mask && (m0 + c >= seq.lq || key >= seq.lk || (causal && key > m0 + c + shift))) p = 0.f;
      s[j][e] = p;
      dp[j][e] = p * (dp[j][e] - delta[c]);
    }
}

// Launches `kernel` with `smem` bytes of dynamic shared memory (its limit raised first).
template <typename... Params, typename... Args>
cudaError_t launch_with_smem(void (*kernel)(Params...), dim3 grid, int threads, int smem, cudaStream_t stream,
                             const Args&... args) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// F<T, head_dim>::run(args...) for the element type and head_dim the kernels are built for.
template <template <typename, int> class F, typename... Args>
cudaError_t dispatch(DType type, int dim, Args&&... args) {
  if (type == DType::bf16) {
    if (dim == 64) return F<__nv_bfloat16, 64>::run(args...);
    if (dim == 128) return F<__nv_bfloat16, 128>::run(args...);
  } else if (type == DType::f16) {
    if (dim == 64) return F<__half, 64>::run(args...);
    if (dim == 128) return F<__half, 128>::run(args...);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scaletrain::attention::cuda
