#pragma once
// Options of mixed precision (YAML section `amp`): the compute precision, where parameters live,
// and the loss scaler.
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include "scaletrain/core/config.h"

namespace scaletrain::amp {

// Precision of the forward and backward matmuls. fp32 runs everything in fp32; bf16 and fp16 run
// the forward under autocast (matmuls in the low precision, reductions and the loss in fp32).
enum class Precision { fp32, bf16, fp16 };

c10::ScalarType compute_dtype(Precision precision);

struct LossScalerOptions {
  // Scale of the first step.
  TORCH_ARG(double, init_scale) = 65536.0;
  // Multiplies the scale after `growth_interval` consecutive steps with finite gradients.
  TORCH_ARG(double, growth_factor) = 2.0;
  // Multiplies the scale after an overflow (once `hysteresis` overflows have been counted).
  TORCH_ARG(double, backoff_factor) = 0.5;
  TORCH_ARG(int64_t, growth_interval) = 2000;
  // Overflows tolerated before the scale backs off; 1 backs off on every overflow, as
  // torch.amp.GradScaler does. The count is restored when the scale grows.
  TORCH_ARG(int64_t, hysteresis) = 1;
  TORCH_ARG(double, min_scale) = 1.0;
  TORCH_ARG(double, max_scale) = 16777216.0;  // 2^24
  // false: the scale stays at init_scale (static loss scaling); overflowing steps are still skipped.
  TORCH_ARG(bool, dynamic) = true;

 public:  // TORCH_ARG leaves the section private
  // Throws std::invalid_argument naming the option.
  void check() const;
  // Declares the fields other than `dynamic` (the YAML keys amp.init_scale, amp.growth_interval...).
  void visit(core::FieldVisitor& v);
};

struct AmpOptions {
  TORCH_ARG(Precision, precision) = Precision::fp32;
  // "auto" (dynamic for fp16, none otherwise), "dynamic", "none" or a positive number (static).
  TORCH_ARG(std::string, loss_scale) = "auto";
  // Keep the model's parameters in the compute precision (half the memory of fp32 weights);
  // the optimizer then updates fp32 master copies. Needs precision bf16 or fp16.
  TORCH_ARG(bool, low_precision_params) = false;
  // With low_precision_params: add each micro-batch's gradients into fp32 buffers, so that
  // gradient accumulation does not round in the low precision.
  TORCH_ARG(bool, fp32_grad_accum) = true;
  // Allow fp16 on a CPU without native fp16 arithmetic (AVX512-FP16 on x86): torch then emulates
  // it, about ten times slower than fp32. Off, such a run is refused; meant for tests.
  TORCH_ARG(bool, emulated_fp16) = false;
  // The dynamic scaler's rules (init_scale, growth, backoff, hysteresis, bounds); `dynamic` and,
  // for a static scale, `init_scale` follow from loss_scale (see scaler_options()).
  TORCH_ARG(LossScalerOptions, scaler) = {};

 public:  // TORCH_ARG leaves the section private
  void visit(core::FieldVisitor& v);
  // Cross-field checks; throws ConfigError naming the key (amp.loss_scale, amp.low_precision_params).
  void validate() const;
  // The loss scaler these options ask for, or nullopt when the loss is not scaled.
  std::optional<LossScalerOptions> scaler_options() const;
};

}  // namespace scaletrain::amp

template <>
struct scaletrain::core::EnumNames<scaletrain::amp::Precision> {
  static constexpr std::array<std::pair<scaletrain::amp::Precision, const char*>, 3> values = {
      {{scaletrain::amp::Precision::fp32, "fp32"},
       {scaletrain::amp::Precision::bf16, "bf16"},
       {scaletrain::amp::Precision::fp16, "fp16"}}};
};
