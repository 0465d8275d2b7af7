#include "scaletrain/accum/gradient_accumulation.h"

#include <stdexcept>
#include <string>

#include <ATen/ATen.h>

namespace scaletrain::accum {

GradientAccumulator::GradientAccumulator(int64_t micro_steps) : micro_steps_(micro_steps) {
  if (micro_steps < 1)
    throw std::invalid_argument("GradientAccumulator: micro_steps must be >= 1, got " + std::to_string(micro_steps));
}

void GradientAccumulator::begin_step(const std::vector<int64_t>& target_tokens) {
  if (static_cast<int64_t>(target_tokens.size()) != micro_steps_) {
    throw std::invalid_argument("GradientAccumulator: " + std::to_string(target_tokens.size()) +
                                " token counts for " + std::to_string(micro_steps_) + " micro-batches");
  }
  int64_t total = 0;
  for (int64_t count : target_tokens) {
    if (count < 0) throw std::invalid_argument("GradientAccumulator: negative token count");
    total += count;
  }
  if (total == 0) throw std::invalid_argument("GradientAccumulator: the step has no target tokens");
  step_tokens_ = total;
}

at::Tensor GradientAccumulator::normalize(const at::Tensor& summed_loss, int64_t micro) const {
  if (micro < 0 || micro >= micro_steps_) {
    throw std::invalid_argument("GradientAccumulator: micro-batch " + std::to_string(micro) + " of " +
                                std::to_string(micro_steps_));
  }
  if (step_tokens_ == 0) throw std::logic_error("GradientAccumulator: normalize() before begin_step()");
  return summed_loss / static_cast<double>(step_tokens_);
}

at::Tensor summed_cross_entropy(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  return at::cross_entropy_loss(logits.to(at::kFloat).reshape({-1, logits.size(-1)}), targets.reshape({-1}), {},
                                at::Reduction::Sum, ignore_index);
}

}  // namespace scaletrain::accum
