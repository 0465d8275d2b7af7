// Model-state memory estimate. References: the parameter count of the GPT actually built with the
// same options, and the bytes per parameter of the formulas (fp32: weight, gradient and two AdamW
// moments; bf16 parameters: bf16 weight and gradient plus fp32 master weight, gradient and moments).
#include <gtest/gtest.h>

#include "scaletrain/core/error.h"
#include "scaletrain/model/gpt.h"
#include "scaletrain/plan/memory.h"

namespace scaletrain::plan {
namespace {

TEST(ModelMemory, ParameterCountIsTheBuiltModels) {
  for (bool bias : {true, false}) {
    for (bool tied : {true, false}) {
      model::GPTOptions options;
      options.vocab_size(301).n_layer(3).n_head(4).n_embd(48).block_size(32).bias(bias).tie_embeddings(tied);
      model::GPT gpt(options);
      EXPECT_EQ(gpt_parameter_count(options), static_cast<double>(gpt->num_parameters()))
          << "bias " << bias << " tied " << tied;
    }
  }
}

TEST(ModelMemory, BytesPerParameterFollowThePrecision) {
  model::GPTOptions model;
  model.n_layer(2).n_head(2).n_embd(32).block_size(16);
  const double n = gpt_parameter_count(model);
  const double rope = 2.0 * 16 * 8 * 4;  // cos and sin tables, fp32
  EXPECT_EQ(model_state_bytes(model, amp::AmpOptions()).total(), 16 * n + rope);
  EXPECT_EQ(model_state_bytes(model, amp::AmpOptions().precision(amp::Precision::bf16)).total(), 16 * n + rope);
  const auto low = model_state_bytes(model, amp::AmpOptions().precision(amp::Precision::bf16).low_precision_params(true));
  EXPECT_EQ(low.weights, 2 * n);
  EXPECT_EQ(low.total(), 20 * n + rope);
}

TEST(ModelMemory, ZeroDividesTheStatesOverTheRanksAndOffloadMovesThemToTheHost) {
  // The formulas of ZeRO (Rajbhandari et al.) for one of 4 ranks, bf16 parameters with an fp32
  // master: stage 1 shards master and moments, stage 2 also the gradients, stage 3 also the weights.
  model::GPTOptions model;
  model.n_layer(2).n_head(2).n_embd(32).block_size(16);
  const double n = gpt_parameter_count(model), rope = 2.0 * 16 * 8 * 4;
  const auto bf16 = amp::AmpOptions().precision(amp::Precision::bf16).low_precision_params(true);
  EXPECT_EQ(model_state_bytes(model, bf16, {1, 4}).total(), 2 * n + 2 * n + 12 * n / 4 + rope);
  EXPECT_EQ(model_state_bytes(model, bf16, {2, 4}).total(), 2 * n + (2 + 12) * n / 4 + rope);
  EXPECT_EQ(model_state_bytes(model, bf16, {3, 4}).total(), (2 + 2 + 12) * n / 4 + rope);
  EXPECT_EQ(model_state_bytes(model, bf16, {3, 4}).host, 0);
  // Offload: 16 bytes per parameter of the offloaded share on the host (ZeroAdamW's host buffers).
  const auto off = model_state_bytes(model, bf16, {2, 1, true, 0.75});
  EXPECT_DOUBLE_EQ(off.total(), 2 * n + 0.25 * (2 + 12) * n + rope);
  EXPECT_DOUBLE_EQ(off.host, 0.75 * 16 * n);
  // An fp32 model has no master on the device: 4 + 4 + 8 bytes, sharded as above.
  EXPECT_EQ(model_state_bytes(model, amp::AmpOptions(), {2, 2}).total(), 4 * n + 12 * n / 2 + rope);
}

TEST(ModelMemory, AModelThatCannotFitFailsBeforeAllocating) {
  model::GPTOptions huge;
  huge.n_layer(1024).n_head(64).n_embd(65536);
  try {
    check_model_fits(huge, amp::AmpOptions(), c10::Device(c10::kCPU));
    FAIL() << "expected a ConfigError";
  } catch (const core::ConfigError& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.key(), "model");
    EXPECT_NE(message.find("model.n_layer 1024, model.n_embd 65536"), std::string::npos) << message;
    EXPECT_NE(message.find("TiB for weights, gradients and AdamW state"), std::string::npos) << message;
    EXPECT_NE(message.find("but cpu has"), std::string::npos) << message;
  }
  model::GPTOptions small;
  EXPECT_NO_THROW(check_model_fits(small, amp::AmpOptions(), c10::Device(c10::kCPU)));
  EXPECT_GT(device_memory_bytes(c10::Device(c10::kCPU)), 1e8);
  EXPECT_EQ(format_bytes(1.5 * (1 << 30)), "1.50 GiB");
}

}  // namespace
}  // namespace scaletrain::plan
