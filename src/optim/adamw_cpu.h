#pragma once
// The CPU AdamW element loop (adamw_cpu.cpp), free of torch headers: compiled once per x86-64
// instruction-set level (AVX-512, AVX2 + FMA, baseline) and picked at load time for the running
// CPU. Called by adamw.cpp on ranges of a parameter, from ATen's thread pool.
#include <cstdint>

#include "core/kernel_dtype.h"

namespace scaletrain::optim::cpu {

// The per-element constants of one parameter's step (torch.optim.AdamW's arithmetic):
//   g *= factor;  p *= decay;  m = m * beta1 + g * (1 - beta1);  v = v * beta2 + (1 - beta2) * g * g;
//   p += -step_size * (m / (sqrt(v) / bc2_sqrt + eps)).
struct Coeffs {
  float factor, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
};

// Updates n elements: param, exp_avg, exp_avg_sq (fp32, in place) from grad (`grad_type`), and
// writes the updated values to copy (`copy_type`; none: no copy) in the same pass.
void adamw_span(const Coeffs& c, float* param, float* exp_avg, float* exp_avg_sq, const void* grad,
                core::DType grad_type, void* copy, core::DType copy_type, int64_t n);

}  // namespace scaletrain::optim::cpu
