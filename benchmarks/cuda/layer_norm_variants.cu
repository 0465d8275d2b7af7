// Kernel variants of the fused LayerNorm backward (src/model/layer_norm.cu) on GPT-2's rows (16384
// x 768 and x 1024: fp32 input and d sum, bf16 d out and d residual, fp32 weight), timed one
// against another and against a streaming kernel that moves the same bytes: whether d sum is
// loaded with the row or after its reductions, whether the weight and bias sums live in registers
// or in shared memory (registers decide how many warps share an SM), warps per block. A timing
// harness only (the library's tests check the kernels' results; here every variant is compared
// with the library's kernel); not part of the build:
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -Isrc -Iinclude \
//     -o layer_norm_variants benchmarks/cuda/layer_norm_variants.cu && ./layer_norm_variants
//
// Each line: median microseconds of 50 launches after 5 warm-up, the bytes moved at that time
// (GB/s), and the largest difference from the library kernel's d x and d weight.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "model/layer_norm.cu"

#define CK(x)                                                                   \
  do {                                                                          \
    cudaError_t e = (x);                                                        \
    if (e != cudaSuccess) {                                                     \
      printf("CUDA %s line %d\n", cudaGetErrorString(e), __LINE__);             \
      exit(1);                                                                  \
    }                                                                           \
  } while (0)

namespace scaletrain::model::cuda {
namespace {

// kPrefetch: d sum is loaded with x and d out (one round trip a row); kSmemSums: each warp adds
// its d weight / d bias terms into its own slice of shared memory instead of registers.
template <int kChunks, int kWarps, int kMinBlocks, bool kPrefetch, bool kSmemSums>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) variant(LayerNormBackwardArgs a, LayerNormShape s) {
  extern __shared__ float shared[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float inv_cols = 1.f / static_cast<float>(s.cols);
  constexpr int kRegSums = kSmemSums ? 1 : kChunks;
  float dw[kRegSums][4], db[kRegSums][4];
  float* mine = shared + int64_t{warp} * 2 * s.cols;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t col = (int64_t{c} * 32 + lane) * 4;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (kSmemSums) {
        if (col < s.cols) mine[col + e] = mine[s.cols + col + e] = 0.f;
      } else {
        dw[c][e] = db[c][e] = 0.f;
      }
    }
  }
  for (int64_t row = int64_t{blockIdx.x} * kWarps + warp; row < s.rows; row += int64_t{gridDim.x} * kWarps) {
    const int64_t base = row * s.cols;
    const float mean = a.mean[row], rstd = a.rstd[row];
    float x[kChunks][4], dy[kChunks][4], ds[kChunks][4];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (int64_t{c} * 32 + lane) * 4;
      if (col >= s.cols) continue;
      load4(a.input, a.x_type, base + col, x[c]);
      load4(a.grad_out, a.out_type, base + col, dy[c]);
      if constexpr (kPrefetch) load4(a.grad_sum, a.x_type, base + col, ds[c]);
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (int64_t{c} * 32 + lane) * 4;
      if (col >= s.cols) continue;
      float w[4];
      load4(a.weight, a.param_type, col, w);
      float4 tw, tb;
      if constexpr (kSmemSums) {
        tw = *reinterpret_cast<float4*>(mine + col);
        tb = *reinterpret_cast<float4*>(mine + s.cols + col);
      }
      float* pw = &tw.x;
      float* pb = &tb.x;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float xh = (x[c][e] - mean) * rstd, g = dy[c][e] * w[e];
        sum_g += g;
        sum_gx += g * xh;
        if constexpr (kSmemSums) {
          pw[e] += dy[c][e] * xh;
          pb[e] += dy[c][e];
        } else {
          dw[c][e] += dy[c][e] * xh;
          db[c][e] += dy[c][e];
        }
      }
      if constexpr (kSmemSums) {
        *reinterpret_cast<float4*>(mine + col) = tw;
        *reinterpret_cast<float4*>(mine + s.cols + col) = tb;
      }
    }
    const float mean_g = warp_sum(sum_g) * inv_cols, mean_gx = warp_sum(sum_gx) * inv_cols;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (int64_t{c} * 32 + lane) * 4;
      if (col >= s.cols) continue;
      if constexpr (!kPrefetch) load4(a.grad_sum, a.x_type, base + col, ds[c]);
      float w[4], dx[4];
      load4(a.weight, a.param_type, col, w);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float xh = (x[c][e] - mean) * rstd, g = dy[c][e] * w[e];
        dx[e] = (g - mean_g - xh * mean_gx) * rstd + ds[c][e];
      }
      store4(a.grad_x, a.x_type, base + col, dx);
      store4(a.grad_residual, a.residual_type, base + col, dx);
    }
  }
  if constexpr (kSmemSums) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < 2 * s.cols; i += blockDim.x) {
      float sum = 0.f;
      for (int w = 0; w < kWarps; ++w) sum += shared[int64_t{w} * 2 * s.cols + i];
      const int64_t which = i / s.cols, col = i % s.cols;
      a.partials[(which * gridDim.x + blockIdx.x) * s.cols + col] = sum;
    }
  } else {
    for (int w = 0; w < kWarps; ++w) {
      if (warp == w) {
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int64_t col = (int64_t{c} * 32 + lane) * 4;
          if (col >= s.cols) continue;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            shared[col + e] = w == 0 ? dw[c][e] : shared[col + e] + dw[c][e];
            shared[s.cols + col + e] = w == 0 ? db[c][e] : shared[s.cols + col + e] + db[c][e];
          }
        }
      }
      __syncthreads();
    }
    for (int64_t i = threadIdx.x; i < 2 * s.cols; i += blockDim.x) {
      const int64_t which = i / s.cols, col = i % s.cols;
      a.partials[(which * gridDim.x + blockIdx.x) * s.cols + col] = shared[i];
    }
  }
}

// The same bytes as the backward (x, d out, d sum read; d x, d residual written), streamed.
__global__ void stream_bytes(const float* x, const __nv_bfloat16* dy, const float* ds, float* gx, __nv_bfloat16* gr,
                             int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4; i += int64_t{gridDim.x} * blockDim.x) {
    const float4 a = reinterpret_cast<const float4*>(x)[i], c = reinterpret_cast<const float4*>(ds)[i];
    const BFloat4 b = reinterpret_cast<const BFloat4*>(dy)[i];
    float4 o = make_float4(a.x + c.x + to_float(b.x[0]), a.y + c.y + to_float(b.x[1]), a.z + c.z + to_float(b.x[2]),
                           a.w + c.w + to_float(b.x[3]));
    reinterpret_cast<float4*>(gx)[i] = o;
    BFloat4 r;
    r.x[0] = from_float<__nv_bfloat16>(o.x), r.x[1] = from_float<__nv_bfloat16>(o.y);
    r.x[2] = from_float<__nv_bfloat16>(o.z), r.x[3] = from_float<__nv_bfloat16>(o.w);
    reinterpret_cast<BFloat4*>(gr)[i] = r;
  }
}

}  // namespace
}  // namespace scaletrain::model::cuda

using namespace scaletrain::model::cuda;

template <typename F>
float median_us(F&& f) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < 55; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (i >= 5) t.push_back(ms * 1000.f);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Buffers {
  int64_t rows, cols;
  float *x, *ds, *gx, *mean, *rstd, *w, *partials, *dwdb;
  __nv_bfloat16 *dy, *gr;
};

std::vector<float> host(const float* p, int64_t n) {
  std::vector<float> h(n);
  CK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost));
  return h;
}

__global__ void fill(float* p, int64_t n, uint32_t seed, float scale, float offset) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 13, h *= 0x5bd1e995u, h ^= h >> 15;
    p[i] = offset + scale * (static_cast<float>(h & 0xffffff) / 16777216.f - 0.5f);
  }
}
__global__ void to_bf16(const float* p, __nv_bfloat16* q, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    q[i] = __float2bfloat16_rn(p[i]);
}

LayerNormBackwardArgs args_of(Buffers& b) {
  return {b.dy, DType::bf16, b.ds, b.x, DType::f32, b.mean, b.rstd, b.w, DType::f32, b.gx, b.gr, DType::bf16,
          b.partials, b.dwdb, b.dwdb + b.cols};
}

int sms() {
  int d = 0, n = 0;
  CK(cudaGetDevice(&d));
  CK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d));
  return n;
}

template <int kChunks, int kWarps, int kMinBlocks, bool kPrefetch, bool kSmemSums>
void run_variant(const char* name, Buffers& b, const std::vector<float>& ref_gx, const std::vector<float>& ref_dw,
                 double bytes) {
  auto kernel = variant<kChunks, kWarps, kMinBlocks, kPrefetch, kSmemSums>;
  const size_t smem = (kSmemSums ? kWarps : 1) * 2 * b.cols * sizeof(float);
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem));
  cudaFuncAttributes attr;
  CK(cudaFuncGetAttributes(&attr, kernel));
  const int64_t blocks = std::min<int64_t>(int64_t{per_sm} * sms(), (b.rows + kWarps - 1) / kWarps);
  LayerNormShape shape{b.rows, b.cols, 1e-5f};
  LayerNormBackwardArgs a = args_of(b);
  const float us = median_us([&] {
    kernel<<<blocks, kWarps * 32, smem>>>(a, shape);
    layer_norm_param_grads<<<(2 * b.cols + 31) / 32, 32 * 8>>>(b.partials, blocks, b.cols, a.grad_weight, a.grad_bias,
                                                               DType::f32);
  });
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  const auto gx = host(b.gx, b.rows * b.cols), dw = host(b.dwdb, 2 * b.cols);
  double dgx = 0, ddw = 0;
  for (size_t i = 0; i < gx.size(); ++i) dgx = std::max(dgx, std::fabs(double(gx[i]) - ref_gx[i]));
  for (size_t i = 0; i < dw.size(); ++i) ddw = std::max(ddw, std::fabs(double(dw[i]) - ref_dw[i]));
  printf("%-44s %4d regs %2d warps/SM %8.1f us %6.0f GB/s  max|d dx| %.2e max|d dw,db| %.2e\n", name, attr.numRegs,
         per_sm * kWarps, us, bytes / us / 1e3, dgx, ddw);
}

template <int kChunks>
void shape_run(int64_t rows, int64_t cols) {
  Buffers b{rows, cols};
  const int64_t n = rows * cols;
  CK(cudaMalloc(&b.x, n * 4));
  CK(cudaMalloc(&b.ds, n * 4));
  CK(cudaMalloc(&b.gx, n * 4));
  CK(cudaMalloc(&b.dy, n * 2));
  CK(cudaMalloc(&b.gr, n * 2));
  CK(cudaMalloc(&b.mean, rows * 4));
  CK(cudaMalloc(&b.rstd, rows * 4));
  CK(cudaMalloc(&b.w, cols * 4));
  CK(cudaMalloc(&b.partials, 2 * 4096 * cols * 4));
  CK(cudaMalloc(&b.dwdb, 2 * cols * 4));
  float* tmp;
  CK(cudaMalloc(&tmp, n * 4));
  fill<<<1024, 256>>>(b.x, n, 1, 4.f, 0.1f);
  fill<<<1024, 256>>>(b.ds, n, 2, 1.f, 0.f);
  fill<<<1024, 256>>>(tmp, n, 3, 1.f, 0.f);
  to_bf16<<<1024, 256>>>(tmp, b.dy, n);
  fill<<<64, 256>>>(b.mean, rows, 4, 0.2f, 0.1f);
  fill<<<64, 256>>>(b.rstd, rows, 5, 0.5f, 1.f);
  fill<<<64, 256>>>(b.w, cols, 6, 0.5f, 1.f);
  CK(cudaDeviceSynchronize());
  const double bytes = double(n) * (4 + 2 + 4 + 4 + 2);
  printf("rows %lld x cols %lld: %.1f MB a call\n", (long long)rows, (long long)cols, bytes / 1e6);
  LayerNormShape shape{rows, cols, 1e-5f};
  LayerNormBackwardArgs a = args_of(b);
  const float lib = median_us([&] { CK(launch_layer_norm_backward(a, shape, 0)); });
  CK(cudaDeviceSynchronize());
  const auto ref_gx = host(b.gx, n), ref_dw = host(b.dwdb, 2 * cols);
  printf("%-44s %23s %8.1f us %6.0f GB/s\n", "library kernel (+ param sums)", "", lib, bytes / lib / 1e3);
  const float st = median_us([&] { stream_bytes<<<sms() * 8, 256>>>(b.x, b.dy, b.ds, b.gx, b.gr, n / 4); });
  printf("%-44s %23s %8.1f us %6.0f GB/s\n", "streaming the same bytes", "", st, bytes / st / 1e3);
  run_variant<kChunks, 8, 2, false, false>("regs sums, d sum late, 8 warps x2 (as lib)", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 8, 2, true, false>("regs sums, d sum early, 8 warps x2", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 8, 1, true, false>("regs sums, d sum early, 8 warps x1", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 8, 2, false, true>("smem sums, d sum late, 8 warps x2", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 8, 2, true, true>("smem sums, d sum early, 8 warps x2", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 8, 3, true, true>("smem sums, d sum early, 8 warps x3", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 4, 4, true, true>("smem sums, d sum early, 4 warps x4", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 4, 6, true, true>("smem sums, d sum early, 4 warps x6", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 4, 5, false, true>("smem sums, d sum late, 4 warps x5", b, ref_gx, ref_dw, bytes);
  run_variant<kChunks, 2, 8, true, true>("smem sums, d sum early, 2 warps x8", b, ref_gx, ref_dw, bytes);
  for (void* p : {(void*)b.x, (void*)b.ds, (void*)b.gx, (void*)b.dy, (void*)b.gr, (void*)b.mean, (void*)b.rstd,
                  (void*)b.w, (void*)b.partials, (void*)b.dwdb, (void*)tmp})
    CK(cudaFree(p));
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  shape_run<6>(16384, 768);
  shape_run<8>(16384, 1024);
  shape_run<8>(8192, 1024);
  return 0;
}
