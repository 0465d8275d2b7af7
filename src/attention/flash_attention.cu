// CUDA flash attention (FlashAttention-2's algorithm) on tensor cores, sm_80 and later.
//
// Forward: one block per (query tile of kBM rows, head, sequence); each warp owns 32 query rows
// (two m16 tiles sharing every K and V fragment it loads) and their output accumulators in fp32. Key and value tiles of kBN
// rows stream through shared memory with cp.async: the V tile loads while S = Q K^T is computed and
// the next K tile while O += P V is, so one buffer of each suffices. The online softmax runs in the
// exp2 domain (exp2(s * scale * log2 e - max) as one FFMA and one MUFU op); P goes from the S accumulators straight into
// the A fragments of the P V product (the m16n8 accumulator layout is the m16n8k16 A layout).
//
// Backward: one block per (key tile of kBN rows, key/value head, sequence); each warp owns 16 or 32
// keys and keeps their dK and dV in fp32 registers, over every query head of the group and every query
// tile that sees them. Per query tile it forms S^T = K Q^T and dP^T = V dO^T (keys as rows, so the
// products dV += P^T dO and dK += dS^T Q take P^T and dS^T from registers), writes dS^T to shared
// memory and adds dS K into an fp32 dQ buffer with atomics. Q, dO, lse and delta tiles are double
// buffered. delta = rowsum(dO * O) comes from a pre-pass. Deterministic mode leaves dQ to a kernel
// of its own (a query tile per block, key tiles streamed past it), which writes dq once.
//
// Shared-memory tiles are row-major with 16-byte chunks XOR-swizzled by row, so the 8 row
// addresses of an ldmatrix and the cp.async stores hit distinct banks.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash_attention_common.cuh"
#include "flash_attention_sm90.h"

namespace scaletrain::attention::cuda {
namespace {

// ---------------------------------------------------------------- shared-memory tiles

// Offset of element (row, col) in a row-major tile of kCols 16-bit elements (kCols >= 32): the
// 16-byte chunk index is XORed with bits of the row so that 8 consecutive rows at one column
// spread over the 32 banks.
template <int kCols>
__device__ __forceinline__ int swz(int row, int col) {
  constexpr int kChunks = kCols / 8;
  static_assert(kChunks == 4 || kChunks % 8 == 0, "tile width: 32 or a multiple of 64 elements");
  const int x = kChunks >= 8 ? (row & 7) : ((row >> 1) & 3);
  return row * kCols + ((((col >> 3) ^ x)) << 3) + (col & 7);
}

// rows x kCols elements from global rows `row_stride` apart; rows >= valid are zero-filled.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t row_stride, int valid, const T* safe) {
  constexpr int kChunks = kCols / 8;
#pragma unroll
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, ch = c % kChunks;
    const bool ok = r < valid;
    cp_async16(smem_u32(tile + swz<kCols>(r, ch * 8)), ok ? src + r * row_stride + ch * 8 : safe, ok ? 16 : 0);
  }
}

// A fragments (16 x 16, row-major in the tile) at (row0, col0).
template <int kCols, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int col0, int lane) {
  ldmatrix_x4(a, smem_u32(tile + swz<kCols>(row0 + (lane & 15), col0 + (lane >> 4) * 8)));
}
// A fragments of the transpose of the stored tile: A(m, k) = tile(k0 + k, m0 + m).
template <int kCols, typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int k0, int m0, int lane) {
  ldmatrix_x4_trans(a, smem_u32(tile + swz<kCols>(k0 + (lane & 7) + (lane >> 4) * 8, m0 + ((lane >> 3) & 1) * 8)));
}
// B fragments of two n8 tiles, k16, from a tile stored [n][k] (B = tile^T): {b0, b1} of n0 and of n0 + 8.
template <int kCols, typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  ldmatrix_x4(b, smem_u32(tile + swz<kCols>(n0 + (lane & 7) + (lane >> 4) * 8, k0 + ((lane >> 3) & 1) * 8)));
}
// B fragments of two n8 tiles, k16, from a tile stored [k][n]: {b0, b1} of n0 and of n0 + 8.
template <int kCols, typename T>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const T* tile, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, smem_u32(tile + swz<kCols>(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + (lane >> 4) * 8)));
}

// Writes a warp's 16 x kCols fp32 accumulators (C layout; rows row0..row0+15 and columns
// col0..col0+kCols-1 of a staging tile kD wide) as T to global rows `row_stride` apart (dst: the
// first row, column 0), through the warp's own part of the staging tile; rows >= valid are skipped.
template <typename T, int kD, int kCols = kD>
__device__ __forceinline__ void store_rows(const float (&acc)[kCols / 8][4], float mul0, float mul1, T* stage,
                                           int row0, int col0, T* dst, int64_t row_stride, int valid, int lane) {
#pragma unroll
  for (int j = 0; j < kCols / 8; ++j) {
    const int col = col0 + j * 8 + (lane & 3) * 2;
    *reinterpret_cast<uint32_t*>(stage + swz<kD>(row0 + (lane >> 2), col)) =
        Mma<T>::pack(acc[j][0] * mul0, acc[j][1] * mul0);
    *reinterpret_cast<uint32_t*>(stage + swz<kD>(row0 + (lane >> 2) + 8, col)) =
        Mma<T>::pack(acc[j][2] * mul1, acc[j][3] * mul1);
  }
  __syncwarp();
  constexpr int kChunks = kCols / 8;
#pragma unroll
  for (int c = lane; c < 16 * kChunks; c += 32) {
    const int r = c / kChunks, col = col0 + (c % kChunks) * 8;
    if (r < valid)
      *reinterpret_cast<uint4*>(dst + r * row_stride + col) =
          *reinterpret_cast<const uint4*>(stage + swz<kD>(row0 + r, col));
  }
}

// ---------------------------------------------------------------- forward

template <int kD>
struct ForwardTiles {
  // Each warp owns kMT m16 tiles (32 query rows): every K and V fragment it loads feeds kMT MMAs.
  static constexpr int kBM = 128, kBN = 64, kWarps = 4, kMT = kBM / (16 * kWarps), kThreads = kWarps * 32;
  static constexpr int kSmem = (kBM + 2 * kBN) * kD * 2;
};

template <typename T, int kD>
__global__ void __launch_bounds__(ForwardTiles<kD>::kThreads, 2) forward_kernel(Shape s, ForwardArgs a) {
  using Tiles = ForwardTiles<kD>;
  constexpr int kBM = Tiles::kBM, kBN = Tiles::kBN, kThreads = Tiles::kThreads, kMT = Tiles::kMT;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBM * kD;
  T* sV = sK + kBN * kD;

  const int m_block = gridDim.x - 1 - blockIdx.x;  // the longest causal rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence_of(s, b);
  const int m0 = m_block * kBM;
  if (m0 >= seq.lq) return;
  const int kvh = h / (s.heads / s.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = warp * kMT * 16;  // the warp's first row in the tile
  const T* q = at_row<T>(a.q, a.sq, b, seq.q_start + m0, h);
  const T* k = at_row<T>(a.k, a.sk, b, seq.k_start, kvh);
  const T* v = at_row<T>(a.v, a.sv, b, seq.k_start, kvh);
  const T* safe = static_cast<const T*>(a.q);
  const int shift = seq.lk - seq.lq;  // query i sees keys j <= i + shift (causal)
  const int n_end = s.causal ? min(seq.lk, max(0, m0 + kBM + shift)) : seq.lk;
  const int n_tiles = (n_end + kBN - 1) / kBN;
  const float scale_log2 = s.scale * kLog2e;  // > 0 (checked by the caller)

  float acc_o[kMT][kD / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) acc_o[mt][j][0] = acc_o[mt][j][1] = acc_o[mt][j][2] = acc_o[mt][j][3] = 0.f;
  // Per (m tile, half): the running maximum of the raw scores and this thread's share of the sum.
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) row_max[mt][0] = row_max[mt][1] = -INFINITY, row_sum[mt][0] = row_sum[mt][1] = 0.f;
  const int row_a = m0 + warp_row + (lane >> 2);  // rows row_a + 16 mt + 8 half

  if (n_tiles > 0) {
    load_tile<kBM, kD, kThreads>(sQ, q, a.sq.row, seq.lq - m0, safe);
    load_tile<kBN, kD, kThreads>(sK, k, a.sk.row, seq.lk, safe);
    cp_async_commit();
    for (int t = 0; t < n_tiles; ++t) {
      const int n0 = t * kBN;
      cp_async_wait<0>();
      __syncthreads();  // K is in; every warp is done with V
      load_tile<kBN, kD, kThreads>(sV, v + n0 * a.sv.row, a.sv.row, seq.lk - n0, safe);
      cp_async_commit();

      float acc_s[kMT][kBN / 8][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) acc_s[mt][j][0] = acc_s[mt][j][1] = acc_s[mt][j][2] = acc_s[mt][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t qf[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) load_a<kD>(qf[mt], sQ, warp_row + mt * 16, kk * 16, lane);
#pragma unroll
        for (int nn = 0; nn < kBN / 16; ++nn) {
          uint32_t bf[4];
          load_b<kD>(bf, sK, nn * 16, kk * 16, lane);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            Mma<T>::run(acc_s[mt][2 * nn], qf[mt], bf[0], bf[1]);
            Mma<T>::run(acc_s[mt][2 * nn + 1], qf[mt], bf[2], bf[3]);
          }
        }
      }
      const bool need_mask = n0 + kBN > seq.lk || (s.causal && n0 + kBN - 1 > m0 + shift);
      if (need_mask) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) mask_scores(acc_s[mt], n0, row_a + mt * 16, lane, seq.lk, s.causal, shift);
      }
      // Online softmax: new maxima, rescale what was accumulated, exponentiate.
      uint32_t pf[kMT][kBN / 16][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        online_softmax(acc_s[mt], acc_o[mt], row_max[mt], row_sum[mt], scale_log2);
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) to_a<T>(pf[mt][kk], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
      }
      cp_async_wait<0>();
      __syncthreads();  // V is in; every warp is done with K
      if (t + 1 < n_tiles) {
        load_tile<kBN, kD, kThreads>(sK, k + (n0 + kBN) * a.sk.row, a.sk.row, seq.lk - n0 - kBN, safe);
        cp_async_commit();
      }
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
        for (int dd = 0; dd < kD / 16; ++dd) {
          uint32_t bf[4];
          load_b_trans<kD>(bf, sV, kk * 16, dd * 16, lane);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            Mma<T>::run(acc_o[mt][2 * dd], pf[mt][kk], bf[0], bf[1]);
            Mma<T>::run(acc_o[mt][2 * dd + 1], pf[mt][kk], bf[2], bf[3]);
          }
        }
      }
    }
  }
  // Each warp read only its own rows of sQ: it stages its output there.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float inv[2], lse[2];
    finish_rows(row_max[mt], row_sum[mt], s.scale, inv, lse);
    const int first = warp_row + mt * 16;  // within the tile
    store_rows<T, kD>(acc_o[mt], inv[0], inv[1], sQ, first, 0, at_row<T>(a.out, a.so, b, seq.q_start + m0 + first, h),
                      a.so.row, seq.lq - m0 - first, lane);
    if ((lane & 3) == 0) {
      float* l = a.lse + b * a.sl.batch + h * a.sl.head + seq.q_start;
      const int row = row_a + mt * 16;
      if (row < seq.lq) l[row] = lse[0];
      if (row + 8 < seq.lq) l[row + 8] = lse[1];
    }
  }
}

// ---------------------------------------------------------------- backward

// delta = rowsum(dout * out) in fp32: 8 lanes per (row, head), 16-byte loads.
template <typename T, int kD>
__global__ void delta_kernel(Shape s, BackwardArgs a) {
  constexpr int kRowsPerBlock = 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence_of(s, b);
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 8, part = threadIdx.x % 8;
  if (blockIdx.x * kRowsPerBlock >= seq.lq) return;
  float sum = 0.f;
  if (row < seq.lq) {
    const T* o = at_row<T>(a.out, a.so, b, seq.q_start + row, h);
    const T* d = at_row<T>(a.dout, a.sdo, b, seq.q_start + row, h);
#pragma unroll
    for (int c = part; c < kD / 8; c += 8) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c * 8), dv = *reinterpret_cast<const uint4*>(d + c * 8);
      const T* op = reinterpret_cast<const T*>(&ov);
      const T* dp = reinterpret_cast<const T*>(&dv);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += static_cast<float>(op[e]) * static_cast<float>(dp[e]);
    }
  }
  sum += __shfl_xor_sync(0xffffffff, sum, 1);
  sum += __shfl_xor_sync(0xffffffff, sum, 2);
  sum += __shfl_xor_sync(0xffffffff, sum, 4);
  if (part == 0 && row < seq.lq) a.delta[b * a.sl.batch + h * a.sl.head + seq.q_start + row] = sum;
}

// What a backward block (a tile of kBN keys of one key/value head and sequence) shares between the
// two backward kernels: its steps (one per query head of the group and query tile that sees its
// keys, in that order) and the double-buffered loads of each step's Q, dO, lse and delta.
template <typename T, int kD, int kBM, int kBN, int kThreads>
struct KeyBlock : KeySteps<kBM> {
  const Shape& s;
  const BackwardArgs& a;
  T *sK, *sV, *sQ, *sdO;  // sQ, sdO, sLse, sDelta: two buffers each
  float *sLse, *sDelta;
  Sequence seq;
  int b, n0, shift;

  __device__ KeyBlock(const Shape& shape, const BackwardArgs& args, unsigned char* smem, int extra_elements)
      : KeySteps<kBM>(shape, sequence_of(shape, blockIdx.z), blockIdx.y, blockIdx.x * kBN), s(shape), a(args) {
    sK = reinterpret_cast<T*>(smem);
    sV = sK + kBN * kD;
    sQ = sV + kBN * kD;
    sdO = sQ + 2 * kBM * kD;
    sLse = reinterpret_cast<float*>(sdO + 2 * kBM * kD + extra_elements);
    sDelta = sLse + 2 * kBM;
    b = blockIdx.z;
    seq = sequence_of(s, b);
    n0 = blockIdx.x * kBN;
    shift = seq.lk - seq.lq;
  }
  // The shared memory a kernel asks for: the common tiles + `extra_elements` of T.
  static constexpr int smem_bytes(int extra_elements) {
    return (2 * kBN * kD + 4 * kBM * kD + extra_elements) * 2 + 4 * kBM * 4;
  }
  __device__ T* extra() const { return sdO + 2 * kBM * kD; }

  __device__ void load_step(int step, int buf) const {
    const int h = this->head(step), m = this->m0(step), valid = seq.lq - m;
    const T* safe = static_cast<const T*>(a.q);
    load_tile<kBM, kD, kThreads>(sQ + buf * kBM * kD, at_row<T>(a.q, a.sq, b, seq.q_start + m, h), a.sq.row, valid,
                                 safe);
    load_tile<kBM, kD, kThreads>(sdO + buf * kBM * kD, at_row<T>(a.dout, a.sdo, b, seq.q_start + m, h), a.sdo.row,
                                 valid, safe);
    const int64_t l = b * a.sl.batch + h * a.sl.head + seq.q_start + m;
    load_row_floats<kBM, kThreads>(sLse + buf * kBM, a.lse + l, valid, a.lse);
    load_row_floats<kBM, kThreads>(sDelta + buf * kBM, a.delta + l, valid, a.lse);
  }
  // The K and V tiles and the first step's tiles, as one cp.async group.
  __device__ void load_first() const {
    const T* safe = static_cast<const T*>(a.q);
    load_tile<kBN, kD, kThreads>(sK, at_row<T>(a.k, a.sk, b, seq.k_start + n0, this->kvh), a.sk.row, seq.lk - n0, safe);
    load_tile<kBN, kD, kThreads>(sV, at_row<T>(a.v, a.sv, b, seq.k_start + n0, this->kvh), a.sv.row, seq.lk - n0, safe);
    load_step(0, 0);
    cp_async_commit();
  }
  // Waits for step `step`'s tiles and starts loading the next step's into the other buffers.
  __device__ void begin_step(int step) const {
    cp_async_wait<0>();
    __syncthreads();
    if (step + 1 < this->steps) {
      load_step(step + 1, (step & 1) ^ 1);
      cp_async_commit();
    }
  }
  // Writes one m16 tile of a warp's dK (times the scale) and dV, columns col0.., through the K and V
  // tiles (every warp must be done with them).
  template <int kCols>
  __device__ void store_dk_dv(const float (&dk)[kCols / 8][4], const float (&dv)[kCols / 8][4], int first, int col0,
                              int lane) const {
    const int valid = seq.lk - n0 - first;
    store_rows<T, kD, kCols>(dk, s.scale, s.scale, sK, first, col0,
                             at_row<T>(a.dk, a.sdk, b, seq.k_start + n0 + first, this->kvh), a.sdk.row, valid, lane);
    store_rows<T, kD, kCols>(dv, 1.f, 1.f, sV, first, col0, at_row<T>(a.dv, a.sdv, b, seq.k_start + n0 + first, this->kvh),
                             a.sdv.row, valid, lane);
  }
  // Adds a warp's 16 x kCols dQ accumulators (rows row_a and row_a + 8 of the step's query tile
  // for this thread, columns col0..) into dq_accum.
  template <int kCols>
  __device__ void add_dq(const float (&acc)[kCols / 8][4], int h, int row_a, int col0, int lane) const {
    float* dq = a.dq_accum + b * a.sdq.batch + static_cast<int64_t>(seq.q_start) * a.sdq.row + h * a.sdq.head;
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) {
      const int col = col0 + j * 8 + (lane & 3) * 2;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_a + half * 8;
        if (row < seq.lq) {
          atomicAdd(dq + static_cast<int64_t>(row) * a.sdq.row + col, acc[j][2 * half]);
          atomicAdd(dq + static_cast<int64_t>(row) * a.sdq.row + col + 1, acc[j][2 * half + 1]);
        }
      }
    }
  }
};

template <int kD>
struct BackwardTiles {
  // Each warp owns kNT m16 tiles of keys (their dK and dV in registers); with two, every Q and dO
  // fragment it loads feeds two MMAs (head_dim 64; 128 has no registers for it).
  static constexpr int kBN = 128, kBM = 32, kNT = kD <= 64 ? 2 : 1, kWarps = kBN / (16 * kNT),
                       kThreads = kWarps * 32;
  // dQ = dS K: warps as kBM / 16 row groups x the rest over head_dim.
  static constexpr int kRowGroups = kBM / 16, kColGroups = kWarps / kRowGroups, kDqCols = kD / kColGroups;
  static constexpr int kSmem = KeyBlock<__half, kD, kBM, kBN, kThreads>::smem_bytes(kBN * kBM);
};

// kDq: also add dS K into dq_accum (else the deterministic dQ kernel computes dq).
template <typename T, int kD, bool kDq>
__global__ void __launch_bounds__(BackwardTiles<kD>::kThreads, 1) backward_kernel(Shape s, BackwardArgs a) {
  using Tiles = BackwardTiles<kD>;
  constexpr int kBM = Tiles::kBM, kBN = Tiles::kBN, kThreads = Tiles::kThreads, kNT = Tiles::kNT;
  extern __shared__ __align__(128) unsigned char smem[];
  const KeyBlock<T, kD, kBM, kBN, kThreads> blk(s, a, smem, kBN * kBM);
  T* sdS = blk.extra();  // dS^T: rows keys, columns queries
  const Sequence& seq = blk.seq;
  const int n0 = blk.n0, shift = blk.shift;
  if (n0 >= seq.lk) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_key = warp * kNT * 16;  // the warp's first key in the tile
  const float scale_log2 = s.scale * kLog2e;

  float acc_dk[kNT][kD / 8][4], acc_dv[kNT][kD / 8][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int j = 0; j < kD / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[nt][j][e] = acc_dv[nt][j][e] = 0.f;

  if (blk.steps > 0) blk.load_first();
  const int key_a = n0 + warp_key + (lane >> 2);  // this thread's keys: key_a + 16 nt + 8 half
  for (int step = 0; step < blk.steps; ++step) {
    const int buf = step & 1, h = blk.head(step), m0 = blk.m0(step);
    blk.begin_step(step);
    const T* q = blk.sQ + buf * kBM * kD;
    const T* dout = blk.sdO + buf * kBM * kD;
    const float* lse = blk.sLse + buf * kBM;
    const float* delta = blk.sDelta + buf * kBM;

    // S^T = K Q^T and dP^T = V dO^T: this warp's keys x kBM queries.
    float acc_s[kNT][kBM / 8][4], acc_dp[kNT][kBM / 8][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int j = 0; j < kBM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[nt][j][e] = acc_dp[nt][j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t kf[kNT][4], vf[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        load_a<kD>(kf[nt], blk.sK, warp_key + nt * 16, kk * 16, lane);
        load_a<kD>(vf[nt], blk.sV, warp_key + nt * 16, kk * 16, lane);
      }
#pragma unroll
      for (int nn = 0; nn < kBM / 16; ++nn) {
        uint32_t bq[4], bd[4];
        load_b<kD>(bq, q, nn * 16, kk * 16, lane);
        load_b<kD>(bd, dout, nn * 16, kk * 16, lane);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          Mma<T>::run(acc_s[nt][2 * nn], kf[nt], bq[0], bq[1]);
          Mma<T>::run(acc_s[nt][2 * nn + 1], kf[nt], bq[2], bq[3]);
          Mma<T>::run(acc_dp[nt][2 * nn], vf[nt], bd[0], bd[1]);
          Mma<T>::run(acc_dp[nt][2 * nn + 1], vf[nt], bd[2], bd[3]);
        }
      }
    }
    // P^T = exp(S^T * scale - lse) (0 where masked or past the sequence), dS^T = P^T (dP^T - delta).
    const bool need_mask = m0 + kBM > seq.lq || n0 + kBN > seq.lk || (s.causal && n0 + kBN - 1 > m0 + shift);
#pragma unroll
    for (int j = 0; j < kBM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = j * 8 + (lane & 3) * 2 + (e & 1);  // query within the tile
        const float lse2 = lse[c] * kLog2e, dc = delta[c];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          const int key = key_a + nt * 16 + (e >> 1) * 8;
          float p = fast_exp2(fmaf(acc_s[nt][j][e], scale_log2, -lse2));
          if (need_mask && (m0 + c >= seq.lq || key >= seq.lk || (s.causal && key > m0 + c + shift))) p = 0.f;
          acc_s[nt][j][e] = p;
          acc_dp[nt][j][e] = p * (acc_dp[nt][j][e] - dc);
        }
      }
    // dV += P^T dO, dK += dS^T Q (k = queries); dS^T to shared memory for dQ (rows keys, columns queries).
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t pf[kNT][4], df[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        to_a<T>(pf[nt], acc_s[nt][2 * kk], acc_s[nt][2 * kk + 1]);
        to_a<T>(df[nt], acc_dp[nt][2 * kk], acc_dp[nt][2 * kk + 1]);
        if constexpr (kDq) {
          const int r = warp_key + nt * 16 + (lane >> 2), c = kk * 16 + (lane & 3) * 2;
          *reinterpret_cast<uint32_t*>(sdS + swz<kBM>(r, c)) = df[nt][0];
          *reinterpret_cast<uint32_t*>(sdS + swz<kBM>(r + 8, c)) = df[nt][1];
          *reinterpret_cast<uint32_t*>(sdS + swz<kBM>(r, c + 8)) = df[nt][2];
          *reinterpret_cast<uint32_t*>(sdS + swz<kBM>(r + 8, c + 8)) = df[nt][3];
        }
      }
#pragma unroll
      for (int dd = 0; dd < kD / 16; ++dd) {
        uint32_t bo[4], bq[4];
        load_b_trans<kD>(bo, dout, kk * 16, dd * 16, lane);
        load_b_trans<kD>(bq, q, kk * 16, dd * 16, lane);
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          Mma<T>::run(acc_dv[nt][2 * dd], pf[nt], bo[0], bo[1]);
          Mma<T>::run(acc_dv[nt][2 * dd + 1], pf[nt], bo[2], bo[3]);
          Mma<T>::run(acc_dk[nt][2 * dd], df[nt], bq[0], bq[1]);
          Mma<T>::run(acc_dk[nt][2 * dd + 1], df[nt], bq[2], bq[3]);
        }
      }
    }
    // dQ (kBM x kD) += dS K: this warp's 16 query rows x kDqCols columns, k = the kBN keys.
    if constexpr (kDq) {
      __syncthreads();  // dS^T complete
      constexpr int kCols = Tiles::kDqCols;
      const int rg = warp % Tiles::kRowGroups, cg = warp / Tiles::kRowGroups;
      float acc_dq[kCols / 8][4];
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) acc_dq[j][0] = acc_dq[j][1] = acc_dq[j][2] = acc_dq[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t af[4];
        load_a_trans<kBM>(af, sdS, kk * 16, rg * 16, lane);
#pragma unroll
        for (int dd = 0; dd < kCols / 16; ++dd) {
          uint32_t bf[4];
          load_b_trans<kD>(bf, blk.sK, kk * 16, cg * kCols + dd * 16, lane);
          Mma<T>::run(acc_dq[2 * dd], af, bf[0], bf[1]);
          Mma<T>::run(acc_dq[2 * dd + 1], af, bf[2], bf[3]);
        }
      }
      blk.template add_dq<kCols>(acc_dq, h, m0 + rg * 16 + (lane >> 2), cg * kCols, lane);
    }
  }
  __syncthreads();  // every warp is done with the K and V tiles: stage dK and dV there
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) blk.template store_dk_dv<kD>(acc_dk[nt], acc_dv[nt], warp_key + nt * 16, 0, lane);
}

// The backward with P^T and dS^T through shared memory (FlashAttention-2's partition; for head_dim
// 128, whose dK and dV do not fit one warp's registers): kBN = 128 keys, kBM = 64 queries, 8 warps.
//   S^T, dP^T: 4 key groups of 32 x 2 query groups of 32; P^T and dS^T go to shared memory.
//   dV += P^T dO, dK += dS^T Q: 4 key groups of 32 x 2 halves of head_dim (the accumulators).
//   dQ += dS K: 2 query groups of 32 x 4 quarters of head_dim, added to dq_accum with atomics.
template <int kD>
struct SplitBackwardTiles {
  static constexpr int kBN = 128, kBM = 64, kWarps = 8, kThreads = kWarps * 32;
  static constexpr int kSmem = KeyBlock<__half, kD, kBM, kBN, kThreads>::smem_bytes(2 * kBN * kBM);
};

template <typename T, int kD, bool kDq>
__global__ void __launch_bounds__(SplitBackwardTiles<kD>::kThreads, 1)
    split_backward_kernel(Shape s, BackwardArgs a) {
  using Tiles = SplitBackwardTiles<kD>;
  constexpr int kBM = Tiles::kBM, kBN = Tiles::kBN, kThreads = Tiles::kThreads;
  constexpr int kHalf = kD / 2, kQuarter = kD / 4;
  extern __shared__ __align__(128) unsigned char smem[];
  const KeyBlock<T, kD, kBM, kBN, kThreads> blk(s, a, smem, 2 * kBN * kBM);
  T* sP = blk.extra();      // P^T: rows keys, columns queries
  T* sdS = sP + kBN * kBM;  // dS^T
  const Sequence& seq = blk.seq;
  const int n0 = blk.n0, shift = blk.shift;
  if (n0 >= seq.lk) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kg = warp % 4, half = warp / 4;  // phases 1 and 2: keys kg * 32.., queries or columns by half
  const float scale_log2 = s.scale * kLog2e;

  float acc_dk[2][kHalf / 8][4], acc_dv[2][kHalf / 8][4];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int j = 0; j < kHalf / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[nt][j][e] = acc_dv[nt][j][e] = 0.f;

  if (blk.steps > 0) blk.load_first();
  for (int step = 0; step < blk.steps; ++step) {
    const int buf = step & 1, h = blk.head(step), m0 = blk.m0(step);
    blk.begin_step(step);  // also: the last step's readers of sP and sdS are done
    const T* q = blk.sQ + buf * kBM * kD;
    const T* dout = blk.sdO + buf * kBM * kD;
    const float* lse = blk.sLse + buf * kBM;
    const float* delta = blk.sDelta + buf * kBM;

    // Phase 1: S^T and dP^T for keys kg * 32.. x queries half * 32..
    {
      float acc_s[2][4][4], acc_dp[2][4][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[nt][j][e] = acc_dp[nt][j][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t kf[2][4], vf[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          load_a<kD>(kf[nt], blk.sK, kg * 32 + nt * 16, kk * 16, lane);
          load_a<kD>(vf[nt], blk.sV, kg * 32 + nt * 16, kk * 16, lane);
        }
#pragma unroll
        for (int nn = 0; nn < 2; ++nn) {
          uint32_t bq[4], bd[4];
          load_b<kD>(bq, q, half * 32 + nn * 16, kk * 16, lane);
          load_b<kD>(bd, dout, half * 32 + nn * 16, kk * 16, lane);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            Mma<T>::run(acc_s[nt][2 * nn], kf[nt], bq[0], bq[1]);
            Mma<T>::run(acc_s[nt][2 * nn + 1], kf[nt], bq[2], bq[3]);
            Mma<T>::run(acc_dp[nt][2 * nn], vf[nt], bd[0], bd[1]);
            Mma<T>::run(acc_dp[nt][2 * nn + 1], vf[nt], bd[2], bd[3]);
          }
        }
      }
      const bool need_mask = m0 + kBM > seq.lq || n0 + kBN > seq.lk || (s.causal && n0 + kBN - 1 > m0 + shift);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c0 = half * 32 + j * 8 + (lane & 3) * 2;  // query within the tile
        const float lse0 = lse[c0] * kLog2e, lse1 = lse[c0 + 1] * kLog2e, d0 = delta[c0], d1 = delta[c0 + 1];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          float p[4], ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = c0 + (e & 1), key_local = kg * 32 + nt * 16 + (lane >> 2) + (e >> 1) * 8;
            const int key = n0 + key_local;
            p[e] = fast_exp2(fmaf(acc_s[nt][j][e], scale_log2, -((e & 1) ? lse1 : lse0)));
            if (need_mask && (m0 + c >= seq.lq || key >= seq.lk || (s.causal && key > m0 + c + shift))) p[e] = 0.f;
            ds[e] = p[e] * (acc_dp[nt][j][e] - ((e & 1) ? d1 : d0));
          }
          const int r = kg * 32 + nt * 16 + (lane >> 2);
          *reinterpret_cast<uint32_t*>(sP + swz<kBM>(r, c0)) = Mma<T>::pack(p[0], p[1]);
          *reinterpret_cast<uint32_t*>(sP + swz<kBM>(r + 8, c0)) = Mma<T>::pack(p[2], p[3]);
          *reinterpret_cast<uint32_t*>(sdS + swz<kBM>(r, c0)) = Mma<T>::pack(ds[0], ds[1]);
          *reinterpret_cast<uint32_t*>(sdS + swz<kBM>(r + 8, c0)) = Mma<T>::pack(ds[2], ds[3]);
        }
      }
    }
    __syncthreads();  // P^T and dS^T complete
    // Phase 2: dV += P^T dO and dK += dS^T Q for keys kg * 32.. x columns half * kHalf..
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      uint32_t pa[2][4], da[2][4];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        load_a<kBM>(pa[nt], sP, kg * 32 + nt * 16, kk * 16, lane);
        load_a<kBM>(da[nt], sdS, kg * 32 + nt * 16, kk * 16, lane);
      }
#pragma unroll
      for (int dd = 0; dd < kHalf / 16; ++dd) {
        uint32_t bo[4], bq[4];
        load_b_trans<kD>(bo, dout, kk * 16, half * kHalf + dd * 16, lane);
        load_b_trans<kD>(bq, q, kk * 16, half * kHalf + dd * 16, lane);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          Mma<T>::run(acc_dv[nt][2 * dd], pa[nt], bo[0], bo[1]);
          Mma<T>::run(acc_dv[nt][2 * dd + 1], pa[nt], bo[2], bo[3]);
          Mma<T>::run(acc_dk[nt][2 * dd], da[nt], bq[0], bq[1]);
          Mma<T>::run(acc_dk[nt][2 * dd + 1], da[nt], bq[2], bq[3]);
        }
      }
    }
    // Phase 3: dQ += dS K for queries (warp % 2) * 32.. x columns (warp / 2) * kQuarter..
    if constexpr (kDq) {
      const int rg = warp % 2, cg = warp / 2;
      float acc_dq[2][kQuarter / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < kQuarter / 8; ++j) acc_dq[mt][j][0] = acc_dq[mt][j][1] = acc_dq[mt][j][2] = acc_dq[mt][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t af[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) load_a_trans<kBM>(af[mt], sdS, kk * 16, rg * 32 + mt * 16, lane);
#pragma unroll
        for (int dd = 0; dd < kQuarter / 16; ++dd) {
          uint32_t bf[4];
          load_b_trans<kD>(bf, blk.sK, kk * 16, cg * kQuarter + dd * 16, lane);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Mma<T>::run(acc_dq[mt][2 * dd], af[mt], bf[0], bf[1]);
            Mma<T>::run(acc_dq[mt][2 * dd + 1], af[mt], bf[2], bf[3]);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        blk.template add_dq<kQuarter>(acc_dq[mt], h, m0 + rg * 32 + mt * 16 + (lane >> 2), cg * kQuarter, lane);
    }
  }
  __syncthreads();  // every warp is done with the K and V tiles: stage dK and dV there
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
    blk.template store_dk_dv<kHalf>(acc_dk[nt], acc_dv[nt], kg * 32 + nt * 16, half * kHalf, lane);
}

// The deterministic dQ (torch.use_deterministic_algorithms): one block of 4 warps per (64 query
// rows, head, sequence), each warp 16 rows with its Q and dO fragments in registers; key and
// value tiles of 64 rows stream through double-buffered shared memory. Per tile: S = Q K^T and
// dP = dO V^T, P and dS = P (dP - delta) in registers, dQ += dS K. dq = scale * dQ is written once,
// in the inputs' dtype: no atomics, so the same inputs give the same bits.
template <int kD>
struct DqTiles {
  static constexpr int kBM = 64, kBN = 64, kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kSmem = (2 * kBM * kD + 4 * kBN * kD) * 2;  // Q, dO; K and V double-buffered
};

template <typename T, int kD>
__global__ void __launch_bounds__(DqTiles<kD>::kThreads, 1) dq_kernel(Shape s, BackwardArgs a) {
  using Tiles = DqTiles<kD>;
  constexpr int kBM = Tiles::kBM, kBN = Tiles::kBN, kThreads = Tiles::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBM * kD;
  T* sK = sdO + kBM * kD;     // two buffers
  T* sV = sK + 2 * kBN * kD;  // two buffers

  const int m_block = gridDim.x - 1 - blockIdx.x;  // the longest causal rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const Sequence seq = sequence_of(s, b);
  const int m0 = m_block * kBM;
  if (m0 >= seq.lq) return;
  const int kvh = h / (s.heads / s.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* safe = static_cast<const T*>(a.q);
  const T* k = at_row<T>(a.k, a.sk, b, seq.k_start, kvh);
  const T* v = at_row<T>(a.v, a.sv, b, seq.k_start, kvh);
  const int shift = seq.lk - seq.lq;
  const int n_end = s.causal ? min(seq.lk, max(0, m0 + kBM + shift)) : seq.lk;
  const int n_tiles = (n_end + kBN - 1) / kBN;
  const float scale_log2 = s.scale * kLog2e;
  const int row_a = m0 + warp * 16 + (lane >> 2);  // this thread's rows: row_a and row_a + 8
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_a + 8 * r;
    const int64_t l = b * a.sl.batch + h * a.sl.head + seq.q_start + row;
    lse2[r] = row < seq.lq ? a.lse[l] * kLog2e : 0.f;
    dlt[r] = row < seq.lq ? a.delta[l] : 0.f;
  }
  float acc_dq[kD / 8][4];
#pragma unroll
  for (int j = 0; j < kD / 8; ++j) acc_dq[j][0] = acc_dq[j][1] = acc_dq[j][2] = acc_dq[j][3] = 0.f;

  if (n_tiles > 0) {
    load_tile<kBM, kD, kThreads>(sQ, at_row<T>(a.q, a.sq, b, seq.q_start + m0, h), a.sq.row, seq.lq - m0, safe);
    load_tile<kBM, kD, kThreads>(sdO, at_row<T>(a.dout, a.sdo, b, seq.q_start + m0, h), a.sdo.row, seq.lq - m0,
                                 safe);
    load_tile<kBN, kD, kThreads>(sK, k, a.sk.row, seq.lk, safe);
    load_tile<kBN, kD, kThreads>(sV, v, a.sv.row, seq.lk, safe);
    cp_async_commit();
    uint32_t qf[kD / 16][4], of[kD / 16][4];
    for (int t = 0; t < n_tiles; ++t) {
      const int n0 = t * kBN, buf = t & 1;
      cp_async_wait<0>();
      __syncthreads();  // tile t is in; every warp is done with tile t - 1's buffers
      if (t == 0) {
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          load_a<kD>(qf[kk], sQ, warp * 16, kk * 16, lane);
          load_a<kD>(of[kk], sdO, warp * 16, kk * 16, lane);
        }
      }
      if (t + 1 < n_tiles) {
        load_tile<kBN, kD, kThreads>(sK + (buf ^ 1) * kBN * kD, k + (n0 + kBN) * a.sk.row, a.sk.row,
                                     seq.lk - n0 - kBN, safe);
        load_tile<kBN, kD, kThreads>(sV + (buf ^ 1) * kBN * kD, v + (n0 + kBN) * a.sv.row, a.sv.row,
                                     seq.lk - n0 - kBN, safe);
        cp_async_commit();
      }
      const T* tk = sK + buf * kBN * kD;
      const T* tv = sV + buf * kBN * kD;
      float acc_s[kBN / 8][4], acc_dp[kBN / 8][4];
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[j][e] = acc_dp[j][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
#pragma unroll
        for (int nn = 0; nn < kBN / 16; ++nn) {
          uint32_t bk[4], bv[4];
          load_b<kD>(bk, tk, nn * 16, kk * 16, lane);
          load_b<kD>(bv, tv, nn * 16, kk * 16, lane);
          Mma<T>::run(acc_s[2 * nn], qf[kk], bk[0], bk[1]);
          Mma<T>::run(acc_s[2 * nn + 1], qf[kk], bk[2], bk[3]);
          Mma<T>::run(acc_dp[2 * nn], of[kk], bv[0], bv[1]);
          Mma<T>::run(acc_dp[2 * nn + 1], of[kk], bv[2], bv[3]);
        }
      }
      const bool need_mask = m0 + kBM > seq.lq || n0 + kBN > seq.lk || (s.causal && n0 + kBN - 1 > m0 + shift);
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n0 + j * 8 + (lane & 3) * 2 + (e & 1), row = row_a + (e >> 1) * 8;
          float p = fast_exp2(fmaf(acc_s[j][e], scale_log2, -lse2[e >> 1]));
          if (need_mask && (row >= seq.lq || col >= seq.lk || (s.causal && col > row + shift))) p = 0.f;
          acc_dp[j][e] = p * (acc_dp[j][e] - dlt[e >> 1]);
        }
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        uint32_t df[4];
        to_a<T>(df, acc_dp[2 * kk], acc_dp[2 * kk + 1]);
#pragma unroll
        for (int dd = 0; dd < kD / 16; ++dd) {
          uint32_t bf[4];
          load_b_trans<kD>(bf, tk, kk * 16, dd * 16, lane);
          Mma<T>::run(acc_dq[2 * dd], df, bf[0], bf[1]);
          Mma<T>::run(acc_dq[2 * dd + 1], df, bf[2], bf[3]);
        }
      }
    }
  }
  // Each warp read only its own rows of sQ: it stages its dq there.
  store_rows<T, kD>(acc_dq, s.scale, s.scale, sQ, warp * 16, 0,
                    at_row<T>(a.dq, a.sdq_out, b, seq.q_start + m0 + warp * 16, h), a.sdq_out.row,
                    seq.lq - m0 - warp * 16, lane);
}

// ---------------------------------------------------------------- launchers

template <typename T, int kD>
struct Delta {
  static cudaError_t run(const Shape& s, const BackwardArgs& a, cudaStream_t stream) {
    delta_kernel<T, kD><<<dim3((s.q_len + 31) / 32, s.heads, s.batch), 256, 0, stream>>>(s, a);
    return cudaGetLastError();
  }
};
template <typename T, int kD>
struct DkDv {
  template <bool kDq>
  static cudaError_t launch(const Shape& s, const BackwardArgs& a, cudaStream_t stream) {
    if constexpr (kD > 64) {  // dK and dV of 128 columns do not fit one warp's registers: split them
      using Tiles = SplitBackwardTiles<kD>;
      return launch_with_smem(split_backward_kernel<T, kD, kDq>,
                              dim3((s.k_len + Tiles::kBN - 1) / Tiles::kBN, s.kv_heads, s.batch), Tiles::kThreads,
                              Tiles::kSmem, stream, s, a);
    } else {
      using Tiles = BackwardTiles<kD>;
      return launch_with_smem(backward_kernel<T, kD, kDq>,
                              dim3((s.k_len + Tiles::kBN - 1) / Tiles::kBN, s.kv_heads, s.batch), Tiles::kThreads,
                              Tiles::kSmem, stream, s, a);
    }
  }
  static cudaError_t run(const Shape& s, const BackwardArgs& a, bool with_dq, cudaStream_t stream) {
    return with_dq ? launch<true>(s, a, stream) : launch<false>(s, a, stream);
  }
};
template <typename T, int kD>
struct Dq {
  static cudaError_t run(const Shape& s, const BackwardArgs& a, cudaStream_t stream) {
    using Tiles = DqTiles<kD>;
    return launch_with_smem(dq_kernel<T, kD>, dim3((s.q_len + Tiles::kBM - 1) / Tiles::kBM, s.heads, s.batch),
                            Tiles::kThreads, Tiles::kSmem, stream, s, a);
  }
};

template <typename T, int kD>
struct Forward {
  static cudaError_t run(const Shape& s, const ForwardArgs& a, cudaStream_t stream) {
    using Tiles = ForwardTiles<kD>;
    return launch_with_smem(forward_kernel<T, kD>, dim3((s.q_len + Tiles::kBM - 1) / Tiles::kBM, s.heads, s.batch),
                            Tiles::kThreads, Tiles::kSmem, stream, s, a);
  }
};

}  // namespace

bool supports_head_dim(int dim) { return dim == 64 || dim == 128; }

namespace {
thread_local const char* last_forward = nullptr;
}  // namespace

const char* last_forward_kernel() { return last_forward; }
void note_forward_kernel(const char* name) { last_forward = name; }

bool hopper_kernels_enabled() {
#ifdef SCALETRAIN_WITH_SM90
  const char* env = std::getenv("SCALETRAIN_FLASH_SM90");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

cudaError_t launch_forward(DType type, const Shape& shape, const ForwardArgs& args, cudaStream_t stream) {
#ifdef SCALETRAIN_WITH_SM90
  if (hopper_kernels_enabled()) return sm90::launch_forward(type, shape, args, stream);
#endif
  note_forward_kernel("portable");
  return dispatch<Forward>(type, shape.dim, shape, args, stream);
}

cudaError_t launch_backward(DType type, const Shape& shape, const BackwardArgs& args, bool deterministic,
                            cudaStream_t stream) {
  cudaError_t err = dispatch<Delta>(type, shape.dim, shape, args, stream);
  if (err != cudaSuccess) return err;
#ifdef SCALETRAIN_WITH_SM90
  if (hopper_kernels_enabled())
    err = sm90::launch_dk_dv(type, shape, args, !deterministic, stream);
  else
#endif
    err = dispatch<DkDv>(type, shape.dim, shape, args, !deterministic, stream);
  if (err != cudaSuccess || !deterministic) return err;
  return dispatch<Dq>(type, shape.dim, shape, args, stream);
}

}  // namespace scaletrain::attention::cuda
