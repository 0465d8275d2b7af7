// The trainer under mixed precision. Reference: the same run in fp32 (same seed, same batches);
// the low-precision runs must track its training loss within a stated band.
#include <fstream>
#include <functional>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "scaletrain/core/error.h"
#include "scaletrain/train/trainer.h"
#include "test_util.h"

namespace scaletrain::train {
namespace {

RunConfig tiny(const std::string& out_dir, DeviceChoice device) {
  RunConfig c;
  c.model.n_layer(2).n_head(2).n_embd(32).block_size(224);
  c.data.train_examples(512).val_examples(16);
  c.optim.lr(3e-3).min_lr(3e-4).warmup_steps(5);
  c.train.max_steps(40).batch_size(8).log_every(10).out_dir(out_dir).device(device);
  c.eval.examples(0).before_training(false).loss_batches(2).batch_size(8);
  return c;
}

struct Run {
  std::vector<double> losses;  // per logging interval
  nlohmann::json summary;
};

Run train(RunConfig config) {
  Trainer trainer(config);
  trainer.fit();
  Run run;
  std::ifstream metrics(config.train.out_dir() + "/metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "train") run.losses.push_back(j["loss"].get<double>());
  }
  std::ifstream summary(config.train.out_dir() + "/summary.json");
  run.summary = nlohmann::json::parse(summary);
  return run;
}

// Every logged loss of `run` within `band` (relative) of the fp32 run's.
void expect_tracks(const Run& run, const Run& fp32, double band, const std::string& what) {
  ASSERT_EQ(run.losses.size(), fp32.losses.size()) << what;
  ASSERT_GE(fp32.losses.size(), 4u);
  EXPECT_LT(fp32.losses.back(), 0.8 * fp32.losses.front()) << "the fp32 reference did not learn";
  for (size_t i = 0; i < run.losses.size(); ++i) {
    EXPECT_NEAR(run.losses[i], fp32.losses[i], band * fp32.losses[i]) << what << ", interval " << i;
  }
}

void mixed_precision_tracks_fp32(DeviceChoice device, const std::string& dir) {
  const double band = 0.02;  // 2% of the fp32 loss at every logged interval
  Run fp32 = train(tiny(dir + "/fp32", device));
  EXPECT_EQ(fp32.summary["precision"], "fp32");

  RunConfig fp16 = tiny(dir + "/fp16", device);
  fp16.amp.precision(amp::Precision::fp16).emulated_fp16(true);
  Run fp16_run = train(fp16);
  expect_tracks(fp16_run, fp32, band, "fp16 + dynamic loss scaling");
  EXPECT_EQ(fp16_run.summary["precision"], "fp16");
  EXPECT_TRUE(fp16_run.summary["loss_scale"].is_number());  // a scaler ran
  EXPECT_LT(fp16_run.summary["skipped_steps"].get<int64_t>(), 5);

  RunConfig bf16 = tiny(dir + "/bf16", device);
  bf16.amp.precision(amp::Precision::bf16);
  expect_tracks(train(bf16), fp32, band, "bf16 autocast");

  RunConfig master = tiny(dir + "/master", device);
  master.amp.precision(amp::Precision::bf16).low_precision_params(true);
  master.train.grad_accum_steps(2).batch_size(4);
  RunConfig fp32_accum = tiny(dir + "/fp32_accum", device);
  fp32_accum.train.grad_accum_steps(2).batch_size(4);
  expect_tracks(train(master), train(fp32_accum), band, "bf16 parameters, fp32 master weights and accumulation");
}

TEST(TrainerAmp, LowPrecisionRunsTrackTheFp32LossOnCpu) {
  testing::TempDir dir;
  mixed_precision_tracks_fp32(DeviceChoice::cpu, dir.path());
}

TEST(TrainerAmp, LowPrecisionRunsTrackTheFp32LossOnCuda) {
  SCALETRAIN_REQUIRE_CUDA();
  testing::TempDir dir;
  mixed_precision_tracks_fp32(DeviceChoice::cuda, dir.path());
}

// optim.fused on against LibTorch's AdamW (off): the same arithmetic up to rounding, so every
// logged loss within 1% in fp32, bf16 autocast, bf16 parameters with master weights (the fused step
// reads the model's bf16 gradients and writes its weights) and fp16 loss scaling.
void fused_tracks_libtorch(DeviceChoice device, const std::string& dir) {
  const auto both = [&](const std::string& name, const std::function<void(RunConfig&)>& edit) {
    RunConfig off = tiny(dir + "/" + name + "_off", device), on = tiny(dir + "/" + name + "_on", device);
    edit(off), edit(on);
    off.optim.fused(FusedChoice::off);
    on.optim.fused(FusedChoice::on);
    expect_tracks(train(on), train(off), 0.01, name + ": fused AdamW against LibTorch's");
  };
  both("fp32", [](RunConfig&) {});
  both("bf16", [](RunConfig& c) { c.amp.precision(amp::Precision::bf16); });
  both("master", [](RunConfig& c) {
    c.amp.precision(amp::Precision::bf16).low_precision_params(true).fp32_grad_accum(false);
  });
  both("master_accum", [](RunConfig& c) {
    c.amp.precision(amp::Precision::bf16).low_precision_params(true);
    c.train.grad_accum_steps(2).batch_size(4);
  });
  both("fp16", [](RunConfig& c) { c.amp.precision(amp::Precision::fp16).emulated_fp16(true); });
}

TEST(TrainerAmp, FusedAdamWTracksLibTorchAdamWOnCpu) {
  testing::TempDir dir;
  fused_tracks_libtorch(DeviceChoice::cpu, dir.path());
}

TEST(TrainerAmp, FusedAdamWTracksLibTorchAdamWOnCuda) {
  SCALETRAIN_REQUIRE_CUDA();
  testing::TempDir dir;
  fused_tracks_libtorch(DeviceChoice::cuda, dir.path());
}

TEST(TrainerAmp, BfloatParametersStayBfloatAndMastersFp32) {
  RunConfig config = tiny("", DeviceChoice::cpu);
  config.amp.precision(amp::Precision::bf16).low_precision_params(true);
  config.train.max_steps(3);
  Trainer trainer(config);
  trainer.fit();
  for (const auto& p : trainer.model()->parameters()) EXPECT_EQ(p.scalar_type(), at::kBFloat16);
}

TEST(TrainerAmp, Fp16OnACpuWithoutNativeFp16IsRefused) {
  if (amp::cpu_has_native_fp16()) GTEST_SKIP() << "this CPU has native fp16";
  RunConfig config = tiny("", DeviceChoice::cpu);
  config.amp.precision(amp::Precision::fp16);
  try {
    Trainer trainer(config);
    FAIL() << "no error";
  } catch (const core::ConfigError& e) {
    EXPECT_EQ(e.key(), "amp.precision");
    EXPECT_NE(std::string(e.what()).find("no native fp16"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace scaletrain::train
