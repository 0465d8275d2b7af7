// Gradient accumulation. Reference: one batch holding the same tokens (micro-batches padded to a
// common length and concatenated) with the mean token loss, in fp32.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "scaletrain/accum/gradient_accumulation.h"
#include "scaletrain/data/dataset.h"
#include "scaletrain/data/dsl.h"
#include "scaletrain/data/tokenizer.h"
#include "scaletrain/model/gpt.h"

namespace scaletrain::accum {
namespace {

model::GPT small_model() {
  model::GPTOptions o;
  o.n_layer(2).n_head(2).n_embd(32).block_size(224);
  at::manual_seed(7);
  return model::GPT(o);
}

std::vector<at::Tensor> gradients(model::GPT& m) {
  std::vector<at::Tensor> out;
  for (auto& p : m->parameters()) out.push_back(p.grad().clone());
  return out;
}

// Largest relative difference ||a - b|| / ||b|| over parameters.
double worst_relative(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, (a[i] - b[i]).norm().item<double>() / b[i].norm().item<double>());
  return worst;
}

at::Tensor pad_to(const at::Tensor& t, int64_t length, int64_t value) {
  if (t.size(1) == length) return t;
  return at::cat({t, at::full({t.size(0), length - t.size(1)}, value, at::kLong)}, 1);
}

TEST(GradientAccumulation, RaggedMicroBatchesEqualOneBatchOfTheSameTokens) {
  auto split = data::make_dsl_split(4, {data::DslTask::flowroll, data::DslTask::dimmatch}, 512, 8);
  data::PairDataset dataset(split.train, split.validation, 4);
  // Different sizes and lengths: the micro-batches hold very different numbers of target tokens.
  std::vector<data::Batch> micro = {dataset.train_batch(0, 2), dataset.train_batch(3, 5), dataset.train_batch(9, 1)};
  std::vector<int64_t> counts;
  for (const auto& b : micro) counts.push_back(b.target_tokens);
  ASSERT_NE(counts[0], counts[1]);

  auto model = small_model();
  GradientAccumulator accumulator(3);
  accumulator.begin_step(counts);
  model->zero_grad();
  for (int64_t i = 0; i < 3; ++i) {
    auto loss = accumulator.normalize(summed_cross_entropy(model->forward(micro[i].inputs), micro[i].targets), i);
    loss.backward();
  }
  auto accumulated = gradients(model);

  int64_t longest = 0;
  for (const auto& b : micro) longest = std::max(longest, b.inputs.size(1));
  std::vector<at::Tensor> inputs, targets;
  for (const auto& b : micro) {
    inputs.push_back(pad_to(b.inputs, longest, data::ByteTokenizer::kPad));
    targets.push_back(pad_to(b.targets, longest, -100));
  }
  model->zero_grad();
  model->loss(model->forward(at::cat(inputs)), at::cat(targets)).backward();  // mean over all tokens
  auto reference = gradients(model);
  EXPECT_LT(worst_relative(accumulated, reference), 1e-6);

  // Averaging per-micro-batch means (the usual mistake) gives other gradients: the test can fail.
  model->zero_grad();
  for (const auto& b : micro) (model->loss(model->forward(b.inputs), b.targets) / 3.0).backward();
  EXPECT_GT(worst_relative(gradients(model), reference), 1e-3);
}

TEST(GradientAccumulation, SyncOnlyOnTheLastMicroBatch) {
  GradientAccumulator accumulator(4);
  EXPECT_FALSE(accumulator.sync_gradients(0));
  EXPECT_FALSE(accumulator.sync_gradients(2));
  EXPECT_TRUE(accumulator.sync_gradients(3));
  EXPECT_TRUE(GradientAccumulator(1).sync_gradients(0));
}

TEST(GradientAccumulation, RejectsInconsistentUse) {
  EXPECT_THROW(GradientAccumulator(0), std::invalid_argument);
  GradientAccumulator accumulator(2);
  EXPECT_THROW(accumulator.normalize(at::ones({}), 0), std::logic_error);
  EXPECT_THROW(accumulator.begin_step({1, 2, 3}), std::invalid_argument);
  EXPECT_THROW(accumulator.begin_step({0, 0}), std::invalid_argument);
  EXPECT_THROW(accumulator.begin_step({-1, 5}), std::invalid_argument);
  accumulator.begin_step({3, 5});
  EXPECT_EQ(accumulator.step_tokens(), 8);
  EXPECT_DOUBLE_EQ(accumulator.normalize(at::full({}, 4.0), 1).item<double>(), 0.5);
  EXPECT_THROW(accumulator.normalize(at::ones({}), 2), std::invalid_argument);
}

}  // namespace
}  // namespace scaletrain::accum
