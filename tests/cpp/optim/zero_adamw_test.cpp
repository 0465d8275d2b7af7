// ZeroAdamW on 1-4 Gloo ranks (separate processes, tests/cpp/dist/dist_worker.cpp) against
// LibTorch's torch::optim::AdamW on the whole global batch in one process: 10 steps, every
// parameter within 1e-6 relative, stages 1 and 2, with and without accumulation, clipping, loss
// scaling and an inf on one rank; per-rank memory by ZeRO's formulas. Single-process checks here.
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adamw.h>

#include "dist/ranks.h"
#include "test_util.h"
#include "scaletrain/optim/zero_adamw.h"

namespace scaletrain::optim {
namespace {

using scaletrain::testing::outputs;
using scaletrain::testing::run_ranks;

struct Case {
  int world;
  int stage;
  int accum;
  double clip;
  bool fallbacks;
  double loss_scale;
  int skip_at;
  int offload = 0;  // 1: cpu_offload; 2: also overlap_forward; 3: also offload_fraction 0.5
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.world << " ranks, stage " << c.stage << ", accum " << c.accum << ", clip " << c.clip << ", fallbacks "
      << c.fallbacks << ", loss scale " << c.loss_scale << ", inf at step " << c.skip_at << ", offload " << c.offload;
}

std::string name_of(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  std::string name = "ranks" + std::to_string(c.world) + "_stage" + std::to_string(c.stage) + "_accum" +
                     std::to_string(c.accum);
  if (c.clip > 0) name += "_clip";
  if (c.fallbacks) name += "_fallbacks";
  if (c.loss_scale != 1) name += "_scaled";
  if (c.skip_at >= 0) name += "_inf";
  if (c.offload > 0) name += "_offload";
  if (c.offload >= 2) name += "_overlap";
  if (c.offload == 3) name += "_half";
  return name;
}

class ZeroAdamWRanks : public ::testing::TestWithParam<Case> {};

TEST_P(ZeroAdamWRanks, MatchesTorchAdamWOnTheGlobalBatch) {
  const Case& c = GetParam();
  auto results = run_ranks(c.world,
                           {"zero", std::to_string(c.stage), std::to_string(c.accum), std::to_string(c.clip),
                            c.fallbacks ? "1" : "0", std::to_string(c.loss_scale), std::to_string(c.skip_at), "cpu",
                            std::to_string(c.offload)},
                           240);
  for (const auto& result : results) ASSERT_EQ(result.exit_code, 0) << outputs(results);
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, ZeroAdamWRanks,
    ::testing::Values(Case{1, 1, 1, 0, false, 1, -1}, Case{1, 2, 2, 0.2, false, 1, -1},
                      Case{2, 1, 1, 0, false, 1, -1}, Case{2, 2, 3, 0, false, 1, -1},
                      Case{3, 1, 2, 0.2, false, 1024, -1}, Case{3, 2, 1, 0.2, true, 1, -1},
                      Case{4, 1, 3, 0, false, 1, -1}, Case{4, 2, 2, 0.2, false, 1024, 4},
                      Case{2, 1, 1, 0.2, false, 1024, 3},
                      // CPU offload: the same matrix's corners (the worker thread, host state, copies back).
                      Case{1, 1, 2, 0.2, false, 1, -1, 1}, Case{1, 2, 1, 0, false, 1, -1, 1},
                      Case{2, 2, 2, 0.2, false, 1024, 4, 1}, Case{3, 1, 3, 0, false, 1, -1, 1},
                      Case{4, 2, 1, 0.2, true, 1, -1, 1}, Case{2, 1, 2, 0.2, false, 1024, 3, 2},
                      Case{1, 1, 1, 0, false, 1, -1, 3}, Case{3, 2, 2, 0.2, false, 1024, 4, 3},
                      // Stage 3 (sharded parameters, gathered per Linear): ranks 1-4, accumulation,
                      // clipping, scaling, an inf, the fallbacks, and offload with its overlap.
                      Case{1, 3, 1, 0, false, 1, -1}, Case{2, 3, 2, 0.2, false, 1024, 4},
                      Case{3, 3, 3, 0, true, 1, -1}, Case{4, 3, 2, 0.2, false, 1, -1},
                      Case{2, 3, 2, 0.2, false, 1, -1, 1}, Case{4, 3, 1, 0.2, false, 1024, 3, 2},
                      Case{3, 3, 2, 0, false, 1, -1, 3}),
    name_of);

using scaletrain::testing::error_message;
const auto& message_of = error_message;

TEST(ZeroAdamW, RefusesWhatItDoesNotDo) {
  torch::nn::Linear linear(3, 2);
  EXPECT_NE(message_of([&] { ZeroAdamW(linear->parameters(), ZeroAdamWOptions(1e-3).stage(4)); }).find("stage 4"),
            std::string::npos);
  EXPECT_NE(message_of([&] { ZeroAdamW(linear->parameters(), ZeroAdamWOptions(1e-3).stage(0)); }).find("stage 0"),
            std::string::npos);
  EXPECT_NE(message_of([&] { ZeroAdamW(linear->parameters(), ZeroAdamWOptions(1e-3).stage(3), {}, {0}); })
                .find("1 units for 2 parameters"),
            std::string::npos);
  EXPECT_NE(message_of([&] { ZeroAdamW(linear->parameters(), ZeroAdamWOptions(1e-3).stage(3), {}, {0, -2}); })
                .find("parameter 1 in unit -2"),
            std::string::npos);
  EXPECT_NE(message_of([&] { ZeroAdamW(linear->parameters(), ZeroAdamWOptions(-1.0)); }).find("lr -1"),
            std::string::npos);
  EXPECT_NE(message_of([&] { ZeroAdamW(linear->parameters(), ZeroAdamWOptions(1e-3).cpu_offload(true).offload_fraction(0)); })
                .find("offload_fraction 0"),
            std::string::npos);
  EXPECT_NE(message_of([&] { ZeroAdamW(linear->parameters(), ZeroAdamWOptions(1e-3).overlap_forward(true)); })
                .find("overlap_forward needs cpu_offload"),
            std::string::npos);
  EXPECT_NE(message_of([&] { ZeroAdamW(linear->parameters(), ZeroAdamWOptions(1e-3).bucket_mb(0)); }).find("bucket_mb"),
            std::string::npos);
  auto mixed = std::vector<at::Tensor>{linear->weight, at::zeros({2}, at::kDouble).requires_grad_()};
  EXPECT_NE(message_of([&] { ZeroAdamW(mixed, ZeroAdamWOptions(1e-3)); }).find("parameter 1 is Double"),
            std::string::npos);
}

TEST(ZeroAdamW, ASecondBackwardWithSyncOnIsAnError) {
  torch::nn::Linear linear(3, 2);
  ZeroAdamW adamw(linear->parameters(), ZeroAdamWOptions(1e-3).stage(2));
  auto x = at::randn({4, 3});
  linear->forward(x).sum().backward();
  std::string message = message_of([&] { linear->forward(x).sum().backward(); });
  EXPECT_NE(message.find("set_gradient_sync(false)"), std::string::npos) << message;
}

TEST(ZeroAdamW, SyncOffAfterASyncedBackwardIsAnError) {
  torch::nn::Linear linear(3, 2);
  ZeroAdamW adamw(linear->parameters(), ZeroAdamWOptions(1e-3).stage(1));
  auto x = at::randn({4, 3});
  linear->forward(x).sum().backward();
  adamw.set_gradient_sync(false);
  std::string message = message_of([&] { linear->forward(x).sum().backward(); });
  EXPECT_NE(message.find("sync off after a backward with sync on"), std::string::npos) << message;
}

TEST(ZeroAdamW, RefusesTiedParametersAndNonLeaves) {
  torch::nn::Linear linear(3, 2);
  std::vector<at::Tensor> tied{linear->weight, linear->bias, linear->weight};
  EXPECT_NE(message_of([&] { ZeroAdamW(tied, ZeroAdamWOptions(1e-3)); }).find("parameters 0 and 2 are the same tensor"),
            std::string::npos);
  std::vector<at::Tensor> derived{linear->weight * 2};
  std::string derived_message = message_of([&] { ZeroAdamW(derived, ZeroAdamWOptions(1e-3)); });
  EXPECT_NE(derived_message.find("non-leaf"), std::string::npos) << derived_message;  // torch::optim::Optimizer says so first
}

// A parameter that gets no gradient counts as a zero gradient (as DeepSpeed's flat buffers do):
// reference torch::optim::AdamW with an explicit zero gradient for it.
TEST(ZeroAdamW, AParameterWithoutGradientStepsAsZero) {
  for (int64_t stage : {1, 2}) {
    torch::manual_seed(5);
    torch::nn::Linear used(6, 4);
    auto unused = at::randn({5}).requires_grad_();
    std::vector<at::Tensor> reference{used->weight.detach().clone().requires_grad_(),
                                      used->bias.detach().clone().requires_grad_(), unused.detach().clone().requires_grad_()};
    torch::optim::AdamW reference_adamw(reference, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
    ZeroAdamW adamw(std::vector<at::Tensor>{used->weight, used->bias, unused},
                    ZeroAdamWOptions(1e-2).weight_decay(0.1).stage(stage).bucket_mb(0.0001));
    for (int step = 0; step < 3; ++step) {
      auto x = at::randn({8, 6});
      at::matmul(x, reference[0].t()).add(reference[1]).square().mean().backward();
      reference[2].mutable_grad() = at::zeros({5});
      reference_adamw.step();
      reference_adamw.zero_grad();
      used->forward(x).square().mean().backward();
      adamw.step();
      adamw.zero_grad();
      EXPECT_LT((unused - reference[2]).abs().max().item<double>(), 1e-6) << "stage " << stage;
      EXPECT_LT((used->weight - reference[0]).abs().max().item<double>(), 1e-6) << "stage " << stage;
    }
  }
}

// Stage 2 lets go of each bucket buffer once its reduce-scatter is launched: after backward a rank
// holds its gradient chunks only (one process: the whole shard), no bucket buffers.
TEST(ZeroAdamW, Stage2HoldsNoBucketBuffersAfterBackward) {
  torch::nn::Linear linear(64, 64);
  ZeroAdamW adamw(linear->parameters(), ZeroAdamWOptions(1e-3).stage(2).bucket_mb(0.004));
  ASSERT_GT(adamw.layout().buckets.size(), 1u);
  linear->forward(at::randn({4, 64})).sum().backward();
  EXPECT_EQ(adamw.memory().gradient_bytes, 4 * adamw.layout().shard_numel());
  EXPECT_FALSE(linear->weight.grad().defined());
}

// Stage 3 in one process: a unit's parameters have storage only inside its forward and its
// backward, also when a parameter of the unit gets no gradient and over accumulated micro-steps;
// the steps follow torch::optim::AdamW (the unused parameter stepped with a zero gradient, as
// ZeroAdamW counts it); writes between gather_parameters() and release_parameters() are kept.
TEST(ZeroAdamW, Stage3ParametersHaveStorageOnlyWhileTheirUnitIsInUse) {
  torch::manual_seed(7);
  torch::nn::Linear first(32, 48), second(48, 16);
  auto unused = at::randn({5}).requires_grad_();
  std::vector<at::Tensor> params{first->weight, first->bias, second->weight, second->bias, unused};
  std::vector<at::Tensor> reference;
  for (auto& p : params) reference.push_back(p.detach().clone().requires_grad_());
  torch::optim::AdamW reference_adamw(reference, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  ZeroAdamW adamw(params, ZeroAdamWOptions(1e-2).weight_decay(0.1).stage(3), {}, {0, 0, 1, 1, 0});
  ASSERT_EQ(adamw.num_units(), 2);
  EXPECT_EQ(adamw.unit_of(2), 1);
  const int64_t shard_bytes = 4 * adamw.layout().shard_numel();
  auto storage_bytes = [](const at::Tensor& t) { return t.storage().nbytes(); };
  EXPECT_EQ(adamw.memory().parameter_bytes, shard_bytes);
  EXPECT_EQ(storage_bytes(first->weight), 0u);
  for (int step = 0; step < 3; ++step) {
    std::vector<at::Tensor> inputs{at::randn({8, 32}), at::randn({8, 32})};
    for (const auto& x : inputs) {
      (at::linear(at::tanh(at::linear(x, reference[0], reference[1])), reference[2], reference[3]).square().mean() / 2)
          .backward();
    }
    reference[4].mutable_grad() = at::zeros({5});
    reference_adamw.step();
    reference_adamw.zero_grad();

    for (size_t micro = 0; micro < inputs.size(); ++micro) {
      adamw.set_gradient_sync(micro + 1 == inputs.size());
      at::Tensor hidden = adamw.run_unit(0, [&] {
        EXPECT_GT(storage_bytes(first->weight), 0u);
        return first->forward(inputs[micro]);
      });
      EXPECT_EQ(storage_bytes(first->weight), 0u);  // freed after its forward
      at::Tensor out = adamw.run_unit(1, [&] { return second->forward(at::tanh(hidden)); });
      EXPECT_EQ(adamw.memory().parameter_bytes, shard_bytes);  // nothing gathered between units
      (out.square().mean() / 2).backward();                   // gathers each unit again, frees it
      // Unit 0's `unused` got no gradient: its hold ends with the backward all the same.
      EXPECT_EQ(adamw.memory().parameter_bytes, shard_bytes) << "step " << step << " micro-step " << micro;
    }
    EXPECT_FALSE(first->weight.grad().defined());  // as stage 2: moved into its bucket
    adamw.step();
    adamw.zero_grad();
    adamw.gather_parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_LT((params[i] - reference[i]).abs().max().item<double>(), 1e-6) << "step " << step << " parameter " << i;
    }
    adamw.release_parameters();
  }
  adamw.gather_parameters();
  {
    at::NoGradGuard no_grad;
    second->bias.fill_(0.5);
  }
  adamw.release_parameters();
  adamw.gather_unit(1);
  EXPECT_TRUE(at::equal(second->bias, at::full({16}, 0.5)));
  adamw.release_unit(1);
  EXPECT_NE(message_of([&] { adamw.release_unit(1); }).find("unit 1 is not gathered"), std::string::npos);
  EXPECT_NE(message_of([&] { adamw.gather_unit(2); }).find("unit 2 (expected 0 to 1)"), std::string::npos);
}

TEST(ZeroAdamW, ParametersBecomeViewsOfOneBufferAndKeepTheirValues) {
  torch::manual_seed(1);
  torch::nn::Linear linear(5, 3);
  auto before = linear->weight.clone();
  ZeroAdamW adamw(linear->parameters(), ZeroAdamWOptions(1e-3).stage(1));
  EXPECT_TRUE(at::equal(linear->weight, before));
  EXPECT_EQ(linear->weight.storage().data_ptr().get(), linear->bias.storage().data_ptr().get());
  EXPECT_TRUE(linear->weight.grad().defined());  // stage 1: views of the flat gradient buffer
}

// A bf16 model: ZeroAdamW keeps an fp32 master of its chunks and writes the rounded values into
// the model. Reference: torch::optim::AdamW on fp32 copies of the initial parameters, stepped with
// the bf16 model's own gradients (in fp32, caught by hooks before they reach the optimizer); the
// model must hold the reference rounded to bf16. Stage 3 writes the rounded values into its shard
// and gathers them for the forward.
void expect_bf16_model_follows_fp32_reference(const at::Device& device, bool offload, int64_t stage = 1) {
  torch::manual_seed(3);
  torch::nn::Linear linear(70, 30);
  linear->to(device, at::kBFloat16);
  std::vector<at::Tensor> reference;
  for (auto& p : linear->parameters()) reference.push_back(p.detach().to(at::kFloat).clone().requires_grad_());
  torch::optim::AdamW reference_adamw(reference, torch::optim::AdamWOptions(1e-2).eps(1e-5).weight_decay(0.1));
  ZeroAdamW adamw(linear->parameters(),
                  ZeroAdamWOptions(1e-2).eps(1e-5).weight_decay(0.1).stage(stage).bucket_mb(0.001).cpu_offload(offload),
                  {}, stage == 3 ? std::vector<int64_t>{0, 0} : std::vector<int64_t>{});
  auto params = linear->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].register_hook([&reference, i](const at::Tensor& grad) { reference[i].mutable_grad() = grad.to(at::kFloat); });
  }
  for (int step = 0; step < 5; ++step) {
    auto x = at::randn({8, 70}, at::TensorOptions().device(device).dtype(at::kBFloat16));
    adamw.run_unit(0, [&] { return linear->forward(x); }).square().mean().backward();
    reference_adamw.step();
    adamw.step();
    adamw.zero_grad();
    adamw.gather_parameters();  // stage 3: to read them
    for (size_t i = 0; i < params.size(); ++i) {
      auto expected = reference[i].detach();
      auto got = params[i].detach().to(at::kFloat);
      // One bf16 rounding of (nearly) the same fp32 value: within one ulp (2^-8 relative).
      auto bound = expected.abs() * (1.0 / 256) + 1e-30;
      ASSERT_TRUE((got - expected).abs().le(bound).all().item<bool>())
          << "step " << step << " parameter " << i << ": max difference " << (got - expected).abs().max().item<double>();
    }
    adamw.release_parameters();
  }
  // fp32 master, exp_avg, exp_avg_sq and the step counts; offloaded, on the host with the bf16
  // gradient chunks and the bf16 values to copy back.
  int64_t optimizer = 12 * adamw.layout().shard_numel() + 4 * static_cast<int64_t>(adamw.layout().buckets.size());
  EXPECT_EQ(adamw.memory().optimizer_bytes, offload ? 0 : optimizer);
  EXPECT_EQ(adamw.memory().host_bytes, offload ? optimizer + 4 * adamw.layout().shard_numel() : 0);
}

// A model's weights written after the optimizer was built or loaded (model.load_state_dict after
// the optimizer's) are the values the next step starts from, not the optimizer's fp32 master.
TEST(ZeroAdamW, ParametersWrittenBetweenStepsReplaceTheMasters) {
  for (bool offload : {false, true}) {
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      torch::nn::Linear linear(5, 3);
      linear->to(dtype);
      ZeroAdamW adamw(linear->parameters(), ZeroAdamWOptions(0.0).weight_decay(0.0).stage(2).cpu_offload(offload));
      linear->forward(at::randn({4, 5}, dtype)).sum().backward();
      adamw.step();
      adamw.zero_grad();
      {
        at::NoGradGuard no_grad;
        linear->weight.fill_(0.5);
      }
      linear->forward(at::randn({4, 5}, dtype)).sum().backward();
      adamw.step();  // lr 0: the values stay what they were before the step
      EXPECT_TRUE(linear->weight.eq(0.5).all().item<bool>()) << "offload " << offload << " " << dtype;
    }
  }
}

TEST(ZeroAdamW, Bf16ModelFollowsTheFp32ReferenceOnCpu) {
  expect_bf16_model_follows_fp32_reference(at::kCPU, false);
  expect_bf16_model_follows_fp32_reference(at::kCPU, true);
  expect_bf16_model_follows_fp32_reference(at::kCPU, false, 3);
  expect_bf16_model_follows_fp32_reference(at::kCPU, true, 3);
}

TEST(ZeroAdamW, Bf16ModelFollowsTheFp32ReferenceOnCuda) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  expect_bf16_model_follows_fp32_reference(at::Device(at::kCUDA, 0), false);
  expect_bf16_model_follows_fp32_reference(at::Device(at::kCUDA, 0), true);
  expect_bf16_model_follows_fp32_reference(at::Device(at::kCUDA, 0), false, 3);
  expect_bf16_model_follows_fp32_reference(at::Device(at::kCUDA, 0), true, 3);
}

TEST(ZeroAdamW, Fp32OnCudaMatchesTorchAdamW) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (const char* stage : {"1", "2", "3"}) {
    for (const char* offload : {"0", "1", "2", "3"}) {
      auto results = run_ranks(1, {"zero", stage, "2", "0.2", "0", "1024", "3", "cuda", offload}, 240);
      ASSERT_EQ(results[0].exit_code, 0) << outputs(results);
      EXPECT_NE(results[0].output.find("(nccl)"), std::string::npos) << outputs(results);
    }
  }
}

}  // namespace
}  // namespace scaletrain::optim
