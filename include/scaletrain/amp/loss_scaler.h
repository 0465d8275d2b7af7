#pragma once
// Dynamic loss scaling for fp16 training, shaped like torch.amp.GradScaler:
//
//   LossScaler scaler;                       // scale 2^16, grows x2 after 2000 good steps
//   scaler.scale(loss).backward();           // gradients are scaled by get_scale()
//   scaler.unscale_(optimizer, /*max_norm=*/1.0);  // optional: fused unscale + inf check + clip
//   scaler.step(optimizer);                  // skipped when a gradient is inf/NaN
//   scaler.update();                         // backs off after an overflow, grows after good steps
//
// Beyond GradScaler: hysteresis (back off only after `hysteresis` overflows, as Megatron-LM's
// DynamicGradScaler), a floor and a ceiling for the scale, a count of skipped steps, and one fused
// pass (grad_check.h) that unscales, checks and clips all gradients. With hysteresis 1 and the
// scale inside [min_scale, max_scale] the trajectory is GradScaler's, step for step.
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include "scaletrain/amp/amp_options.h"
#include "scaletrain/amp/grad_check.h"

namespace scaletrain::amp {

// What a checkpoint needs to continue the scale trajectory exactly.
struct LossScalerState {
  double scale = 65536.0;
  int64_t growth_tracker = 0;      // consecutive finite steps since the last change
  int64_t hysteresis_tracker = 1;  // overflows left before the next backoff
  int64_t skipped_steps = 0;       // steps skipped for inf/NaN gradients, since the start
};

class LossScaler {
 public:
  // Throws std::invalid_argument naming a bad option.
  explicit LossScaler(LossScalerOptions options = {});

  const LossScalerOptions& options() const { return options_; }
  double get_scale() const { return state_.scale; }
  int64_t skipped_steps() const { return state_.skipped_steps; }

  // loss * scale, in fp32.
  at::Tensor scale(const at::Tensor& loss) const;
  // Unscales `grads` in place, checks them for inf/NaN and, when max_norm > 0, clips their global
  // norm (one fused pass). Once per step; returns found_inf and the norm (as a device tensor).
  GradCheckResult unscale_(const std::vector<at::Tensor>& grads, double max_norm = 0);
  // The same over the gradients of the optimizer's parameters.
  GradCheckResult unscale_(torch::optim::Optimizer& optimizer, double max_norm = 0);
  // Unscales first unless unscale_ ran this step, then calls optimizer.step() unless a gradient
  // was inf/NaN. Returns whether the optimizer stepped (reads the flag from the device).
  bool step(torch::optim::Optimizer& optimizer);
  // Whether this step's gradients held inf/NaN (after unscale_; synchronises).
  bool found_inf() const;
  // Ends the step: adjusts the scale from this step's check. Throws std::logic_error when no
  // gradients were checked since the last update.
  void update();
  // Ends a step whose overflow was decided elsewhere (e.g. across processes).
  void update(bool found_inf);

  LossScalerState state_dict() const { return state_; }
  void load_state_dict(const LossScalerState& state);

 private:
  LossScalerOptions options_;
  LossScalerState state_;
  std::optional<GradCheckResult> check_;  // this step's, until update()
};

}  // namespace scaletrain::amp
