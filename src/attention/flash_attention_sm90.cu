// The Hopper kernels of flash attention (sm_90a only: wgmma): the forward and the dK/dV(/dQ)
// backward. Same algorithms, arguments and results as forward_kernel and the dK/dV kernels of
// flash_attention.cu; the matrix products run on warpgroup MMAs. (The delta pre-pass and the
// deterministic dQ kernel are the portable ones.)
//
// Forward: one block of kWarpgroups warpgroups per (kBM = 64 kWarpgroups query rows, head, sequence); each
// warpgroup owns 64 rows. Q, K and V tiles sit in shared memory in the 128-byte swizzle that wgmma
// reads through matrix descriptors: a tile of R rows and D columns is D / 64 slabs of R rows x 128
// bytes, the 16-byte chunk c of row r stored at chunk c ^ (r % 8) (sw128). S = Q K^T takes both
// operands from shared memory (K-major); the online softmax runs on the fp32 accumulators in
// registers; O += P V takes P from registers (the accumulator layout is the A layout) and V
// MN-major. The products of consecutive tiles overlap: step t issues S(t) = Q K(t)^T and O += P(t -
// 1) V(t - 1) together and runs the softmax of tile t while the second is in flight. Two kernels do
// this: forward_tma_kernel (dense inputs; the copy engine loads the tiles for a producer warpgroup,
// and two or three consumer warpgroups take turns) and forward_kernel (packed sequences and layouts the
// copy engine cannot take; K and V double-buffered with cp.async by all threads, one tile ahead).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cuda.h>

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

// The first 1024-aligned byte of the dynamic shared memory (sw128 tiles need that alignment): its
// shared-space address, and its generic pointer in `generic`.
__device__ __forceinline__ uint32_t align_1024(unsigned char* raw, unsigned char*& generic) {
  const uint32_t address = smem_u32(raw), aligned = (address + 1023) & ~1023u;
  generic = raw + (aligned - address);
  return aligned;
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

// Writes a warp's 16 x kD accumulators of an m64nkD product (rows `first`.. of a sw128 staging
// tile of kRows rows at `stage`; row half r times mul_r) as T to global rows `row_stride` apart from
// dst; rows >= valid are skipped. The warp must own those staging rows.
template <int kRows, int kD, typename T>
__device__ __forceinline__ void store_rows(const float (&acc)[kD / 2], float mul0, float mul1, unsigned char* stage,
                                           int first, T* dst, int64_t row_stride, int valid, int lane) {
#pragma unroll
  for (int j = 0; j < kD / 8; ++j) {
    const int col = j * 8 + (lane & 3) * 2, row = first + (lane >> 2);
    *reinterpret_cast<uint32_t*>(stage + sw128<kRows>(row, col)) = Mma<T>::pack(acc[4 * j] * mul0, acc[4 * j + 1] * mul0);
    *reinterpret_cast<uint32_t*>(stage + sw128<kRows>(row + 8, col)) =
        Mma<T>::pack(acc[4 * j + 2] * mul1, acc[4 * j + 3] * mul1);
  }
  __syncwarp();
  constexpr int kChunks = kD / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    if (r < valid)
      *reinterpret_cast<uint4*>(dst + r * row_stride + col) =
          *reinterpret_cast<const uint4*>(stage + sw128<kRows>(first + r, col));
  }
}

// ---- a warpgroup's steps of the forward (64 query rows), shared by both Hopper forwards.

// S = Q K^T into acc_s: kD / 16 steps of k16 over the warpgroup's 64 rows (from 64 wg) of a sw128 Q
// tile of kBM rows and a K tile of kBN rows; within a 64-column slab a step advances 32 bytes.
template <typename T, int kD, int kBM, int kBN>
__device__ __forceinline__ void issue_qk(float (&acc_s)[kBN / 2], uint32_t q_tile, int wg, uint32_t k_tile) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const int col = kk * 16;
    const uint64_t da = matrix_desc(q_tile + (col >> 6) * (kBM * 128) + wg * 64 * 128 + (col & 63) * 2, 16, 1024);
    const uint64_t db = matrix_desc(k_tile + (col >> 6) * (kBN * 128) + (col & 63) * 2, 16, 1024);
    Wgmma<T, kBN>::ss(acc_s, da, db, kk > 0);
  }
  wgmma_commit();
}

// O += P V: k16 steps over the keys; V is MN-major (rows of head_dim), 16 keys = 2048 bytes; the
// leading offset steps between 64-column slabs, the stride between groups of 8 keys.
template <typename T, int kD, int kBN>
__device__ __forceinline__ void issue_pv(float (&acc_o)[kD / 2], const uint32_t (&pf)[kBN / 16][4], uint32_t v_tile) {
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk)
    Wgmma<T, kD>::rs(acc_o, pf[kk], matrix_desc(v_tile + kk * 16 * 128, kBN * 128, 1024), 1);
  wgmma_commit();
}

// The online softmax of the scores of keys n0.. (kBN of them) for query tile m0: masked where the
// tile passes lk or, causal, the diagonal (query i sees keys j <= i + shift); row_a is the
// thread's first row. P to the A fragments is make_p's.
template <int kBN>
__device__ __forceinline__ void softmax_tile(float (&acc_s)[kBN / 2], int n0, int m0, int lk, bool causal, int shift,
                                             int row_a, int lane, float (&row_max)[2], float (&row_sum)[2],
                                             float scale_log2, float (&correction)[2]) {
  const bool need_mask = n0 + kBN > lk || (causal && n0 + kBN - 1 > m0 + shift);
  if (need_mask) mask_scores(blocks(acc_s), n0, row_a, lane, lk, causal, shift);
  softmax_step(blocks(acc_s), row_max, row_sum, scale_log2, correction);
}

// The probabilities as the A operand of O += P V.
template <typename T, int kBN>
__device__ __forceinline__ void make_p(uint32_t (&pf)[kBN / 16][4], float (&acc_s)[kBN / 2]) {
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) to_a<T>(pf[kk], blocks(acc_s)[2 * kk], blocks(acc_s)[2 * kk + 1]);
}

// head_dim 64: tiles of 64 keys and two blocks per multiprocessor (126 registers per thread), so
// that one block's softmax runs while the other's products do (1.18-1.35x one block with tiles
// of 128 keys on an H200). head_dim 128, whose output accumulators alone take 64 registers: one block
// of two warpgroups with tiles of 128 keys (one warpgroup per block, tiles of 64 keys and two
// blocks per multiprocessor measured 0.80-0.95x of it).
template <int kD>
struct Tiles {
  static constexpr int kWarpgroups = 2, kBM = 64 * kWarpgroups, kBN = kD <= 64 ? 64 : 128;
  static constexpr int kThreads = 128 * kWarpgroups, kMinBlocks = kD <= 64 ? 2 : 1;
  static constexpr int kQBytes = kBM * kD * 2, kKVBytes = kBN * kD * 2;
  // Q, two K and two V buffers, and slack to align the start to 1024 bytes.
  static constexpr int kSmem = kQBytes + 4 * kKVBytes + 1024;
};

template <typename T, int kD>
__global__ void __launch_bounds__(Tiles<kD>::kThreads, Tiles<kD>::kMinBlocks) forward_kernel(Shape s, ForwardArgs a) {
#ifdef SCALETRAIN_SM90_DEVICE
  using Tl = Tiles<kD>;
  constexpr int kBM = Tl::kBM, kBN = Tl::kBN, kThreads = Tl::kThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem;  // generic pointer of sQ
  const uint32_t sQ = align_1024(smem_raw, smem);
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
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f}, correction[2];
  const int row_a = m0 + first + (lane >> 2);  // rows row_a and row_a + 8
  uint32_t pf[kBN / 16][4];                    // P of the last tile, the A operand of O += P V

  // At the top of step t >= 1 (every warpgroup done with step t - 1): K of tile t and V of tile
  // t - 1 are in; K of tile t + 1 starts loading into the buffer of K(t - 1) and V of tile t into
  // that of V(t - 2).
  auto top = [&](int t) {
    cp_async_wait<0>();
    fence_proxy_async();  // the tiles written by cp.async are read by wgmma (the async proxy)
    __syncthreads();
    if (t + 1 < n_tiles) {
      const int n1 = (t + 1) * kBN;
      load_tile<kBN, kD, kThreads>(sK + ((t + 1) & 1) * Tl::kKVBytes, k + n1 * a.sk.row, a.sk.row, seq.lk - n1, safe);
    }
    if (t < n_tiles)
      load_tile<kBN, kD, kThreads>(sV + (t & 1) * Tl::kKVBytes, v + t * kBN * a.sv.row, a.sv.row, seq.lk - t * kBN,
                                   safe);
    cp_async_commit();
  };
  auto issue_s = [&](int t) { issue_qk<T, kD, kBM, kBN>(acc_s, sQ, wg, sK + (t & 1) * Tl::kKVBytes); };
  auto issue_pv_t = [&](int t) { issue_pv<T, kD, kBN>(acc_o, pf, sV + (t & 1) * Tl::kKVBytes); };
  auto softmax = [&](int t) {
    softmax_tile<kBN>(acc_s, t * kBN, m0, seq.lk, s.causal, shift, row_a, lane, row_max, row_sum, scale_log2,
                      correction);
  };

  // Step t issues S(t) and then O += P(t - 1) V(t - 1): the softmax of tile t runs while the tensor
  // cores work on the P V product of tile t - 1. Step 0 (no P yet) is peeled off the loop, and the
  // last P V product follows it.
  if (n_tiles > 0) {
    // Step 0's loads (Q and K(0)) and step 1's (K(1) and V(0)) as two groups, all issued before
    // the first wait, so that a short sequence's first steps do not wait twice.
    load_tile<kBM, kD, kThreads>(sQ, q, a.sq.row, seq.lq - m0, safe);
    load_tile<kBN, kD, kThreads>(sK, k, a.sk.row, seq.lk, safe);
    cp_async_commit();
    if (n_tiles > 1)
      load_tile<kBN, kD, kThreads>(sK + Tl::kKVBytes, k + kBN * a.sk.row, a.sk.row, seq.lk - kBN, safe);
    load_tile<kBN, kD, kThreads>(sV, v, a.sv.row, seq.lk, safe);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    wgmma_fence();
    issue_s(0);
    wgmma_wait<0>();
    fence_operands(acc_s);
    softmax(0);
    make_p<T, kBN>(pf, acc_s);
    for (int t = 1; t < n_tiles; ++t) {
      top(t);
      fence_operands(acc_o);  // the rescaled O and the new P are written before the wgmmas read them
      fence_operands(pf);
      wgmma_fence();
      issue_s(t);
      issue_pv_t(t - 1);
      wgmma_wait<1>();  // S(t) is done (P(t - 1) V(t - 1) may not be)
      fence_operands(acc_s);
      softmax(t);
      wgmma_wait<0>();
      fence_operands(acc_o);
      rescale_rows(blocks(acc_o), correction);
      make_p<T, kBN>(pf, acc_s);
    }
    top(n_tiles);  // V of the last tile is in
    fence_operands(acc_o);
    fence_operands(pf);
    wgmma_fence();
    issue_pv_t(n_tiles - 1);
    wgmma_wait<0>();
    fence_operands(acc_o);
  }
  // Epilogue: each warp stages its 16 rows in its own rows of sQ (its warpgroup's products are done).
  float inv[2], lse[2];
  finish_rows(row_max, row_sum, s.scale, inv, lse);
  store_rows<kBM, kD>(acc_o, inv[0], inv[1], smem, first, at_row<T>(a.out, a.so, b, seq.q_start + m0 + first, h),
                      a.so.row, seq.lq - m0 - first, lane);
  if ((lane & 3) == 0) {
    float* l = a.lse + b * a.sl.batch + h * a.sl.head + seq.q_start;
    if (row_a < seq.lq) l[row_a] = lse[0];
    if (row_a + 8 < seq.lq) l[row_a + 8] = lse[1];
  }
#endif
}

// ---------------------------------------------------------------- forward on the copy engine

// The warp-specialised forward of dense inputs: a producer warpgroup whose one thread loads Q, K and V
// tiles with bulk tensor copies (TMA: the copy engine writes the 128-byte swizzle itself and signals an
// mbarrier; two K and V stages), and kConsumers consumer warpgroups of 64 query rows each that take
// turns issuing their matrix products (named barriers 1.., in a ring), so that one's softmax runs while
// another's products do. Within a warpgroup, step t issues S(t) and O += P(t - 1) V(t - 1) together
// as in forward_kernel. The grid is persistent (a block per multiprocessor walks the work items, the
// producer loading the next item's Q and K while the consumers finish the last) or a block per item
// (launch_tma_forward's `persistent`). Work item i: query tile (i % m_tiles, the last first), head,
// sequence; consecutive items share K and V, which stay in L2 while the blocks of a wave use them.
template <int kD, int kConsumers>
struct TmaTiles {
  static constexpr int kBM = 64 * kConsumers, kBN = 128, kStages = 2, kThreads = 128 * (kConsumers + 1);
  // Registers per thread after setmaxnreg: the producer's 24, the rest split among the consumers.
  static constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;
  static constexpr int kQBytes = kBM * kD * 2, kKVBytes = kBN * kD * 2;
  // Q, the K and V stages, the output staging tile (Q's size), and slack to align to 1024 bytes.
  static constexpr int kSmem = 2 * kQBytes + 2 * kStages * kKVBytes + 1024;
};

template <typename T, int kD, int kConsumers>
__global__ void __launch_bounds__(TmaTiles<kD, kConsumers>::kThreads, 1)
    forward_tma_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                       const __grid_constant__ CUtensorMap map_v, Shape s, ForwardArgs a) {
#ifdef SCALETRAIN_SM90_DEVICE
  using Tl = TmaTiles<kD, kConsumers>;
  constexpr int kBM = Tl::kBM, kBN = Tl::kBN, kStages = Tl::kStages, kWarps = 4 * kConsumers;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Q loaded / consumed, and per stage K loaded, V loaded, K consumed, V consumed.
  __shared__ __align__(8) uint64_t bars[2 + 4 * kStages];
  unsigned char* smem;  // generic pointer of sQ
  const uint32_t sQ = align_1024(smem_raw, smem);
  const uint32_t sK = sQ + Tl::kQBytes, sV = sK + kStages * Tl::kKVBytes, sO = sV + kStages * Tl::kKVBytes;
  const uint32_t full_q = smem_u32(bars), empty_q = full_q + 8, full_k = full_q + 16,
                 full_v = full_k + 8 * kStages, empty_k = full_v + 8 * kStages, empty_v = empty_k + 8 * kStages;
  if (threadIdx.x == 0) {
    mbar_init(full_q, 1);
    mbar_init(empty_q, kWarps);  // lane 0 of each consumer warp
    for (int i = 0; i < kStages; ++i) {
      mbar_init(full_k + 8 * i, 1);
      mbar_init(full_v + 8 * i, 1);
      mbar_init(empty_k + 8 * i, kWarps);
      mbar_init(empty_v + 8 * i, kWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();  // the last block-wide barrier

  const int m_tiles = (s.q_len + kBM - 1) / kBM, items = m_tiles * s.heads * s.batch;
  const int shift = s.k_len - s.q_len;  // query i sees keys j <= i + shift (causal)
  struct Item {
    int m0, h, b, n_tiles;
  };
  auto item_of = [&](int i) {
    Item it;
    it.m0 = (m_tiles - 1 - i % m_tiles) * kBM;
    it.h = (i / m_tiles) % s.heads;
    it.b = i / (m_tiles * s.heads);
    const int n_end = s.causal ? min(s.k_len, max(0, it.m0 + kBM + shift)) : s.k_len;
    it.n_tiles = (n_end + kBN - 1) / kBN;
    return it;
  };

  // The warpgroup index through a shuffle: ptxas then knows it is uniform in each warp and keeps the
  // consumers' wgmma asynchronous (else it serialises them, warning C7520).
  const int warpgroup = __shfl_sync(0xffffffff, static_cast<int>(threadIdx.x) / 128, 0);
  if (warpgroup == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    if (threadIdx.x == 0) {
      // Use u of a stage (u = load counter / kStages) waits for the consumers' release of use u - 1.
      int load = 0, local = 0;
      for (int i = blockIdx.x; i < items; i += gridDim.x, ++local) {
        const Item it = item_of(i);
        const int kvh = it.h / (s.heads / s.kv_heads);
        if (local > 0) mbar_wait(empty_q, (local - 1) & 1);
        mbar_expect_bytes(full_q, Tl::kQBytes);
#pragma unroll
        for (int c = 0; c < kD / 64; ++c) tma_load_4d(sQ + c * kBM * 128, &map_q, full_q, c * 64, it.m0, it.h, it.b);
        for (int t = 0; t < it.n_tiles; ++t, ++load) {
          const int st = load % kStages, use = load / kStages;
          if (use > 0) mbar_wait(empty_k + 8 * st, (use - 1) & 1);
          mbar_expect_bytes(full_k + 8 * st, Tl::kKVBytes);
#pragma unroll
          for (int c = 0; c < kD / 64; ++c)
            tma_load_4d(sK + st * Tl::kKVBytes + c * kBN * 128, &map_k, full_k + 8 * st, c * 64, t * kBN, kvh, it.b);
          if (use > 0) mbar_wait(empty_v + 8 * st, (use - 1) & 1);
          mbar_expect_bytes(full_v + 8 * st, Tl::kKVBytes);
#pragma unroll
          for (int c = 0; c < kD / 64; ++c)
            tma_load_4d(sV + st * Tl::kKVBytes + c * kBN * 128, &map_v, full_v + 8 * st, c * 64, t * kBN, kvh, it.b);
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tl::kConsumerRegs));
    const int wg = warpgroup - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int first = wg * 64 + warp * 16;  // the warp's first row in the tile
    const float scale_log2 = s.scale * kLog2e;
    float acc_o[kD / 2], acc_s[kBN / 2], row_max[2], row_sum[2], correction[2];
    uint32_t pf[kBN / 16][4];  // P of the last tile, the A operand of O += P V
    int load = 0, local = 0;
    for (int i = blockIdx.x; i < items; i += gridDim.x, ++local) {
      const Item it = item_of(i);
      const int m0 = it.m0, n_tiles = it.n_tiles, row_a = m0 + first + (lane >> 2);  // rows row_a, row_a + 8
#pragma unroll
      for (int j = 0; j < kD / 2; ++j) acc_o[j] = 0.f;
      row_max[0] = row_max[1] = -INFINITY;
      row_sum[0] = row_sum[1] = 0.f;

      auto issue_s = [&](int st) { issue_qk<T, kD, kBM, kBN>(acc_s, sQ, wg, sK + st * Tl::kKVBytes); };
      auto issue_pv_st = [&](int st) { issue_pv<T, kD, kBN>(acc_o, pf, sV + st * Tl::kKVBytes); };
      // Step t (load counter load + t): S(t), and O += P(t - 1) V(t - 1) but in the first step, issued in
      // this warpgroup's turn; the softmax of tile t while the P V product runs. The first step is a
      // separate instantiation (ptxas serialises wgmma whose waits sit in data-dependent branches).
      auto step = [&](int t, auto first_step) {
        constexpr bool kFirst = decltype(first_step)::value;
        const int st = (load + t) % kStages, prev = (load + t + kStages - 1) % kStages;
        mbar_wait(full_k + 8 * st, ((load + t) / kStages) & 1);
        named_sync(1 + wg, 256);  // this warpgroup's turn
        fence_operands(acc_o);
        fence_operands(pf);
        wgmma_fence();
        issue_s(st);
        if constexpr (!kFirst) {
          mbar_wait(full_v + 8 * prev, ((load + t - 1) / kStages) & 1);
          wgmma_fence();  // after the wait's branch, else ptxas inserts one (C7519)
          issue_pv_st(prev);
        }
        if (wg + 1 < kConsumers || t + 1 < n_tiles) named_arrive(1 + (wg + 1) % kConsumers, 256);  // the next one's
        wgmma_wait<kFirst ? 0 : 1>();
        fence_operands(acc_s);
        if (lane == 0) {
          mbar_arrive(empty_k + 8 * st);  // S(t) is done: the stage's K may be overwritten,
          if (t + 1 == n_tiles) mbar_arrive(empty_q);  // and after the last S, Q (the next item's loads)
        }
        softmax_tile<kBN>(acc_s, t * kBN, m0, s.k_len, s.causal, shift, row_a, lane, row_max, row_sum, scale_log2,
                          correction);
        if constexpr (!kFirst) {
          wgmma_wait<0>();
          fence_operands(acc_o);
          if (lane == 0) mbar_arrive(empty_v + 8 * prev);
          rescale_rows(blocks(acc_o), correction);
        }
        make_p<T, kBN>(pf, acc_s);
      };

      mbar_wait(full_q, local & 1);
      if (n_tiles > 0) {
        if (wg == kConsumers - 1) named_arrive(1, 256);  // warpgroup 0 goes first
        step(0, std::true_type{});
        for (int t = 1; t < n_tiles; ++t) step(t, std::false_type{});
        const int last = (load + n_tiles - 1) % kStages;
        mbar_wait(full_v + 8 * last, ((load + n_tiles - 1) / kStages) & 1);
        fence_operands(acc_o);
        fence_operands(pf);
        wgmma_fence();
        issue_pv_st(last);
        wgmma_wait<0>();
        fence_operands(acc_o);
        if (lane == 0) mbar_arrive(empty_v + 8 * last);
      }
      if (n_tiles == 0 && lane == 0) mbar_arrive(empty_q);  // (else released after the last S)
      load += n_tiles;

      // Epilogue: each warp stages its 16 rows in its own rows of the output tile.
      float inv[2], lse[2];
      finish_rows(row_max, row_sum, s.scale, inv, lse);
      __syncwarp();  // the warp's reads of its rows for the previous item are done
      store_rows<kBM, kD>(acc_o, inv[0], inv[1], smem + (sO - sQ), first,
                          at_row<T>(a.out, a.so, it.b, m0 + first, it.h), a.so.row, s.q_len - m0 - first, lane);
      if ((lane & 3) == 0) {
        float* l = a.lse + it.b * a.sl.batch + it.h * a.sl.head;
        if (row_a < s.q_len) l[row_a] = lse[0];
        if (row_a + 8 < s.q_len) l[row_a + 8] = lse[1];
      }
    }
  }
#endif
}

// cuTensorMapEncodeTiled of the driver, found through the runtime (no link to libcuda).
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess)
      return static_cast<EncodeTiled>(nullptr);
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// A map of the 4-d tensor (head_dim, rows, heads, batch) at `base` with strides `st` (elements), in
// boxes of 64 columns x box_rows rows written in the 128-byte swizzle; rows past `rows` read as
// zeros. False where the copy engine cannot take the layout (a base or stride not a multiple of 16
// bytes).
template <typename T>
bool tensor_map(CUtensorMap* map, const void* base, const Strides& st, int rows, int heads, int batch, int dim,
                int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const int64_t strides[3] = {st.row, st.head, st.batch};
  cuuint64_t bytes[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t e = dims[i + 1] == 1 ? 8 : strides[i];  // a dimension of size 1: any valid stride
    if (e <= 0 || e * 2 % 16 != 0) return false;
    bytes[i] = static_cast<cuuint64_t>(e * 2);
  }
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1}, unit[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, type, 4, const_cast<void*>(base), dims, bytes, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Which Hopper forward runs (SCALETRAIN_FLASH_SM90_FORWARD, read at each call): "persistent" (the
// copy-engine kernel on a grid of one block per multiprocessor), "blocks" (the same kernel, one block
// per work item), "cpasync" (forward_kernel); unset or "auto": persistent without the causal mask,
// blocks with it (the hardware's block scheduler balances causal rows of unequal length better than a
// fixed share per block: 1.5x at head_dim 128, 16k tokens on an H200). Packed sequences, and layouts
// the copy engine cannot take, run forward_kernel.
enum class ForwardVariant { persistent, blocks, cpasync };
ForwardVariant forward_variant(bool causal) {
  const char* env = std::getenv("SCALETRAIN_FLASH_SM90_FORWARD");
  if (env != nullptr && std::strcmp(env, "persistent") == 0) return ForwardVariant::persistent;
  if (env != nullptr && std::strcmp(env, "blocks") == 0) return ForwardVariant::blocks;
  if (env != nullptr && std::strcmp(env, "cpasync") == 0) return ForwardVariant::cpasync;
  return causal ? ForwardVariant::blocks : ForwardVariant::persistent;
}

// head_dim 64: whether the copy-engine forward runs three consumer warpgroups (192 query rows per
// item) rather than two. SCALETRAIN_FLASH_SM90_CONSUMERS=2 or 3 decides; else three, but two with the
// causal mask on fewer than 2048 queries, where the taller tile's masked part costs more than the
// third warpgroup gains (H200, 16k tokens: three 1.05-1.21x two without the mask, 1.12-1.20x with it
// at s4096 and s16384; two 1.07-1.08x three with it at s512 and s1024).
bool three_consumers(const Shape& s) {
  const char* env = std::getenv("SCALETRAIN_FLASH_SM90_CONSUMERS");
  if (env != nullptr && std::strcmp(env, "2") == 0) return false;
  if (env != nullptr && std::strcmp(env, "3") == 0) return true;
  return !s.causal || s.q_len >= 2048;
}

// The copy-engine forward with kConsumers consumer warpgroups; false in *launched where the layout
// does not suit the copy engine (nothing is launched then).
template <typename T, int kD, int kConsumers>
cudaError_t launch_tma_forward(const Shape& s, const ForwardArgs& a, bool persistent, cudaStream_t stream,
                               bool* launched) {
  using Tl = TmaTiles<kD, kConsumers>;
  CUtensorMap mq, mk, mv;
  *launched = tensor_map<T>(&mq, a.q, a.sq, s.q_len, s.heads, s.batch, kD, Tl::kBM) &&
              tensor_map<T>(&mk, a.k, a.sk, s.k_len, s.kv_heads, s.batch, kD, Tl::kBN) &&
              tensor_map<T>(&mv, a.v, a.sv, s.k_len, s.kv_heads, s.batch, kD, Tl::kBN);
  if (!*launched) return cudaSuccess;
  const int items = (s.q_len + Tl::kBM - 1) / Tl::kBM * s.heads * s.batch;
  int blocks = items;
  if (persistent) {
    int device = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    blocks = std::min(items, sms);
  }
  note_forward_kernel(persistent ? (kConsumers == 2 ? "persistent/2" : "persistent/3")
                                 : (kConsumers == 2 ? "blocks/2" : "blocks/3"));
  return launch_with_smem(forward_tma_kernel<T, kD, kConsumers>, dim3(blocks), Tl::kThreads, Tl::kSmem, stream, mq,
                          mk, mv, s, a);
}

template <typename T, int kD>
struct Forward {
  static cudaError_t run(const Shape& s, const ForwardArgs& a, cudaStream_t stream) {
    const ForwardVariant variant = forward_variant(s.causal);
    if (s.cu_q == nullptr && variant != ForwardVariant::cpasync) {
      const bool persistent = variant == ForwardVariant::persistent;
      bool launched = false;
      cudaError_t err;
      if constexpr (kD == 64) {
        err = three_consumers(s)
                  ? launch_tma_forward<T, kD, 3>(s, a, persistent, stream, &launched)
                  : launch_tma_forward<T, kD, 2>(s, a, persistent, stream, &launched);
      } else {
        err = launch_tma_forward<T, kD, 2>(s, a, persistent, stream, &launched);
      }
      if (err != cudaSuccess || launched) return err;
    }
    using Tl = Tiles<kD>;
    note_forward_kernel("cpasync");
    return launch_with_smem(forward_kernel<T, kD>, dim3((s.q_len + Tl::kBM - 1) / Tl::kBM, s.heads, s.batch),
                            Tl::kThreads, Tl::kSmem, stream, s, a);
  }
};

// ---------------------------------------------------------------- backward

// dK and dV (and with kDq dQ, added to dq_accum with atomics): one block of two warpgroups per (kBN
// = 128 keys, key/value head, sequence), warpgroup w owning keys 64w.. and their dK and dV in fp32
// registers, over the steps of KeySteps (a query tile of kBM rows of one query head each; Q, dO,
// lse and delta double-buffered with cp.async). Per step:
//   S^T = K Q^T and dP^T = V dO^T: ss, both K-major (M = the warpgroup's 64 keys, N = kBM queries);
//   P^T = exp(S^T scale - lse) and dS^T = P^T (dP^T - delta) on the accumulators;
//   dV += P^T dO and dK += dS^T Q: rs (P^T, dS^T from registers; dO and Q MN-major);
//   dQ += dS K: ss, both MN-major (dS^T as the warpgroups store it, keys x queries; K), N = 64:
//   head_dim 64 (kBM = 128) splits the queries between the warpgroups, 128 (kBM = 64) head_dim.
template <int kD>
struct BackwardTiles {
  static constexpr int kBN = 128, kBM = kD <= 64 ? 128 : 64, kThreads = 256;
  static constexpr int kKVBytes = kBN * kD * 2, kQBytes = kBM * kD * 2, kSBytes = kBN * kBM * 2;
  // dQ of a warpgroup: query rows dq_row(wg).., head_dim columns dq_col(wg)..; 64 x 64.
  static_assert(kBM * kD == 2 * 64 * 64, "dQ: 64 x 64 per warpgroup");
  // K, V, two Q and two dO buffers, dS^T, two lse and two delta rows, slack to align to 1024 bytes.
  static constexpr int kSmem = 2 * kKVBytes + 4 * kQBytes + kSBytes + 4 * kBM * 4 + 1024;
};

template <typename T, int kD, bool kDq>
__global__ void __launch_bounds__(BackwardTiles<kD>::kThreads, 1) backward_kernel(Shape s, BackwardArgs a) {
#ifdef SCALETRAIN_SM90_DEVICE
  using Tl = BackwardTiles<kD>;
  constexpr int kBM = Tl::kBM, kBN = Tl::kBN, kThreads = Tl::kThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem;  // generic pointer of sK
  const uint32_t sK = align_1024(smem_raw, smem);
  const uint32_t sV = sK + Tl::kKVBytes, sQ = sV + Tl::kKVBytes;  // Q and dO buffer i at + i * kQBytes
  const uint32_t sdO = sQ + 2 * Tl::kQBytes, sdS = sdO + 2 * Tl::kQBytes;
  float* sLse = reinterpret_cast<float*>(smem + (sdS + Tl::kSBytes - sK));  // buffer i at + i * kBM
  float* sDelta = sLse + 2 * kBM;

  const int kvh = blockIdx.y, b = blockIdx.z, n0 = blockIdx.x * kBN;
  const Sequence seq = sequence_of(s, b);
  if (n0 >= seq.lk) return;
  const KeySteps<kBM> st(s, seq, kvh, n0);
  const int wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int first = wg * 64 + warp * 16;  // the warp's first key in the tile
  const int shift = seq.lk - seq.lq;
  const float scale_log2 = s.scale * kLog2e;
  const T* safe = static_cast<const T*>(a.q);

  auto load_step = [&](int step, int buf) {
    const int h = st.head(step), m = st.m0(step), valid = seq.lq - m;
    load_tile<kBM, kD, kThreads>(sQ + buf * Tl::kQBytes, at_row<T>(a.q, a.sq, b, seq.q_start + m, h), a.sq.row,
                                 valid, safe);
    load_tile<kBM, kD, kThreads>(sdO + buf * Tl::kQBytes, at_row<T>(a.dout, a.sdo, b, seq.q_start + m, h),
                                 a.sdo.row, valid, safe);
    const int64_t l = b * a.sl.batch + h * a.sl.head + seq.q_start + m;
    load_row_floats<kBM, kThreads>(sLse + buf * kBM, a.lse + l, valid, a.lse);
    load_row_floats<kBM, kThreads>(sDelta + buf * kBM, a.delta + l, valid, a.lse);
  };

  float acc_dk[kD / 2], acc_dv[kD / 2], acc_s[kBM / 2], acc_dp[kBM / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;
#pragma unroll
  for (int i = 0; i < kBM / 2; ++i) acc_s[i] = acc_dp[i] = 0.f;
  if (st.steps > 0) {
    load_tile<kBN, kD, kThreads>(sK, at_row<T>(a.k, a.sk, b, seq.k_start + n0, kvh), a.sk.row, seq.lk - n0, safe);
    load_tile<kBN, kD, kThreads>(sV, at_row<T>(a.v, a.sv, b, seq.k_start + n0, kvh), a.sv.row, seq.lk - n0, safe);
    load_step(0, 0);
    cp_async_commit();
  }
  const int key_a = n0 + first + (lane >> 2);  // this thread's keys: key_a and key_a + 8
  for (int step = 0; step < st.steps; ++step) {
    const int buf = step & 1, h = st.head(step), m0 = st.m0(step);
    cp_async_wait<0>();
    fence_proxy_async();  // the tiles written by cp.async are read by wgmma (the async proxy)
    __syncthreads();      // step's tiles are in; every warpgroup is done with the other buffers and dS^T
    if (step + 1 < st.steps) {
      load_step(step + 1, buf ^ 1);
      cp_async_commit();
    }
    const uint32_t q_tile = sQ + buf * Tl::kQBytes, do_tile = sdO + buf * Tl::kQBytes;
    // S^T = K Q^T, dP^T = V dO^T: kD / 16 steps of k16 each (keys: this warpgroup's 64 rows).
    auto keys_times_queries = [&](float (&acc)[kBM / 2], uint32_t key_tile, uint32_t query_tile) {
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const int col = kk * 16;
        const uint32_t a_off = (col >> 6) * (kBN * 128) + wg * 64 * 128 + (col & 63) * 2;
        const uint32_t b_off = (col >> 6) * (kBM * 128) + (col & 63) * 2;
        Wgmma<T, kBM>::ss(acc, matrix_desc(key_tile + a_off, 16, 1024), matrix_desc(query_tile + b_off, 16, 1024),
                          kk > 0);
      }
    };
    wgmma_fence();
    keys_times_queries(acc_s, sK, q_tile);
    keys_times_queries(acc_dp, sV, do_tile);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(acc_s);
    fence_operands(acc_dp);

    const bool need_mask = m0 + kBM > seq.lq || n0 + kBN > seq.lk || (s.causal && n0 + kBN - 1 > m0 + shift);
    backward_probs(blocks(acc_s), blocks(acc_dp), sLse + buf * kBM, sDelta + buf * kBM, key_a, m0, lane, seq,
                   s.causal, need_mask, scale_log2);
    uint32_t pf[kBM / 16][4], df[kBM / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      to_a<T>(pf[kk], blocks(acc_s)[2 * kk], blocks(acc_s)[2 * kk + 1]);
      to_a<T>(df[kk], blocks(acc_dp)[2 * kk], blocks(acc_dp)[2 * kk + 1]);
      if constexpr (kDq) {  // dS^T to shared memory: rows keys, columns queries
        const int r = first + (lane >> 2), c = kk * 16 + (lane & 3) * 2;
        unsigned char* ds = smem + (sdS - sK);
        *reinterpret_cast<uint32_t*>(ds + sw128<kBN>(r, c)) = df[kk][0];
        *reinterpret_cast<uint32_t*>(ds + sw128<kBN>(r + 8, c)) = df[kk][1];
        *reinterpret_cast<uint32_t*>(ds + sw128<kBN>(r, c + 8)) = df[kk][2];
        *reinterpret_cast<uint32_t*>(ds + sw128<kBN>(r + 8, c + 8)) = df[kk][3];
      }
    }
    // dV += P^T dO, dK += dS^T Q: k16 steps over the queries; dO and Q MN-major (kD / 64 slabs).
    fence_operands(acc_dv);
    fence_operands(acc_dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk)
      Wgmma<T, kD>::rs(acc_dv, pf[kk], matrix_desc(do_tile + kk * 16 * 128, kBM * 128, 1024), 1);
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk)
      Wgmma<T, kD>::rs(acc_dk, df[kk], matrix_desc(q_tile + kk * 16 * 128, kBM * 128, 1024), 1);
    wgmma_commit();
    if constexpr (kDq) {
      // dQ (64 x 64 of this warpgroup) = dS K: k16 steps over the keys; dS^T and K MN-major.
      constexpr bool kSplitRows = kBM == 128;
      const int q_slab = kSplitRows ? wg : 0, d_slab = kSplitRows ? 0 : wg;
      float acc_dq[32];
      fence_proxy_async();  // dS^T written by this thread is read by wgmma
      __syncthreads();      // every warpgroup's dS^T is in
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        Wgmma<T, 64>::template ss<1, 1>(acc_dq, matrix_desc(sdS + q_slab * (kBN * 128) + kk * 16 * 128, kBN * 128, 1024),
                                        matrix_desc(sK + d_slab * (kBN * 128) + kk * 16 * 128, kBN * 128, 1024),
                                        kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc_dq);
      float* dq = a.dq_accum + b * a.sdq.batch + static_cast<int64_t>(seq.q_start) * a.sdq.row + h * a.sdq.head;
      const int row_a = m0 + q_slab * 64 + warp * 16 + (lane >> 2);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = d_slab * 64 + j * 8 + (lane & 3) * 2;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = row_a + half * 8;
          if (row < seq.lq)
            atomicAdd(reinterpret_cast<float2*>(dq + static_cast<int64_t>(row) * a.sdq.row + col),
                      make_float2(acc_dq[4 * j + 2 * half], acc_dq[4 * j + 2 * half + 1]));
        }
      }
    } else {
      wgmma_wait<0>();
    }
    fence_operands(acc_dv);
    fence_operands(acc_dk);
  }
  __syncthreads();  // every warpgroup is done with the K and V tiles: stage dK and dV there
  const int valid = seq.lk - n0 - first;
  store_rows<kBN, kD>(acc_dk, s.scale, s.scale, smem, first,
                      at_row<T>(a.dk, a.sdk, b, seq.k_start + n0 + first, kvh), a.sdk.row, valid, lane);
  store_rows<kBN, kD>(acc_dv, 1.f, 1.f, smem + Tl::kKVBytes, first,
                      at_row<T>(a.dv, a.sdv, b, seq.k_start + n0 + first, kvh), a.sdv.row, valid, lane);
#endif
}

template <typename T, int kD>
struct DkDv {
  static cudaError_t run(const Shape& s, const BackwardArgs& a, bool with_dq, cudaStream_t stream) {
    using Tl = BackwardTiles<kD>;
    const dim3 grid((s.k_len + Tl::kBN - 1) / Tl::kBN, s.kv_heads, s.batch);
    return with_dq ? launch_with_smem(backward_kernel<T, kD, true>, grid, Tl::kThreads, Tl::kSmem, stream, s, a)
                   : launch_with_smem(backward_kernel<T, kD, false>, grid, Tl::kThreads, Tl::kSmem, stream, s, a);
  }
};

}  // namespace

cudaError_t launch_forward(DType type, const Shape& shape, const ForwardArgs& args, cudaStream_t stream) {
  return dispatch<Forward>(type, shape.dim, shape, args, stream);
}

cudaError_t launch_dk_dv(DType type, const Shape& shape, const BackwardArgs& args, bool with_dq, cudaStream_t stream) {
  return dispatch<DkDv>(type, shape.dim, shape, args, with_dq, stream);
}

}  // namespace scaletrain::attention::cuda::sm90
