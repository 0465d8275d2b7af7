// The Hopper forward of flash attention (sm_90a only: wgmma). Same algorithm, arguments and results
// as forward_kernel of flash_attention.cu; the matrix products run on warpgroup MMAs.
//
// One block of kWarpgroups warpgroups per (kBM = 64 kWarpgroups query rows, head, sequence); each
// warpgroup owns 64 rows. Q, K and V tiles sit in shared memory in the 128-byte swizzle that wgmma
// reads through matrix descriptors: a tile of R rows and D columns is D / 64 slabs of R rows x 128
// bytes, the 16-byte chunk c of row r stored at chunk c ^ (r % 8) (sw128). S = Q K^T takes both
// operands from shared memory (K-major); the online softmax runs on the fp32 accumulators in
// registers; O += P V takes P from registers (the accumulator layout is the A layout) and V
// MN-major. K and V tiles are double-buffered with cp.async: tile t + 1 loads while tile t is used.
#include <cmath>
#include <cstdint>

#include "flash_attention_common.cuh"
#include "flash_attention_sm90.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SCALETRAIN_SM90_DEVICE 1
#endif

#include "wgmma.cuh"

namespace scaletrain::attention::cuda::sm90 {
namespace {

// Byte offset of element (row, col) in a 128-byte-swizzled tile of kRows rows (16-bit elements).
template <int kRows>
__device__ __forceinline__ uint32_t sw128(int row, int col) {
  return (col >> 6) * (kRows * 128) + row * 128 + ((((col >> 3) & 7) ^ (row & 7)) << 4) + (col & 7) * 2;
}

// The accumulators of m64nNk16 (N / 2 floats per thread) as N / 8 m16n8 blocks of 4, the layout the
// shared softmax of flash_attention_common.cuh takes: the same registers.
template <int N>
__device__ __forceinline__ float (&blocks(float (&d)[N]))[N / 4][4] {
  return *reinterpret_cast<float(*)[N / 4][4]>(&d);
}

// kRows x kD elements from global rows `row_stride` apart into a sw128 tile at `dst`; rows >= valid
// are zero-filled.
template <int kRows, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T* src, int64_t row_stride, int valid, const T* safe) {
  constexpr int kChunks = kD / 8;
#pragma unroll
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, ch = c % kChunks;
    const bool ok = r < valid;
    cp_async16(dst + sw128<kRows>(r, ch * 8), ok ? src + r * row_stride + ch * 8 : safe, ok ? 16 : 0);
  }
}

template <int kD>
struct Tiles {
  static constexpr int kWarpgroups = 2, kBM = 64 * kWarpgroups, kBN = 128, kThreads = 128 * kWarpgroups;
  static constexpr int kQBytes = kBM * kD * 2, kKVBytes = kBN * kD * 2;
  // Q, two K and two V buffers, and slack to align the start to 1024 bytes.
  static constexpr int kSmem = kQBytes + 4 * kKVBytes + 1024;
};

template <typename T, int kD>
__global__ void __launch_bounds__(Tiles<kD>::kThreads, 1) forward_kernel(Shape s, ForwardArgs a) {
#ifdef SCALETRAIN_SM90_DEVICE
  using Tl = Tiles<kD>;
  constexpr int kBM = Tl::kBM, kBN = Tl::kBN, kThreads = Tl::kThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t sQ = (raw + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (sQ - raw);  // generic pointer of sQ
  const uint32_t sK = sQ + Tl::kQBytes, sV = sK + 2 * Tl::kKVBytes;  // buffer i at + i * kKVBytes

  const int m_block = gridDim.x - 1 - blockIdx.x;  // the longest causal rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence_of(s, b);
  const int m0 = m_block * kBM;
  if (m0 >= seq.lq) return;
  const int kvh = h / (s.heads / s.kv_heads);
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int first = wg * 64 + warp * 16;  // the warp's first row in the tile
  const T* q = at_row<T>(a.q, a.sq, b, seq.q_start + m0, h);
  const T* k = at_row<T>(a.k, a.sk, b, seq.k_start, kvh);
  const T* v = at_row<T>(a.v, a.sv, b, seq.k_start, kvh);
  const T* safe = static_cast<const T*>(a.q);
  const int shift = seq.lk - seq.lq;  // query i sees keys j <= i + shift (causal)
  const int n_end = s.causal ? min(seq.lk, max(0, m0 + kBM + shift)) : seq.lk;
  const int n_tiles = (n_end + kBN - 1) / kBN;
  const float scale_log2 = s.scale * kLog2e;

  float acc_o[kD / 2], acc_s[kBN / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) acc_o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) acc_s[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int row_a = m0 + first + (lane >> 2);  // rows row_a and row_a + 8

  if (n_tiles > 0) {
    load_tile<kBM, kD, kThreads>(sQ, q, a.sq.row, seq.lq - m0, safe);
    load_tile<kBN, kD, kThreads>(sK, k, a.sk.row, seq.lk, safe);
    load_tile<kBN, kD, kThreads>(sV, v, a.sv.row, seq.lk, safe);
    cp_async_commit();
    for (int t = 0; t < n_tiles; ++t) {
      const int n0 = t * kBN, buf = t & 1;
      cp_async_wait<0>();
      fence_proxy_async();  // the tiles written by cp.async are read by wgmma (the async proxy)
      __syncthreads();      // tile t is in; every warpgroup is done with buffer buf ^ 1
      if (t + 1 < n_tiles) {
        const int n1 = n0 + kBN;
        load_tile<kBN, kD, kThreads>(sK + (buf ^ 1) * Tl::kKVBytes, k + n1 * a.sk.row, a.sk.row, seq.lk - n1, safe);
        load_tile<kBN, kD, kThreads>(sV + (buf ^ 1) * Tl::kKVBytes, v + n1 * a.sv.row, a.sv.row, seq.lk - n1, safe);
        cp_async_commit();
      }
      // S = Q K^T: kD / 16 steps of k16; within a 64-column slab a step advances 32 bytes.
      const uint32_t k_tile = sK + buf * Tl::kKVBytes, v_tile = sV + buf * Tl::kKVBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const int col = kk * 16;
        const uint64_t da = matrix_desc(sQ + (col >> 6) * (kBM * 128) + wg * 64 * 128 + (col & 63) * 2, 16, 1024);
        const uint64_t db = matrix_desc(k_tile + (col >> 6) * (kBN * 128) + (col & 63) * 2, 16, 1024);
        Wgmma<T, kBN>::ss(acc_s, da, db, kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_s);

      const bool need_mask = n0 + kBN > seq.lk || (s.causal && n0 + kBN - 1 > m0 + shift);
      if (need_mask) mask_scores(blocks(acc_s), n0, row_a, lane, seq.lk, s.causal, shift);
      online_softmax(blocks(acc_s), blocks(acc_o), row_max, row_sum, scale_log2);
      uint32_t pf[kBN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) to_a<T>(pf[kk], blocks(acc_s)[2 * kk], blocks(acc_s)[2 * kk + 1]);
      // O += P V: k16 steps over the keys; V is MN-major (rows of head_dim), 16 keys = 2048 bytes;
      // the leading offset steps between 64-column slabs, the stride between groups of 8 keys.
      fence_operands(acc_o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        Wgmma<T, kD>::rs(acc_o, pf[kk], matrix_desc(v_tile + kk * 16 * 128, kBN * 128, 1024), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_o);
    }
  }
  // Epilogue: each warp stages its 16 rows in its own rows of sQ (its warpgroup's products are done).
  float inv[2], lse[2];
  finish_rows(row_max, row_sum, s.scale, inv, lse);
#pragma unroll
  for (int j = 0; j < kD / 8; ++j) {
    const int col = j * 8 + (lane & 3) * 2, row = first + (lane >> 2);
    *reinterpret_cast<uint32_t*>(smem + sw128<kBM>(row, col)) =
        Mma<T>::pack(acc_o[4 * j] * inv[0], acc_o[4 * j + 1] * inv[0]);
    *reinterpret_cast<uint32_t*>(smem + sw128<kBM>(row + 8, col)) =
        Mma<T>::pack(acc_o[4 * j + 2] * inv[1], acc_o[4 * j + 3] * inv[1]);
  }
  __syncwarp();
  T* out = at_row<T>(a.out, a.so, b, seq.q_start + m0 + first, h);
  const int valid = seq.lq - m0 - first;
  constexpr int kChunks = kD / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (r < valid)
      *reinterpret_cast<uint4*>(out + r * a.so.row + col) =
          *reinterpret_cast<const uint4*>(smem + sw128<kBM>(first + r, col));
  }
  if ((lane & 3) == 0) {
    float* l = a.lse + b * a.sl.batch + h * a.sl.head + seq.q_start;
    if (row_a < seq.lq) l[row_a] = lse[0];
    if (row_a + 8 < seq.lq) l[row_a + 8] = lse[1];
  }
#endif
}

template <typename T, int kD>
struct Forward {
  static cudaError_t run(const Shape& s, const ForwardArgs& a, cudaStream_t stream) {
    using Tl = Tiles<kD>;
    return launch_with_smem(forward_kernel<T, kD>, dim3((s.q_len + Tl::kBM - 1) / Tl::kBM, s.heads, s.batch),
                            Tl::kThreads, Tl::kSmem, stream, s, a);
  }
};

}  // namespace

cudaError_t launch_forward(DType type, const Shape& shape, const ForwardArgs& args, cudaStream_t stream) {
  return dispatch<Forward>(type, shape.dim, shape, args, stream);
}

}  // namespace scaletrain::attention::cuda::sm90
