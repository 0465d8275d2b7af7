// Kernel variants of the AMP optimizer step (read-only gradient pass for the inf flag and the global
// norm, then AdamW applying the clip factor) on GPT-2 124M's 148 fp32 parameter shapes, timed one
// against another: how many tensors per launch, elements per block, vectors in flight per thread,
// cache hints, block order. A timing harness only (the arithmetic mirrors src/amp/grad_check.cu and
// src/optim/adamw.cu; their tests check the results); not part of the build:
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -o amp_step_variants \
//     benchmarks/cuda/amp_step_variants.cu && ./amp_step_variants
//
// Each line: the gradient pass alone and the full step (median of 30 after 5 warm-up, the
// gradients restored before each outside the timing), and the full step's fraction of the copy
// bound (32 bytes per parameter at the measured device-to-device copy bandwidth).
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s line %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

struct Span { float* p; const float* g; float* m; float* v; float* step; int64_t n; };
constexpr int kThreads = 256;

template <int MAXT> struct Batch { Span s[MAXT]; int64_t cb[MAXT + 1]; int count; int64_t total; };
template <int MAXT> struct GBatch { const float* d[MAXT]; int64_t n[MAXT]; int64_t cb[MAXT + 1]; int count; };

template <bool HINT> __device__ __forceinline__ float4 ld(const float* p) {
  if constexpr (HINT) return __ldcs(reinterpret_cast<const float4*>(p));
  else return *reinterpret_cast<const float4*>(p);
}
template <bool HINT> __device__ __forceinline__ void st(float* p, float4 x) {
  if constexpr (HINT) __stcs(reinterpret_cast<float4*>(p), x);
  else *reinterpret_cast<float4*>(p) = x;
}

struct Coeffs { float factor, decay, b1, omb1, b2, omb2, step_size, bc2, eps; };
__device__ __forceinline__ void elem(float& p, float& m, float& v, float g, const Coeffs& c) {
  g *= c.factor; p *= c.decay; m = m * c.b1 + g * c.omb1; v = v * c.b2 + c.omb2 * (g * g);
  const float d = sqrtf(v) / c.bc2 + c.eps; p = p + (-c.step_size) * (m / d);
}

template <int MAXT, int U, int CHUNK, bool HINT, bool REV>
__global__ void __launch_bounds__(kThreads) adamw(Batch<MAXT> b, const float* factor, const float* found) {
  if (*found != 0.f) return;
  const int64_t chunk = REV ? b.total - 1 - blockIdx.x : blockIdx.x;
  int lo = 0, hi = b.count - 1;
  while (lo < hi) { int mid = (lo + hi + 1) / 2; if (b.cb[mid] <= chunk) lo = mid; else hi = mid - 1; }
  const Span& s = b.s[lo];
  const int64_t start = (chunk - b.cb[lo]) * CHUNK;
  int64_t size = s.n - start; if (size > CHUNK) size = CHUNK;
  const double step = *s.step, lr = 1e-4;
  Coeffs c; c.factor = *factor; c.decay = float(1.0 - lr * 0.1); c.b1 = 0.9f; c.omb1 = float(1.0 - 0.9);
  c.b2 = 0.95f; c.omb2 = float(1.0 - 0.95); c.step_size = float(lr / (1.0 - pow(0.9, step)));
  c.bc2 = float(sqrt(1.0 - pow(0.95, step))); c.eps = 1e-8f;
  float* p = s.p + start; const float* g = s.g + start; float* m = s.m + start; float* v = s.v + start;
  constexpr int64_t kStride = int64_t{kThreads} * 4 * U;
  const int64_t vend = size / kStride * kStride;
  for (int64_t base = threadIdx.x * 4; base < vend; base += kStride) {
    float4 pv[U], gv[U], mv[U], vv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) { int64_t i = base + int64_t{u} * kThreads * 4;
      pv[u] = ld<HINT>(p + i); gv[u] = ld<HINT>(g + i); mv[u] = ld<HINT>(m + i); vv[u] = ld<HINT>(v + i); }
#pragma unroll
    for (int u = 0; u < U; ++u) { int64_t i = base + int64_t{u} * kThreads * 4;
      elem(pv[u].x, mv[u].x, vv[u].x, gv[u].x, c); elem(pv[u].y, mv[u].y, vv[u].y, gv[u].y, c);
      elem(pv[u].z, mv[u].z, vv[u].z, gv[u].z, c); elem(pv[u].w, mv[u].w, vv[u].w, gv[u].w, c);
      st<HINT>(p + i, pv[u]); st<HINT>(m + i, mv[u]); st<HINT>(v + i, vv[u]); }
  }
  for (int64_t i = vend + threadIdx.x; i < size; i += kThreads) { float pe = p[i], me = m[i], ve = v[i]; elem(pe, me, ve, g[i], c); p[i] = pe; m[i] = me; v[i] = ve; }
}

template <int MAXT> __global__ void incr(Batch<MAXT> b, const float* found) {
  if (*found != 0.f) return;
  for (int i = threadIdx.x; i < b.count; i += blockDim.x) *b.s[i].step += 1.f;
}

__device__ __forceinline__ float block_sum(float x) {
  __shared__ float ws[32];
  for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(~0u, x, o);
  if (threadIdx.x % 32 == 0) ws[threadIdx.x / 32] = x;
  __syncthreads();
  x = threadIdx.x < blockDim.x / 32 ? ws[threadIdx.x] : 0.f;
  if (threadIdx.x < 32) for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(~0u, x, o);
  return x;
}

template <int MAXT, int U, int CHUNK, bool HINT>
__global__ void __launch_bounds__(kThreads) check(GBatch<MAXT> b, float inv, float* ws, int64_t first) {
  const int64_t chunk = blockIdx.x;
  int lo = 0, hi = b.count - 1;
  while (lo < hi) { int mid = (lo + hi + 1) / 2; if (b.cb[mid] <= chunk) lo = mid; else hi = mid - 1; }
  const int64_t start = (chunk - b.cb[lo]) * CHUNK;
  int64_t size = b.n[lo] - start; if (size > CHUNK) size = CHUNK;
  const float* d = b.d[lo] + start;
  float sq = 0.f; bool bad = false;
  constexpr int64_t kStride = int64_t{kThreads} * 4 * U;
  const int64_t vend = size / kStride * kStride;
  for (int64_t base = threadIdx.x * 4; base < vend; base += kStride) {
    float4 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) x[u] = ld<HINT>(d + base + int64_t{u} * kThreads * 4);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float e[4] = {x[u].x * inv, x[u].y * inv, x[u].z * inv, x[u].w * inv};
#pragma unroll
      for (int j = 0; j < 4; ++j) { bad |= !(fabsf(e[j]) <= FLT_MAX); sq = fmaf(e[j], e[j], sq); }
    }
  }
  for (int64_t i = vend + threadIdx.x; i < size; i += kThreads) { float e = d[i] * inv; bad |= !(fabsf(e) <= FLT_MAX); sq = fmaf(e, e, sq); }
  const bool any = __syncthreads_or(bad);
  sq = block_sum(sq);
  if (threadIdx.x == 0) { ws[4 + first + blockIdx.x] = sq; if (any) ws[0] = 1.f; }
}

__global__ void __launch_bounds__(1024) finalize(float* ws, int64_t chunks, float inv, float max_norm) {
  double s = 0; for (int64_t i = threadIdx.x; i < chunks; i += blockDim.x) s += ws[4 + i];
  __shared__ double w[32];
  for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(~0u, s, o);
  if (threadIdx.x % 32 == 0) w[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) { s = w[threadIdx.x]; for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(~0u, s, o); }
  if (threadIdx.x == 0) { float n = float(sqrt(s)); ws[1] = n; ws[2] = inv * fminf(1.f, max_norm / (n + 1e-6f)); }
}

// ---- harness
std::vector<int64_t> shapes() {
  std::vector<int64_t> v = {50304LL * 768, 1024LL * 768};
  for (int l = 0; l < 12; ++l) for (int64_t s : {768LL, 768LL, 2304LL * 768, 2304LL, 768LL * 768, 768LL, 768LL, 768LL, 3072LL * 768, 3072LL, 768LL * 3072, 768LL}) v.push_back(s);
  v.push_back(768); v.push_back(768);
  return v;
}

struct Data { std::vector<Span> spans; float *gsaved, *gslab; size_t gbytes; float* ws; float* found; int64_t n = 0; };

float* slab(std::vector<int64_t>& offs, const std::vector<int64_t>& sh, size_t& bytes) {
  int64_t o = 0; offs.clear();
  for (auto s : sh) { offs.push_back(o); o += (s + 127) / 128 * 128; }
  bytes = o * 4; float* p; CK(cudaMalloc(&p, bytes)); return p;
}

__global__ void fill(float* p, int64_t n, float a, uint32_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    p[i] = a * ((h & 0xffff) / 65536.f - 0.5f);
  }
}

Data make() {
  Data d; auto sh = shapes(); std::vector<int64_t> offs; size_t b;
  float* P = slab(offs, sh, b); float* M = slab(offs, sh, b); float* V = slab(offs, sh, b);
  d.gslab = slab(offs, sh, b); d.gsaved = slab(offs, sh, b); d.gbytes = b;
  fill<<<1024, 256>>>(P, b / 4, 1.f, 1); fill<<<1024, 256>>>(d.gsaved, b / 4, 2048.f, 2);
  CK(cudaMemset(M, 0, b)); CK(cudaMemset(V, 0, b));
  float* steps; CK(cudaMalloc(&steps, sh.size() * 4)); CK(cudaMemset(steps, 0, sh.size() * 4));
  CK(cudaMalloc(&d.ws, (4 + 20000) * 4)); CK(cudaMemset(d.ws, 0, (4 + 20000) * 4));
  for (size_t i = 0; i < sh.size(); ++i) { d.spans.push_back({P + offs[i], d.gslab + offs[i], M + offs[i], V + offs[i], steps + i, sh[i]}); d.n += sh[i]; }
  return d;
}

template <int MAXT, int U, int CHUNK, bool HINT>
void launch_check(Data& d, cudaStream_t st) {
  int64_t first = 0;
  for (size_t f = 0; f < d.spans.size(); f += MAXT) {
    GBatch<MAXT> b{}; b.count = std::min<int64_t>(MAXT, d.spans.size() - f); int64_t ch = 0;
    for (int i = 0; i < b.count; ++i) { b.d[i] = d.spans[f + i].g; b.n[i] = d.spans[f + i].n; b.cb[i] = ch; ch += (b.n[i] + CHUNK - 1) / CHUNK; }
    b.cb[b.count] = ch;
    check<MAXT, U, CHUNK, HINT><<<ch, kThreads, 0, st>>>(b, 1.f / 1024, d.ws, first);
    first += ch;
  }
  finalize<<<1, 1024, 0, st>>>(d.ws, first, 1.f / 1024, 1.f);
}

template <int MAXT, int U, int CHUNK, bool HINT, bool REV>
void launch_adamw(Data& d, cudaStream_t st) {
  for (size_t f = 0; f < d.spans.size(); f += MAXT) {
    Batch<MAXT> b{}; b.count = std::min<int64_t>(MAXT, d.spans.size() - f); int64_t ch = 0;
    for (int i = 0; i < b.count; ++i) { b.s[i] = d.spans[f + i]; b.cb[i] = ch; ch += (b.s[i].n + CHUNK - 1) / CHUNK; }
    b.cb[b.count] = ch; b.total = ch;
    incr<MAXT><<<1, 64, 0, st>>>(b, d.ws);
    adamw<MAXT, U, CHUNK, HINT, REV><<<ch, kThreads, 0, st>>>(b, d.ws + 2, d.ws);
  }
}

template <typename F>
float timeit(Data& d, F f, int iters = 30) {
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < iters + 5; ++i) {
    CK(cudaMemcpyAsync(d.gslab, d.gsaved, d.gbytes, cudaMemcpyDeviceToDevice, 0));
    CK(cudaEventRecord(a, 0)); f(); CK(cudaEventRecord(b, 0)); CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b)); if (i >= 5) t.push_back(ms);
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end()); return t[t.size() / 2];
}

template <int CMAXT, int CU, int CCH, bool CH, int AMAXT, int AU, int ACH, bool AH, bool REV>
void variant(Data& d, const char* name, double bw) {
  auto chk = [&] { CK(cudaMemsetAsync(d.ws, 0, 4, 0)); launch_check<CMAXT, CU, CCH, CH>(d, 0); };
  auto adw = [&] { launch_adamw<AMAXT, AU, ACH, AH, REV>(d, 0); };
  float tc = timeit(d, chk), ta = timeit(d, [&] { chk(); adw(); });
  float tc2 = timeit(d, chk);
  const double floor_ms = 32.0 * d.n / bw / 1e6;
  printf("%-52s check %.4f  full %.4f ms  adamw~%.4f  (floor %.4f, %.1f%% of copy)\n", name, std::min(tc, tc2), ta,
         ta - std::min(tc, tc2), floor_ms, 100 * floor_ms / ta);
}

int main() {
  Data d = make();
  CK(cudaDeviceSynchronize());
  // copy bandwidth: 1 GiB
  float *x, *y; size_t n = 256 << 20; CK(cudaMalloc(&x, n * 4)); CK(cudaMalloc(&y, n * 4)); CK(cudaMemset(x, 0, n * 4));
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b); std::vector<float> t;
  for (int i = 0; i < 35; ++i) { cudaEventRecord(a); cudaMemcpyAsync(y, x, n * 4, cudaMemcpyDeviceToDevice); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms, a, b); if (i >= 5) t.push_back(ms); }
  std::sort(t.begin(), t.end()); double bw = 2.0 * n * 4 / t[15] / 1e6;
  printf("params %lld tensors %zu copy %.0f GB/s\n", (long long)d.n, d.spans.size(), bw);
  CK(cudaFree(x)); CK(cudaFree(y));
  // <check: tensors per launch, vectors in flight, chunk, cache hints | adamw: the same, reversed order>
  variant<96, 1, 32768, false, 48, 2, 65536, false, false>(d, "before 10b843a (c96 u1 32k | a48 u2 64k)", bw);
  variant<160, 1, 32768, false, 160, 2, 65536, false, false>(d, "one launch each", bw);
  variant<160, 4, 32768, false, 160, 2, 65536, false, false>(d, "one launch, check u4", bw);
  variant<160, 4, 65536, false, 160, 2, 65536, false, false>(d, "one launch, check u4 64k", bw);
  variant<160, 4, 32768, true, 160, 2, 65536, false, false>(d, "one launch, check u4 cs", bw);
  variant<160, 4, 32768, false, 160, 4, 65536, false, false>(d, "one launch, check u4, adamw u4", bw);
  variant<160, 4, 32768, false, 160, 2, 32768, false, false>(d, "one launch, check u4, adamw 32k", bw);
  variant<160, 4, 32768, false, 160, 2, 16384, false, false>(d, "one launch, check u4, adamw 16k (as 10b843a)", bw);
  variant<160, 4, 32768, false, 160, 2, 65536, true, false>(d, "one launch, check u4, adamw cs", bw);
  variant<160, 4, 32768, false, 160, 2, 65536, false, true>(d, "one launch, check u4, adamw rev", bw);
  variant<160, 4, 32768, false, 160, 2, 32768, true, true>(d, "one launch, check u4, adamw 32k cs rev", bw);
  variant<160, 4, 32768, false, 160, 4, 32768, true, true>(d, "one launch, check u4, adamw u4 32k cs rev", bw);
  variant<160, 4, 32768, false, 160, 1, 32768, false, true>(d, "one launch, check u4, adamw u1 32k rev", bw);
  variant<96, 1, 32768, false, 48, 2, 65536, false, false>(d, "before 10b843a, again", bw);
  return 0;
}
