#pragma once
// Gradient accumulation: one optimizer step over k micro-batches. The loss of each micro-batch is
// its summed token losses divided by the target tokens of the *whole step*, so the accumulated
// gradients equal those of the step's mean token loss even when micro-batches hold different
// numbers of real tokens (padding, ragged lengths). Dividing each micro-batch by its own token
// count, or by k, would weight a short micro-batch's tokens more than a long one's.
//
//   GradientAccumulator accumulator(k);
//   accumulator.begin_step({batch[0].target_tokens, ..., batch[k-1].target_tokens});
//   for (int64_t i = 0; i < k; ++i) {
//     auto loss = accumulator.normalize(summed_cross_entropy(model(inputs[i]), targets[i]), i);
//     loss.backward();                      // gradients add up in .grad
//     if (accumulator.sync_gradients(i)) {}  // distributed parts reduce gradients only here
//   }
//   optimizer.step();
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace scaletrain::accum {

class GradientAccumulator {
 public:
  // `micro_steps` micro-batches per optimizer step; 1 means no accumulation.
  explicit GradientAccumulator(int64_t micro_steps);

  int64_t micro_steps() const { return micro_steps_; }
  // Starts an optimizer step; `target_tokens[i]` counts the loss targets of micro-batch i.
  // Throws std::invalid_argument unless there are micro_steps() counts, none negative, sum > 0.
  void begin_step(const std::vector<int64_t>& target_tokens);
  // Target tokens of the whole step (after begin_step).
  int64_t step_tokens() const { return step_tokens_; }
  // The loss to backpropagate for micro-batch `micro`: `summed_loss` / step_tokens().
  at::Tensor normalize(const at::Tensor& summed_loss, int64_t micro) const;
  // True on the last micro-batch only: gradient synchronisation across processes (all-reduce,
  // reduce-scatter) belongs there; earlier micro-batches accumulate locally without it.
  bool sync_gradients(int64_t micro) const { return micro + 1 == micro_steps_; }

 private:
  int64_t micro_steps_;
  int64_t step_tokens_ = 0;
};

// Sum (not mean) of the token cross-entropies over targets that are not `ignore_index`;
// logits (..., vocab), targets (...).
at::Tensor summed_cross_entropy(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index = -100);

}  // namespace scaletrain::accum
