#pragma once
// Hopper warpgroup MMA (wgmma, sm_90a) wrappers for the sm90 flash attention kernels: fp32
// accumulators of m64nNk16 (N/2 floats per thread, the m16n8 accumulator layout repeated over N/8
// column blocks: d[4j + e] is row lane/4 + 8 (e / 2), column 8j + 2 (lane % 4) + e % 2 of the warp's
// 16 rows), A from shared memory (K-major) or from registers (the mma.sync m16n8k16 A layout), B
// from shared memory through a matrix descriptor. `accumulate` 0: D = A B, else D += A B.
// Shared-memory tiles use the 128-byte swizzle (sw128 below).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace scaletrain::attention::cuda::sm90 {

// A 128-byte-swizzled shared-memory matrix descriptor: start address, leading and stride byte
// offsets (PTX ISA "matrix descriptor"); the tile's 1024-byte atoms must be 1024-aligned.
__device__ __forceinline__ uint64_t matrix_desc(uint32_t addr, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(leading >> 4) << 16) |
         (static_cast<uint64_t>(stride >> 4) << 32) | (1ull << 62);
}

// Orders this thread's earlier shared-memory writes (cp.async included) before later reads by the
// async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma fences and waits.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for A fragments held in registers.
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// ---- mbarriers, named barriers and bulk tensor copies (the warp-specialised forward).

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the other threads and to the copy engine.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives and announces `bytes` of bulk copies that complete the phase.
__device__ __forceinline__ void mbar_expect_bytes(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Named barrier `id` (0 is __syncthreads) among `threads` threads: wait for it, or only arrive.
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// The box at coordinates (c0, c1, c2, c3) of a 4-d tensor map (a __grid_constant__ kernel parameter)
// into shared memory at dst; its bytes complete a phase of the barrier `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* map, uint32_t bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

template <typename T, int N>
struct Wgmma;

// The accumulator operands and their numbers in the asm strings below.
#define SCALETRAIN_WGMMA_D32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SCALETRAIN_WGMMA_D64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define SCALETRAIN_WGMMA_R32 \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define SCALETRAIN_WGMMA_R64 \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"

// Wgmma<T, N> for the PTX type TY: ss (A and B from shared memory; K-major unless kTransA / kTransB
// is 1: MN-major, A stored [k][m], B stored [k][n]) and rs (A from registers, B from shared memory
// MN-major, stored [k][n]). A, B, ACC, TRANS (ss) and RA, RB, RACC (rs): the operand numbers of A,
// B, the accumulate flag and the two transpose flags after the N / 2 accumulators.
#define SCALETRAIN_WGMMA(T, TY, N, DREGS, DOPS, A, B, ACC, TRANS, RA, RB, RACC)                                      \
  template <>                                                                                                  \
  struct Wgmma<T, N> {                                                                                          \
    template <int kTransA = 0, int kTransB = 0>                                                                \
    __device__ __forceinline__ static void ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {     \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " ACC ", 0;\n"                                             \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" DREGS "}, " A ", " B         \
                   ", p, 1, 1, " TRANS ";\n}\n"                                                                 \
                   : DOPS                                                                                      \
                   : "l"(a), "l"(b), "r"(accumulate), "n"(kTransA), "n"(kTransB));                             \
    }                                                                                                          \
    __device__ __forceinline__ static void rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b,            \
                                              int accumulate) {                                                \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RACC ", 0;\n"                                            \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" DREGS "}, {" RA "}, " RB   \
                   ", p, 1, 1, 1;\n}\n"                                                                         \
                   : DOPS                                                                                      \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));                     \
    }                                                                                                          \
  };

#define SCALETRAIN_WGMMA_64(T, TY)                                                                           \
  SCALETRAIN_WGMMA(T, TY, 64, SCALETRAIN_WGMMA_R32, SCALETRAIN_WGMMA_D32, "%32", "%33", "%34", "%35, %36", \
                   "%32,%33,%34,%35", \
                   "%36", "%37")
#define SCALETRAIN_WGMMA_128(T, TY)                                                                          \
  SCALETRAIN_WGMMA(T, TY, 128, SCALETRAIN_WGMMA_R64, SCALETRAIN_WGMMA_D64, "%64", "%65", "%66", "%67, %68", \
                   "%64,%65,%66,%67", "%68", "%69")
SCALETRAIN_WGMMA_64(__nv_bfloat16, "bf16")
SCALETRAIN_WGMMA_128(__nv_bfloat16, "bf16")
SCALETRAIN_WGMMA_64(__half, "f16")
SCALETRAIN_WGMMA_128(__half, "f16")
#undef SCALETRAIN_WGMMA_128
#undef SCALETRAIN_WGMMA_64
#undef SCALETRAIN_WGMMA
#undef SCALETRAIN_WGMMA_R64
#undef SCALETRAIN_WGMMA_R32
#undef SCALETRAIN_WGMMA_D64
#undef SCALETRAIN_WGMMA_D32

}  // namespace scaletrain::attention::cuda::sm90
