// The step profiler. References: the trainer's own schedule (which steps run, which kernels the
// fused optimizer launches per step) and the window's arguments.
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "scaletrain/core/error.h"
#include "scaletrain/train/trainer.h"
#include "test_util.h"

namespace scaletrain::train {
namespace {

RunConfig small(const std::string& out_dir, DeviceChoice device) {
  RunConfig c;
  c.model.n_layer(1).n_head(2).n_embd(32).block_size(224);
  c.data.train_examples(64).val_examples(8);
  c.train.max_steps(6).batch_size(4).log_every(3).out_dir(out_dir).device(device).save_model(false);
  c.eval.examples(0).before_training(false).loss_batches(1).batch_size(4);
  return c;
}

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

TEST(StepProfiler, RejectsWindowsOutsideTheRunByName) {
  EXPECT_THROW(StepProfiler({-1, 2, "x.json"}), std::invalid_argument);
  EXPECT_THROW(StepProfiler({0, 0, "x.json"}), std::invalid_argument);
  testing::TempDir dir;
  Trainer trainer(small(dir.file("run"), DeviceChoice::cpu));
  trainer.profile({4, 3, dir.file("p.json")});  // steps 4..6, the run has 0..5
  try {
    trainer.fit();
    FAIL() << "no error";
  } catch (const core::UsageError& e) {
    EXPECT_EQ(std::string(e.what()), "--profile-steps: steps 4 to 6 are not all in this run (steps 0 to 5)");
  }
}

TEST(StepProfiler, WritesTheWindowOnCpu) {
  testing::TempDir dir;
  Trainer trainer(small(dir.file("run"), DeviceChoice::cpu));
  trainer.profile({2, 3, dir.file("p.json")});
  trainer.fit();
  const auto j = read_json(dir.file("p.json"));
  EXPECT_EQ(j["first_step"], 2);
  EXPECT_EQ(j["steps"], 3);
  EXPECT_GT(j["wall_ms"].get<double>(), 0.0);
  EXPECT_TRUE(j["kernels"].is_array());  // no CUDA kernels on the CPU
}

// On the GPU: the fused AdamW launches its kernel once per param group per step (the tiny model
// has fewer than 48 parameters per group), so the window holds exactly steps x 2 of them.
TEST(StepProfiler, CountsTheFusedAdamWKernelsOnCuda) {
  SCALETRAIN_REQUIRE_CUDA();
  testing::TempDir dir;
  Trainer trainer(small(dir.file("run"), DeviceChoice::cuda));
  trainer.profile({2, 3, dir.file("p.json")});
  trainer.fit();
  const auto j = read_json(dir.file("p.json"));
  int64_t adamw = 0;
  double total_ms = 0;
  for (const auto& k : j["kernels"]) {
    if (k["name"].get<std::string>().find("adamw_kernel") != std::string::npos) adamw += k["count"].get<int64_t>();
    total_ms += k["total_ms"].get<double>();
  }
  EXPECT_EQ(adamw, 3 * 2);
  EXPECT_GT(total_ms, 0.0);
  EXPECT_LE(total_ms, j["wall_ms"].get<double>() * 1.05);
}

}  // namespace
}  // namespace scaletrain::train
