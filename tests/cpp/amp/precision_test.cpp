// Precision policy. References: autocast's documented behaviour (matmuls in the low precision,
// the state restored on exit) and fp32 arithmetic done by hand for master weights.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include "scaletrain/amp/precision.h"
#include "scaletrain/core/error.h"
#include "scaletrain/train/config.h"

namespace scaletrain::amp {
namespace {

TEST(Precision, AutocastGuardCastsMatmulsAndRestoresState) {
  auto a = at::randn({4, 4}), b = at::randn({4, 4});
  {
    AutocastGuard guard(Precision::bf16, c10::DeviceType::CPU);
    EXPECT_EQ(at::matmul(a, b).scalar_type(), at::kBFloat16);
    {
      AutocastGuard off(Precision::fp32, c10::DeviceType::CPU);  // fp32 does nothing
      EXPECT_EQ(at::matmul(a, b).scalar_type(), at::kBFloat16);
    }
  }
  EXPECT_FALSE(at::autocast::is_autocast_enabled(c10::DeviceType::CPU));
  EXPECT_EQ(at::matmul(a, b).scalar_type(), at::kFloat);
}

TEST(Precision, MasterWeightsAccumulateInFp32AndRoundIntoTheModel) {
  auto p = at::full({3}, 1.0, at::kBFloat16).requires_grad_(true);
  MasterWeights master({p});
  ASSERT_EQ(master.master()[0].scalar_type(), at::kFloat);
  // Three micro-batches of 1/1024 each: in bf16, 1 + 3/1024 is not representable and gradients
  // of 1 + 1/1024 round to 1; the fp32 buffer keeps the exact sum.
  for (int i = 0; i < 3; ++i) {
    p.mutable_grad() = at::full({3}, 1.0 + 1.0 / 1024, at::kBFloat16);
    master.accumulate_gradients();
    EXPECT_FALSE(p.grad().defined());
  }
  const float bf16_value = static_cast<float>(c10::BFloat16(1.0f + 1.0f / 1024));
  EXPECT_FLOAT_EQ(master.master()[0].grad()[0].item<float>(), 3 * bf16_value);
  {
    at::NoGradGuard no_grad;
    master.master()[0].add_(1.0 / 4096);  // below bf16 resolution at 1.0
  }
  master.copy_to_model();
  EXPECT_EQ(p[0].item<float>(), 1.0f);  // rounded
  EXPECT_FLOAT_EQ(master.master()[0][0].item<float>(), 1.0f + 1.0f / 4096);  // kept
  master.zero_grad();
  EXPECT_FALSE(master.master()[0].grad().defined());
}

TEST(AmpOptions, InvalidCombinationsNameTheKey) {
  auto expect_key = [](const std::vector<std::string>& overrides, const std::string& key, const std::string& text) {
    try {
      train::RunConfig::load("", overrides);
      ADD_FAILURE() << "no error for " << overrides.front();
    } catch (const core::ConfigError& e) {
      EXPECT_EQ(e.key(), key);
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  expect_key({"amp.loss_scale=dynamic"}, "amp.loss_scale", "amp.precision is fp32");
  expect_key({"amp.precision=fp16", "amp.loss_scale=-3"}, "amp.loss_scale", "expected auto, dynamic, none or a positive");
  expect_key({"amp.precision=fp16", "amp.loss_scale=lots"}, "amp.loss_scale", "got 'lots'");
  expect_key({"amp.low_precision_params=true"}, "amp.low_precision_params", "needs amp.precision bf16 or fp16");
  expect_key({"amp.precision=fp8"}, "amp.precision", "fp8");
}

TEST(AmpOptions, LossScaleChoices) {
  AmpOptions options;
  EXPECT_FALSE(options.scaler_options());  // fp32
  options.precision(Precision::fp16);
  ASSERT_TRUE(options.scaler_options());
  EXPECT_TRUE(options.scaler_options()->dynamic());
  EXPECT_EQ(options.scaler_options()->init_scale(), 65536.0);
  options.loss_scale("512");
  EXPECT_FALSE(options.scaler_options()->dynamic());
  EXPECT_EQ(options.scaler_options()->init_scale(), 512.0);
  options.loss_scale("none");
  EXPECT_FALSE(options.scaler_options());
  options.precision(Precision::bf16).loss_scale("auto");
  EXPECT_FALSE(options.scaler_options());
}

}  // namespace
}  // namespace scaletrain::amp
