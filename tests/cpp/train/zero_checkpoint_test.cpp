// Sharded ZeroAdamW checkpoints (train/zero_checkpoint.h): saved on N Gloo ranks, resumed on M
// ranks at another stage or offload setting, the resumed steps within 1e-6 of torch's AdamW run
// without interruption (tests/cpp/dist/dist_worker.cpp, zero_checkpoint); a rank killed during a
// save leaves the previous checkpoint the newest valid one; a checkpoint of another model is refused.
#include <gtest/gtest.h>
#include <torch/nn/modules/linear.h>

#include "dist/ranks.h"
#include "scaletrain/core/error.h"
#include "scaletrain/core/fs.h"
#include "scaletrain/train/zero_checkpoint.h"
#include "test_util.h"

namespace scaletrain::train {
namespace {

using scaletrain::testing::outputs;
using scaletrain::testing::run_ranks;
using scaletrain::testing::TempDir;

struct Reshard {
  int save_world;
  int save_stage;
  bool save_offload;
  int load_world;
  int load_stage;
  bool load_offload;
};

void PrintTo(const Reshard& r, std::ostream* os) {
  *os << r.save_world << " ranks stage " << r.save_stage << (r.save_offload ? " offload" : "") << " -> "
      << r.load_world << " ranks stage " << r.load_stage << (r.load_offload ? " offload" : "");
}

class ZeroCheckpointReshards : public ::testing::TestWithParam<Reshard> {};

TEST_P(ZeroCheckpointReshards, ResumesOnAnotherWorldSizeAsIfUninterrupted) {
  const Reshard& r = GetParam();
  TempDir dir;
  auto saved = run_ranks(r.save_world, {"zero_checkpoint", "save", dir.path(), std::to_string(r.save_stage),
                                        r.save_offload ? "1" : "0"}, 240);
  for (const auto& result : saved) ASSERT_EQ(result.exit_code, 0) << outputs(saved);
  auto checkpoint = CheckpointStore(dir.path()).load(3);
  EXPECT_TRUE(checkpoint.has("zero_rank00000_of0000" + std::to_string(r.save_world) + ".pt"));
  EXPECT_TRUE(checkpoint.has("model.pt"));
  auto loaded = run_ranks(r.load_world, {"zero_checkpoint", "load", dir.path(), std::to_string(r.load_stage),
                                         r.load_offload ? "1" : "0"}, 240);
  for (const auto& result : loaded) ASSERT_EQ(result.exit_code, 0) << outputs(loaded);
}

INSTANTIATE_TEST_SUITE_P(Worlds, ZeroCheckpointReshards,
                         ::testing::Values(Reshard{2, 2, false, 4, 1, false}, Reshard{4, 1, false, 1, 2, true},
                                           Reshard{3, 1, true, 2, 2, false}, Reshard{2, 2, false, 3, 3, false},
                                           Reshard{4, 3, false, 2, 3, true}, Reshard{3, 3, true, 1, 1, false}));

TEST(ZeroCheckpoint, ARankKilledDuringASaveLeavesThePreviousCheckpoint) {
  TempDir dir;
  auto died = run_ranks(3, {"zero_checkpoint", "die", dir.path(), "2", "0"}, 120);
  EXPECT_EQ(died[2].signal, SIGKILL) << outputs(died);
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(died[static_cast<size_t>(r)].exit_code, 0) << outputs(died);
    EXPECT_LT(died[static_cast<size_t>(r)].seconds, 60) << outputs(died);
  }
  CheckpointStore store(dir.path());
  EXPECT_EQ(store.list(), std::vector<int64_t>{3});  // no step 5: its folder was never committed
  auto resumed = run_ranks(2, {"zero_checkpoint", "load", dir.path(), "2", "0"}, 240);
  for (const auto& result : resumed) ASSERT_EQ(result.exit_code, 0) << outputs(resumed);
}

TEST(ZeroCheckpoint, RefusesACheckpointOfAnotherModel) {
  TempDir dir;
  CheckpointStore store(dir.path());
  torch::nn::Linear small(3, 2);
  optim::ZeroAdamW small_adamw(small->parameters(), optim::ZeroAdamWOptions(1e-3));
  save_sharded(store, 1, small_adamw, {{"model.pt", "weights"}});
  auto checkpoint = store.load(1);
  EXPECT_TRUE(has_shards(checkpoint));
  torch::nn::Linear big(4, 2);
  optim::ZeroAdamW big_adamw(big->parameters(), optim::ZeroAdamWOptions(1e-3));
  auto message = scaletrain::testing::error_message([&] { load_sharded(checkpoint, big_adamw); });
  EXPECT_NE(message.find("a checkpoint of another model"), std::string::npos) << message;
  EXPECT_NE(message.find(checkpoint.path), std::string::npos) << message;
  // The file names of the shards are the optimizer's.
  message = scaletrain::testing::error_message(
      [&] { save_sharded(store, 2, small_adamw, {{"zero_rank00000_of00001.pt", "x"}}); });
  EXPECT_NE(message.find("reserved"), std::string::npos) << message;
  Checkpoint plain = store.load(1);
  plain.files.erase("zero_rank00000_of00001.pt");
  message = scaletrain::testing::error_message([&] { load_sharded(plain, small_adamw); });
  EXPECT_NE(message.find("holds no ZeroAdamW shards"), std::string::npos) << message;
}

}  // namespace
}  // namespace scaletrain::train
