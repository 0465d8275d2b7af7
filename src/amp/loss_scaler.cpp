#include "scaletrain/amp/loss_scaler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include <ATen/ATen.h>

namespace scaletrain::amp {

namespace {

// torch.amp.GradScaler keeps its scale in a float32 tensor, and _amp_update_scale_ multiplies it by
// the (double) factor and stores the product back as float32. The same rounding here keeps the
// trajectory GradScaler's for any factors, not only powers of two.
double to_float32(double value) { return static_cast<double>(static_cast<float>(value)); }

}  // namespace

LossScaler::LossScaler(LossScalerOptions options) : options_(options) {
  options_.check();
  state_.scale = to_float32(options_.init_scale());
  state_.hysteresis_tracker = options_.hysteresis();
}

at::Tensor LossScaler::scale(const at::Tensor& loss) const { return loss.to(at::kFloat) * state_.scale; }

GradCheckResult LossScaler::unscale_(const std::vector<at::Tensor>& grads, double max_norm) {
  if (check_) throw std::logic_error("LossScaler::unscale_: already called since the last update()");
  check_ = unscale_check_clip_(grads, 1.0 / state_.scale, max_norm);
  return *check_;
}

GradCheckResult LossScaler::unscale_(torch::optim::Optimizer& optimizer, double max_norm) {
  std::vector<at::Tensor> params;
  for (const auto& group : optimizer.param_groups())
    params.insert(params.end(), group.params().begin(), group.params().end());
  return unscale_(gradients_of(params), max_norm);
}

bool LossScaler::step(torch::optim::Optimizer& optimizer) {
  if (!check_) unscale_(optimizer);
  if (check_->found_inf()) return false;
  optimizer.step();
  return true;
}

bool LossScaler::found_inf() const {
  if (!check_) throw std::logic_error("LossScaler::found_inf: no gradients checked since the last update()");
  return check_->found_inf();
}

void LossScaler::update() {
  if (!check_) throw std::logic_error("LossScaler::update: call unscale_ or step first (no gradients were checked)");
  update(check_->found_inf());
}

void LossScaler::update(bool found_inf) {
  check_.reset();
  if (found_inf) ++state_.skipped_steps;
  if (!options_.dynamic()) return;
  if (found_inf) {
    state_.growth_tracker = 0;
    if (--state_.hysteresis_tracker <= 0) {
      state_.hysteresis_tracker = 0;
      state_.scale = std::max(to_float32(options_.min_scale()), to_float32(state_.scale * options_.backoff_factor()));
    }
  } else if (++state_.growth_tracker == options_.growth_interval()) {
    state_.growth_tracker = 0;
    state_.hysteresis_tracker = options_.hysteresis();
    const double grown = to_float32(state_.scale * options_.growth_factor());
    if (std::isfinite(grown)) state_.scale = std::min(to_float32(options_.max_scale()), grown);  // as GradScaler: never inf
  }
}

void LossScaler::load_state_dict(const LossScalerState& state) {
  if (!(state.scale > 0) || !std::isfinite(state.scale))
    throw std::invalid_argument("LossScaler state: scale " + std::to_string(state.scale) + ", expected a finite number > 0");
  if (state.growth_tracker < 0 || state.hysteresis_tracker < 0 || state.skipped_steps < 0)
    throw std::invalid_argument("LossScaler state: negative counter");
  state_ = state;
  state_.scale = to_float32(state.scale);
  check_.reset();
}

}  // namespace scaletrain::amp
