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
//
// keep_on_device() moves the state into device memory: the loss is scaled, the gradient pass
// reads 1 / scale, and update(flag) adapts the scale from the pass's overflow flag, all on the
// device with no host read (and inside a captured CUDA graph); the trajectory is the same.
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
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
  // On the device: reads the state back (synchronises).
  double get_scale() const { return state_dict().scale; }
  int64_t skipped_steps() const { return state_dict().skipped_steps; }

  // From now on the state lives on `device` (CUDA or CPU tensors), where scale(), inv_scale() and
  // update(flag) use it without a host read; the host methods read or write it there.
  void keep_on_device(const c10::Device& device);
  bool on_device() const { return device_state_.defined(); }
  // 1 / scale, one float32 element on the device (on_device() only; std::logic_error otherwise):
  // for amp::gradient_factor(grads, inv_scale, max_norm).
  const at::Tensor& inv_scale() const;
  // Ends the step from the overflow flag (one float32 element on the device, nonzero: overflow),
  // with no host read (on_device() only). Throws std::invalid_argument for a bad flag tensor.
  void update(const at::Tensor& found_inf);

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

  LossScalerState state_dict() const;
  void load_state_dict(const LossScalerState& state);

 private:
  void write_device_state();
  LossScalerOptions options_;
  LossScalerState state_;  // on the host; stale while on_device()
  // On the device: float64 {scale, growth_tracker, hysteresis_tracker, skipped_steps}, and the
  // scale and 1 / scale in float32 (what the loss and the gradient pass read).
  at::Tensor device_state_, device_scale_, device_inv_scale_;
  std::optional<GradCheckResult> check_;  // this step's, until update()
};

}  // namespace scaletrain::amp
