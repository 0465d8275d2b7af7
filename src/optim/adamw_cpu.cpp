// The CPU AdamW element loop (see adamw_cpu.h). Plain loops that GCC vectorises, each compiled
// for three x86-64 levels with target_clones (x86-64-v4: AVX-512; x86-64-v3: AVX2 + FMA + F16C;
// the baseline: SSE2); the dynamic loader picks the clone for the running CPU once. Gradients and
// copies in bf16 and fp16 are converted inside the loop, so a step reads each gradient once and
// writes the low-precision copy in the same pass.
#include "adamw_cpu.h"

#include <cmath>
#include <cstring>
#include <type_traits>

namespace scaletrain::optim::cpu {
namespace {

struct Bf16 {
  uint16_t bits;
};

inline float to_float(float x) { return x; }
inline float to_float(Bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(_Float16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
// Round to nearest even, NaN kept quiet (c10::BFloat16's conversion).
template <>
inline Bf16 from_float<Bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return Bf16{static_cast<uint16_t>(x != x ? 0x7fc0u : rounded)};
}
template <>
inline _Float16 from_float<_Float16>(float x) { return static_cast<_Float16>(x); }

struct NoCopy {};

template <typename G, typename C>
inline __attribute__((always_inline)) void span(const Coeffs& c, float* __restrict__ p, float* __restrict__ m,
                                                float* __restrict__ v, const G* __restrict__ g, C* __restrict__ copy,
                                                int64_t n) {
  const float factor = c.factor, decay = c.decay, beta1 = c.beta1, one_minus_beta1 = c.one_minus_beta1;
  const float beta2 = c.beta2, one_minus_beta2 = c.one_minus_beta2, neg_step = -c.step_size;
  const float inv_bc2_sqrt = 1.f / c.bc2_sqrt, eps = c.eps;
  for (int64_t i = 0; i < n; ++i) {
    const float grad = to_float(g[i]) * factor;
    const float mi = m[i] * beta1 + grad * one_minus_beta1;
    const float vi = v[i] * beta2 + one_minus_beta2 * (grad * grad);
    // A multiply by the reciprocal instead of a divide: one divide per element is left (the AVX-512
    // divide's throughput, not memory, bounded the loop on few threads); at most an ulp from torch.
    const float denom = std::sqrt(vi) * inv_bc2_sqrt + eps;
    const float pi = p[i] * decay + neg_step * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if constexpr (!std::is_same_v<C, NoCopy>) copy[i] = from_float<C>(pi);
  }
}

#define SCALETRAIN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// One non-template function per (gradient, copy) type pair: target_clones takes no templates.
#define SCALETRAIN_DEFINE_SPAN(GT, CT)                                                     \
  SCALETRAIN_ISA_CLONES void span_##GT##_##CT(const Coeffs& c, float* p, float* m, float* v, \
                                                const GT* g, CT* copy, int64_t n) {          \
    span<GT, CT>(c, p, m, v, g, copy, n);                                                  \
  }
using f32 = float;
using bf16 = Bf16;
using f16 = _Float16;
SCALETRAIN_DEFINE_SPAN(f32, NoCopy)
SCALETRAIN_DEFINE_SPAN(f32, bf16)
SCALETRAIN_DEFINE_SPAN(f32, f16)
SCALETRAIN_DEFINE_SPAN(f32, f32)
SCALETRAIN_DEFINE_SPAN(bf16, NoCopy)
SCALETRAIN_DEFINE_SPAN(bf16, bf16)
SCALETRAIN_DEFINE_SPAN(bf16, f16)
SCALETRAIN_DEFINE_SPAN(bf16, f32)
SCALETRAIN_DEFINE_SPAN(f16, NoCopy)
SCALETRAIN_DEFINE_SPAN(f16, bf16)
SCALETRAIN_DEFINE_SPAN(f16, f16)
SCALETRAIN_DEFINE_SPAN(f16, f32)

template <typename G>
void with_grad(const Coeffs& c, float* p, float* m, float* v, const G* g, void* copy, core::DType copy_type, int64_t n);

#define SCALETRAIN_WITH_GRAD(GT)                                                                                 \
  template <>                                                                                                    \
  void with_grad<GT>(const Coeffs& c, float* p, float* m, float* v, const GT* g, void* copy, core::DType copy_type, \
                     int64_t n) {                                                                                \
    switch (copy_type) {                                                                                         \
      case core::DType::none: return span_##GT##_NoCopy(c, p, m, v, g, nullptr, n);                               \
      case core::DType::bf16: return span_##GT##_bf16(c, p, m, v, g, static_cast<bf16*>(copy), n);               \
      case core::DType::f16: return span_##GT##_f16(c, p, m, v, g, static_cast<f16*>(copy), n);                  \
      case core::DType::f32: return span_##GT##_f32(c, p, m, v, g, static_cast<f32*>(copy), n);                  \
    }                                                                                                            \
  }
SCALETRAIN_WITH_GRAD(f32)
SCALETRAIN_WITH_GRAD(bf16)
SCALETRAIN_WITH_GRAD(f16)

}  // namespace

void adamw_span(const Coeffs& c, float* param, float* exp_avg, float* exp_avg_sq, const void* grad,
                core::DType grad_type, void* copy, core::DType copy_type, int64_t n) {
  switch (grad_type) {
    case core::DType::f32:
      return with_grad(c, param, exp_avg, exp_avg_sq, static_cast<const f32*>(grad), copy, copy_type, n);
    case core::DType::bf16:
      return with_grad(c, param, exp_avg, exp_avg_sq, static_cast<const bf16*>(grad), copy, copy_type, n);
    case core::DType::f16:
      return with_grad(c, param, exp_avg, exp_avg_sq, static_cast<const f16*>(grad), copy, copy_type, n);
    case core::DType::none: break;
  }
}

}  // namespace scaletrain::optim::cpu
