#include "scaletrain/train/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include <torch/optim/optimizer.h>

namespace scaletrain::train {

WarmupCosineSchedule::WarmupCosineSchedule(double peak_lr, double min_lr, int64_t warmup_steps,
                                           int64_t total_steps)
    : peak_lr_(peak_lr), min_lr_(min_lr), warmup_steps_(warmup_steps), total_steps_(total_steps) {}

double WarmupCosineSchedule::lr_at(int64_t step) const {
  if (step < warmup_steps_) return peak_lr_ * static_cast<double>(step + 1) / static_cast<double>(warmup_steps_);
  const int64_t decay_steps = std::max<int64_t>(1, total_steps_ - 1 - warmup_steps_);
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps_) / static_cast<double>(decay_steps));
  return min_lr_ + 0.5 * (peak_lr_ - min_lr_) * (1.0 + std::cos(M_PI * progress));
}

double WarmupCosineSchedule::apply(torch::optim::Optimizer& optimizer, int64_t step) const {
  const double lr = lr_at(step);
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
  return lr;
}

}  // namespace scaletrain::train
