// The Hopper flash attention kernels (flash_attention_sm90.cu) against the portable ones
// (flash_attention.cu) without torch: outputs, log-sum-exps and the three gradients on odd shapes
// (GQA, q_len != k_len, causal), every output written (poisoned first), then TFLOP/s of both,
// forward and backward (2.5x the forward's FLOPs), on the benchmark's cases. Each Hopper forward
// (SCALETRAIN_FLASH_SM90_FORWARD persistent, blocks, cpasync) is checked and timed.
// With an argument, only three small cases (for compute-sanitizer). Built and run on a Hopper GPU
// by tools/gpu/flash_sm90_check.sh.
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <algorithm>
#include <string>
#include <cuda_bf16.h>
#include "attention/flash_attention_cuda.h"
#include "attention/flash_attention_sm90.h"
using namespace scaletrain::attention::cuda;
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); exit(1);} } while (0)

struct Case { int B, H, KVH, Lq, Lk, D; bool causal; };

static float bf2f(__nv_bfloat16 x) { return __bfloat162float(x); }

static void use_hopper(bool on) { setenv("SCALETRAIN_FLASH_SM90", on ? "1" : "0", 1); }

// Relative RMS difference of two device bf16 buffers (y against x), the largest absolute one, and
// how many of y are not finite.
static bool compare(const char* what, const __nv_bfloat16* x_dev, const __nv_bfloat16* y_dev, size_t n, double tol) {
  std::vector<__nv_bfloat16> x(n), y(n);
  CK(cudaMemcpy(x.data(), x_dev, n * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(y.data(), y_dev, n * 2, cudaMemcpyDeviceToHost));
  double num = 0, den = 0, maxd = 0;
  size_t nonfinite = 0;
  for (size_t i = 0; i < n; ++i) {
    const float a = bf2f(x[i]), b = bf2f(y[i]);
    if (!std::isfinite(b)) { ++nonfinite; continue; }
    num += (a - b) * (a - b); den += a * a; maxd = std::max(maxd, (double)std::fabs(a - b));
  }
  const double rel = std::sqrt(num / std::max(den, 1e-30));
  const bool bad = nonfinite || rel > tol;
  printf(" %s rel %.2e max %.3e%s%s", what, rel, maxd, nonfinite ? " NONFINITE" : "", bad ? " BAD" : "");
  return bad;
}

static __global__ void scale_to_bf16(const float* x, __nv_bfloat16* y, size_t n, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16(x[i] * scale);
}

template <typename F>
static float median_ms(F&& fn) {
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  std::vector<float> ts;
  for (int it = 0; it < 30; ++it) {
    CK(cudaEventRecord(e0));
    fn();
    CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
    float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); if (it >= 5) ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// Backward of both kernels on the same inputs (the portable forward's out and lse): dq, dk, dv
// compared; then timed.
static int run_backward(const Case& c, const Shape& s, const ForwardArgs& f, bool time_it) {
  const size_t nq = (size_t)c.B * c.Lq * c.H * c.D, nk = (size_t)c.B * c.Lk * c.KVH * c.D, nl = (size_t)c.B * c.H * c.Lq;
  std::vector<__nv_bfloat16> hdo(nq);
  for (auto& x : hdo) x = __float2bfloat16((rand() / (float)RAND_MAX - 0.5f) * 2.f);
  __nv_bfloat16 *dout, *dq[2], *dk[2], *dv[2];
  float *delta, *acc;
  CK(cudaMalloc(&dout, nq * 2)); CK(cudaMalloc(&delta, nl * 4)); CK(cudaMalloc(&acc, nq * 4));
  CK(cudaMemcpy(dout, hdo.data(), nq * 2, cudaMemcpyHostToDevice));
  for (int i = 0; i < 2; ++i) {
    CK(cudaMalloc(&dq[i], nq * 2)); CK(cudaMalloc(&dk[i], nk * 2)); CK(cudaMalloc(&dv[i], nk * 2));
    CK(cudaMemset(dk[i], 0xff, nk * 2)); CK(cudaMemset(dv[i], 0xff, nk * 2));
  }
  BackwardArgs a{};
  a.q = f.q; a.k = f.k; a.v = f.v; a.out = f.out; a.dout = dout;
  a.sq = f.sq; a.sk = f.sk; a.sv = f.sv; a.so = f.so; a.sdo = f.sq;
  a.lse = f.lse; a.delta = delta; a.sl = f.sl; a.dq_accum = acc; a.sdq = f.sq;
  a.sdk = f.sk; a.sdv = f.sk;
  int bad = 0;
  printf("  backward:");
  for (int i = 0; i < 2; ++i) {
    use_hopper(i == 1);
    a.dk = dk[i]; a.dv = dv[i];
    CK(cudaMemset(acc, 0, nq * 4));
    CK(launch_backward(DType::bf16, s, a, false, 0));
    scale_to_bf16<<<1024, 256>>>(acc, dq[i], nq, s.scale);
    CK(cudaDeviceSynchronize());
  }
  bad += compare("dq", dq[0], dq[1], nq, 1e-2);
  bad += compare("dk", dk[0], dk[1], nk, 1e-2);
  bad += compare("dv", dv[0], dv[1], nk, 1e-2);
  printf("%s\n", bad ? "  BAD" : "  ok");
  if (time_it) {
    const double flops = 2.5 * 4.0 * c.B * c.H * (double)c.Lq * c.Lk * c.D * (c.causal ? 0.5 : 1.0);
    float ms[2];
    for (int i = 0; i < 2; ++i) {
      use_hopper(i == 1);
      ms[i] = median_ms([&] {
        CK(cudaMemsetAsync(acc, 0, nq * 4));
        CK(launch_backward(DType::bf16, s, a, false, 0));
      });
    }
    printf("time bwd hd%d s%d %s: mma.sync %.1f TFLOP/s, wgmma %.1f TFLOP/s, %.2fx (dq_accum memset included)\n", c.D,
           c.Lq, c.causal ? "causal" : "nc", flops / ms[0] / 1e9, flops / ms[1] / 1e9, ms[0] / ms[1]);
  }
  cudaFree(dout); cudaFree(delta); cudaFree(acc);
  for (int i = 0; i < 2; ++i) { cudaFree(dq[i]); cudaFree(dk[i]); cudaFree(dv[i]); }
  return bad;
}

int run(const Case& c, bool time_it, bool check) {
  size_t nq = (size_t)c.B * c.Lq * c.H * c.D, nk = (size_t)c.B * c.Lk * c.KVH * c.D;
  std::vector<__nv_bfloat16> hq(nq), hk(nk), hv(nk);
  srand(c.Lq * 7 + c.D + c.causal);
  auto rnd = [] { return (rand() / (float)RAND_MAX - 0.5f) * 3.f; };
  for (auto& x : hq) x = __float2bfloat16(rnd());
  for (auto& x : hk) x = __float2bfloat16(rnd());
  for (auto& x : hv) x = __float2bfloat16(rnd());
  __nv_bfloat16 *q, *k, *v, *o1, *o2; float *l1, *l2;
  CK(cudaMalloc(&q, nq * 2)); CK(cudaMalloc(&k, nk * 2)); CK(cudaMalloc(&v, nk * 2));
  CK(cudaMalloc(&o1, nq * 2)); CK(cudaMalloc(&o2, nq * 2));
  size_t nl = (size_t)c.B * c.H * c.Lq;
  CK(cudaMalloc(&l1, nl * 4)); CK(cudaMalloc(&l2, nl * 4));
  CK(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(k, hk.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemset(o1, 0xff, nq * 2)); CK(cudaMemset(o2, 0xff, nq * 2));
  CK(cudaMemset(l1, 0xff, nl * 4)); CK(cudaMemset(l2, 0xff, nl * 4));
  Shape s; s.batch = c.B; s.heads = c.H; s.kv_heads = c.KVH; s.dim = c.D; s.q_len = c.Lq; s.k_len = c.Lk;
  s.causal = c.causal; s.scale = 1.f / std::sqrt((float)c.D);
  ForwardArgs a1{};
  a1.q = q; a1.k = k; a1.v = v;
  a1.sq = {(int64_t)c.Lq * c.H * c.D, (int64_t)c.H * c.D, c.D};
  a1.sk = {(int64_t)c.Lk * c.KVH * c.D, (int64_t)c.KVH * c.D, c.D};
  a1.sv = a1.sk; a1.so = a1.sq;
  a1.sl = {(int64_t)c.H * c.Lq, 1, c.Lq};
  ForwardArgs a2 = a1;
  a1.out = o1; a1.lse = l1; a2.out = o2; a2.lse = l2;
  use_hopper(false);
  CK(launch_forward(DType::bf16, s, a1, 0));
  CK(cudaDeviceSynchronize());
  int bad = 0;
  // Each Hopper forward (SCALETRAIN_FLASH_SM90_FORWARD) against the portable one.
  const char* variants[] = {"persistent", "blocks", "cpasync", "persistent", "blocks"};
  const char* consumers[] = {"2", "2", "2", "3", "3"};  // consumer warpgroups (head_dim 64 only)
  const int n_variants = c.D == 64 ? 5 : 3;
  float ms[6] = {0, 0, 0, 0, 0, 0};
  const double flops = 4.0 * c.B * c.H * (double)c.Lq * c.Lk * c.D * (c.causal ? 0.5 : 1.0);
  if (time_it) ms[0] = median_ms([&] { CK(launch_forward(DType::bf16, s, a1, 0)); });
  for (int vi = 0; vi < n_variants; ++vi) {
    setenv("SCALETRAIN_FLASH_SM90_FORWARD", variants[vi], 1);
    setenv("SCALETRAIN_FLASH_SM90_CONSUMERS", consumers[vi], 1);
    CK(cudaMemset(o2, 0xff, nq * 2)); CK(cudaMemset(l2, 0xff, nl * 4));
    CK(sm90::launch_forward(DType::bf16, s, a2, 0));
    CK(cudaDeviceSynchronize());
    if (check) {
      std::vector<__nv_bfloat16> r1(nq), r2(nq); std::vector<float> m1(nl), m2(nl);
      CK(cudaMemcpy(r1.data(), o1, nq * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(r2.data(), o2, nq * 2, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(m1.data(), l1, nl * 4, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(m2.data(), l2, nl * 4, cudaMemcpyDeviceToHost));
      double num = 0, den = 0, maxd = 0; size_t nan = 0, firstbad = (size_t)-1;
      for (size_t i = 0; i < nq; ++i) {
        float x = bf2f(r1[i]), y = bf2f(r2[i]);
        if (!std::isfinite(y)) { ++nan; if (firstbad == (size_t)-1) firstbad = i; continue; }
        num += (x - y) * (x - y); den += x * x; maxd = std::max(maxd, (double)std::fabs(x - y));
        if (std::fabs(x - y) > 0.1 && firstbad == (size_t)-1) firstbad = i;
      }
      double lmax = 0; size_t lnan = 0;
      for (size_t i = 0; i < nl; ++i) {
        if (std::isinf(m1[i]) && std::isinf(m2[i])) continue;
        if (!std::isfinite(m2[i])) { ++lnan; continue; }
        lmax = std::max(lmax, (double)std::fabs(m1[i] - m2[i]));
      }
      double rel = std::sqrt(num / std::max(den, 1e-30));
      // The variant asked for must be the kernel that ran (a layout the copy engine cannot take
      // would fall back to cpasync silently).
      const char* ran = last_forward_kernel();
      const std::string want = vi == 2 ? "cpasync" : std::string(variants[vi]) + "/" + (c.D == 64 ? consumers[vi] : "2");
      const int b = nan || lnan || rel > 5e-3 || lmax > 1e-3 || ran == nullptr || want != ran;
      bad += b;
      printf("check %-12s B%d H%d/%d q%d k%d d%d %s: rel %.2e max %.3e lse %.2e nonfinite %zu/%zu %s", ran ? ran : "none",
             c.B, c.H, c.KVH, c.Lq, c.Lk, c.D, c.causal ? "causal" : "", rel, maxd, lmax, nan, lnan, b ? "BAD" : "ok");
      if (firstbad != (size_t)-1) {
        size_t i = firstbad; int d = i % c.D, h = (i / c.D) % c.H, row = (i / c.D / c.H) % c.Lq;
        printf(" first bad row %d head %d col %d: %f vs %f", row, h, d, bf2f(r1[i]), bf2f(r2[i]));
      }
      printf("\n");
    }
    if (time_it) ms[vi + 1] = median_ms([&] { CK(sm90::launch_forward(DType::bf16, s, a2, 0)); });
  }
  unsetenv("SCALETRAIN_FLASH_SM90_FORWARD");
  unsetenv("SCALETRAIN_FLASH_SM90_CONSUMERS");
  if (time_it) {
    printf("time hd%d s%d %s: mma.sync %.1f, persistent %.1f, blocks %.1f, cpasync %.1f", c.D, c.Lq,
           c.causal ? "causal" : "nc", flops / ms[0] / 1e9, flops / ms[1] / 1e9, flops / ms[2] / 1e9, flops / ms[3] / 1e9);
    if (c.D == 64) printf(", 3 consumers: persistent %.1f, blocks %.1f", flops / ms[4] / 1e9, flops / ms[5] / 1e9);
    printf(" TFLOP/s\n");
  }
  if (check) bad += run_backward(c, s, a1, time_it);
  cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o1); cudaFree(o2); cudaFree(l1); cudaFree(l2);
  return bad;
}

int main(int argc, char** argv) {
  int bad = 0;
  if (argc > 1) {  // small: a few cases for compute-sanitizer
    // The last: more work items than multiprocessors, most rows seeing no key (persistent blocks
    // walking several items, some without a key tile).
    Case small[] = {{1, 2, 2, 127, 127, 64, true}, {1, 2, 1, 300, 77, 128, true}, {2, 2, 2, 129, 300, 128, false},
                    {2, 80, 8, 257, 1, 64, true}};
    for (auto& c : small) bad += run(c, false, true);
    printf("%s\n", bad ? "SOME BAD" : "ALL OK");
    return bad;
  }
  Case checks[] = {{1, 2, 2, 127, 127, 64, true}, {2, 4, 1, 1000, 1000, 128, false}, {1, 2, 2, 17, 1000, 64, true},
                   {1, 2, 1, 4097, 4097, 128, true}, {2, 2, 2, 1, 129, 64, false}, {1, 3, 3, 300, 77, 128, true},
                   {2, 4, 2, 513, 1030, 64, false}, {1, 2, 2, 1000, 300, 64, true}};
  for (auto& c : checks) bad += run(c, false, true);
  for (int D : {64, 128})
    for (bool causal : {false, true})
      for (int S : {512, 1024, 4096, 16384}) {
        Case c{16384 / S, 2048 / D, 2048 / D, S, S, D, causal};
        bad += run(c, true, true);
      }
  printf("%s\n", bad ? "SOME BAD" : "ALL OK");
  return bad ? 1 : 0;
}
