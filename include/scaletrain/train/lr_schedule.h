#pragma once
// Linear warmup then cosine decay, for any torch optimizer.
#include <cstdint>

namespace torch::optim {
class Optimizer;
}

namespace scaletrain::train {

class WarmupCosineSchedule {
 public:
  // lr rises linearly over `warmup_steps` (reaching `peak_lr` at step warmup_steps - 1), then
  // falls along a half cosine to `min_lr` at step `total_steps` - 1 and stays there.
  WarmupCosineSchedule(double peak_lr, double min_lr, int64_t warmup_steps, int64_t total_steps);
  double lr_at(int64_t step) const;
  // Sets the learning rate of every parameter group for `step`; returns it.
  double apply(torch::optim::Optimizer& optimizer, int64_t step) const;

 private:
  double peak_lr_, min_lr_;
  int64_t warmup_steps_, total_steps_;
};

}  // namespace scaletrain::train
