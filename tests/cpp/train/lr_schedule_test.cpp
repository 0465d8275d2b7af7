// Warmup + cosine schedule against values computed by hand from the formula.
#include <cmath>

#include <gtest/gtest.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adamw.h>

#include "scaletrain/train/lr_schedule.h"

namespace scaletrain::train {
namespace {

TEST(LrSchedule, WarmupThenCosineToMin) {
  WarmupCosineSchedule s(1e-3, 1e-4, 10, 110);
  EXPECT_DOUBLE_EQ(s.lr_at(0), 1e-4);       // 1/10 of peak
  EXPECT_DOUBLE_EQ(s.lr_at(4), 5e-4);
  EXPECT_DOUBLE_EQ(s.lr_at(9), 1e-3);       // peak at the end of warmup
  EXPECT_DOUBLE_EQ(s.lr_at(10), 1e-3);      // cosine starts at the peak
  EXPECT_NEAR(s.lr_at(10 + 99 / 2.0), 1e-4 + 0.5 * 9e-4 * (1 + std::cos(M_PI * 49.0 / 99.0)), 1e-15);
  EXPECT_DOUBLE_EQ(s.lr_at(109), 1e-4);     // last step at min
  EXPECT_DOUBLE_EQ(s.lr_at(500), 1e-4);
  for (int64_t t = 10; t < 109; ++t) EXPECT_GE(s.lr_at(t), s.lr_at(t + 1));
}

TEST(LrSchedule, AppliesToEveryGroup) {
  torch::nn::Linear a(2, 2), b(2, 2);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(a->parameters());
  groups.emplace_back(b->parameters());
  torch::optim::AdamW optimizer(groups, torch::optim::AdamWOptions(1.0));
  WarmupCosineSchedule s(2e-3, 0, 0, 10);
  EXPECT_DOUBLE_EQ(s.apply(optimizer, 0), 2e-3);
  for (auto& group : optimizer.param_groups()) EXPECT_DOUBLE_EQ(group.options().get_lr(), 2e-3);
}

}  // namespace
}  // namespace scaletrain::train
