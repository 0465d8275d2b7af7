#include "scaletrain/amp/loss_scaler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include <ATen/ATen.h>

#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA

#include "scale_rule.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "grad_check_cuda.h"
#endif

namespace scaletrain::amp {

namespace {

// torch.amp.GradScaler keeps its scale in a float32 tensor, and _amp_update_scale_ multiplies it by
// the (double) factor and stores the product back as float32 (scale_rule.h's to_float32): the same
// rounding keeps the trajectory GradScaler's for any factors, not only powers of two.
ScaleRule rule_of(const LossScalerOptions& o) {
  return {o.growth_factor(), o.backoff_factor(), o.min_scale(), o.max_scale(), o.growth_interval(), o.hysteresis(),
          o.dynamic()};
}

}  // namespace

LossScaler::LossScaler(LossScalerOptions options) : options_(options) {
  options_.check();
  state_.scale = to_float32(options_.init_scale());
  state_.hysteresis_tracker = options_.hysteresis();
}

at::Tensor LossScaler::scale(const at::Tensor& loss) const {
  // The same float32 product either way: the scale is a float32 value.
  return on_device() ? loss.to(at::kFloat) * device_scale_ : loss.to(at::kFloat) * state_.scale;
}

void LossScaler::keep_on_device(const c10::Device& device) {
  const auto options = at::TensorOptions().device(device);
  const LossScalerState current = state_dict();
  device_state_ = at::empty({kScaleSlots}, options.dtype(at::kDouble));
  device_scale_ = at::empty({}, options.dtype(at::kFloat));
  device_inv_scale_ = at::empty({1}, options.dtype(at::kFloat));
  state_ = current;
  write_device_state();
}

void LossScaler::write_device_state() {
  const double values[kScaleSlots] = {state_.scale, static_cast<double>(state_.growth_tracker),
                                      static_cast<double>(state_.hysteresis_tracker),
                                      static_cast<double>(state_.skipped_steps)};
  device_state_.copy_(at::tensor(at::ArrayRef<double>(values, kScaleSlots), at::kDouble));
  device_scale_.fill_(static_cast<float>(state_.scale));
  device_inv_scale_.fill_(static_cast<float>(1.0 / state_.scale));
}

const at::Tensor& LossScaler::inv_scale() const {
  if (!on_device()) throw std::logic_error("LossScaler::inv_scale: the state is on the host (call keep_on_device)");
  return device_inv_scale_;
}

void LossScaler::update(const at::Tensor& found_inf) {
  if (!on_device()) throw std::logic_error("LossScaler::update(flag): the state is on the host (call keep_on_device)");
  if (!found_inf.defined() || found_inf.numel() != 1 || found_inf.scalar_type() != at::kFloat ||
      found_inf.device() != device_state_.device())
    throw std::invalid_argument("LossScaler::update: found_inf: expected one float32 element on " +
                                device_state_.device().str());
  if (device_state_.is_cpu()) {  // CPU tensors: reading the flag costs nothing
    update(found_inf.item<float>() != 0.f);
    return;
  }
  check_.reset();
#ifdef SCALETRAIN_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device_state_.device());
  const cudaError_t status = cuda::launch_update_scale(
      device_state_.data_ptr<double>(), device_scale_.data_ptr<float>(), device_inv_scale_.data_ptr<float>(),
      found_inf.const_data_ptr<float>(), rule_of(options_), c10::cuda::getCurrentCUDAStream().stream());
  if (status != cudaSuccess) throw std::runtime_error(std::string("LossScaler::update: ") + cudaGetErrorString(status));
#else
  throw std::invalid_argument("LossScaler::update: state on " + device_state_.device().str() +
                              ", this build has no CUDA");
#endif
}

LossScalerState LossScaler::state_dict() const {
  if (!on_device()) return state_;
  const at::Tensor host = device_state_.cpu();
  const double* v = host.const_data_ptr<double>();
  return {v[kScale], static_cast<int64_t>(v[kGrowthTracker]), static_cast<int64_t>(v[kHysteresisTracker]),
          static_cast<int64_t>(v[kSkippedSteps])};
}

GradCheckResult LossScaler::unscale_(const std::vector<at::Tensor>& grads, double max_norm) {
  if (check_) throw std::logic_error("LossScaler::unscale_: already called since the last update()");
  check_ = unscale_check_clip_(grads, 1.0 / get_scale(), max_norm);
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
  LossScalerState st = state_dict();
  double state[kScaleSlots] = {st.scale, static_cast<double>(st.growth_tracker),
                               static_cast<double>(st.hysteresis_tracker), static_cast<double>(st.skipped_steps)};
  update_scale(state, found_inf, rule_of(options_));
  state_ = {state[kScale], static_cast<int64_t>(state[kGrowthTracker]), static_cast<int64_t>(state[kHysteresisTracker]),
            static_cast<int64_t>(state[kSkippedSteps])};
  if (on_device()) write_device_state();
}

void LossScaler::load_state_dict(const LossScalerState& state) {
  if (!(state.scale > 0) || !std::isfinite(state.scale))
    throw std::invalid_argument("LossScaler state: scale " + std::to_string(state.scale) + ", expected a finite number > 0");
  if (state.growth_tracker < 0 || state.hysteresis_tracker < 0 || state.skipped_steps < 0)
    throw std::invalid_argument("LossScaler state: negative counter");
  state_ = state;
  state_.scale = to_float32(state.scale);
  check_.reset();
  if (on_device()) write_device_state();
}

}  // namespace scaletrain::amp
