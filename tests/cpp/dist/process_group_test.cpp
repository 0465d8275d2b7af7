// dist/: the bucket layout against hand-computed offsets, the environment rendezvous, and every
// collective on 1-4 Gloo ranks (separate processes) against values computed from all ranks' inputs.
#include <cstdlib>

#include <gtest/gtest.h>

#include "dist/ranks.h"
#include "test_util.h"
#include "scaletrain/dist/bucket_layout.h"
#include "scaletrain/dist/process_group.h"

namespace scaletrain::dist {
namespace {

using scaletrain::testing::outputs;
using scaletrain::testing::run_ranks;

TEST(BucketLayout, GroupByGroupBackToFrontAlignedAndPaddedToEqualChunks) {
  // Parameters 0..3 (groups 0, 0, 1, 1): group 0 first, back to front, then group 1.
  auto layout = plan_buckets({10, 3, 5, 7}, {0, 0, 1, 1}, /*bucket_numel=*/16, /*world_size=*/2, /*align=*/4);
  ASSERT_EQ(layout.buckets.size(), 2u);
  // Bucket 0: parameter 1 at 0, parameter 0 at 4 (aligned), used 14, padded to 16 (2 x 4 x 2).
  EXPECT_EQ(layout.buckets[0].params, (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(layout.param_offset[1], 0);
  EXPECT_EQ(layout.param_offset[0], 4);
  EXPECT_EQ(layout.buckets[0].used, 14);
  EXPECT_EQ(layout.buckets[0].numel, 16);
  EXPECT_EQ(layout.buckets[0].group, 0);
  // Bucket 1 (group 1): parameter 3 at 16, parameter 2 at 24 (23 aligned up), used 13, numel 16.
  EXPECT_EQ(layout.buckets[1].params, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(layout.param_offset[3], 16);
  EXPECT_EQ(layout.param_offset[2], 24);
  EXPECT_EQ(layout.buckets[1].used, 13);
  EXPECT_EQ(layout.buckets[1].numel, 16);
  EXPECT_EQ(layout.buckets[1].group, 1);
  EXPECT_EQ(layout.total_numel, 32);
  EXPECT_EQ(layout.shard_numel(), 16);
  EXPECT_EQ(layout.buckets[1].chunk_offset(1, 2), 24);
  EXPECT_EQ(layout.param_bucket, (std::vector<int64_t>{0, 0, 1, 1}));
}

TEST(BucketLayout, ParameterLargerThanABucketGetsItsOwn) {
  auto layout = plan_buckets({100, 3}, {0, 0}, 10, 3, 1);
  ASSERT_EQ(layout.buckets.size(), 2u);
  EXPECT_EQ(layout.buckets[0].params, (std::vector<int64_t>{1}));
  EXPECT_EQ(layout.buckets[0].numel, 3);
  EXPECT_EQ(layout.buckets[1].numel, 102);  // 100 rounded up to a multiple of 3
}

TEST(BucketLayout, UnitsNeverShareABucket) {
  // Parameters 0..3 of one group in units 0, 0, 1, 1: one bucket would hold them all; units split it.
  auto layout = plan_buckets({2, 2, 2, 2}, {0, 0, 0, 0}, 100, 1, 1, {0, 0, 1, 1});
  ASSERT_EQ(layout.buckets.size(), 2u);
  EXPECT_EQ(layout.buckets[0].params, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(layout.buckets[0].unit, 1);
  EXPECT_EQ(layout.buckets[1].params, (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(layout.buckets[1].unit, 0);
  EXPECT_EQ(plan_buckets({2, 2, 2, 2}, {0, 0, 0, 0}, 100, 1, 1).buckets.size(), 1u);
}

TEST(BucketLayout, RejectsBadArguments) {
  EXPECT_THROW(plan_buckets({1, 2}, {0, 0}, 10, 1, 1, {0}), std::invalid_argument);
  EXPECT_THROW(plan_buckets({1, 2}, {0, 0}, 10, 1, 1, {0, -1}), std::invalid_argument);
  EXPECT_THROW(plan_buckets({1, 0}, {0, 0}, 10, 1, 1), std::invalid_argument);
  EXPECT_THROW(plan_buckets({1, 2}, {1, 0}, 10, 1, 1), std::invalid_argument);
  EXPECT_THROW(plan_buckets({1}, {0}, 10, 0, 1), std::invalid_argument);
  EXPECT_THROW(plan_buckets({1}, {0, 0}, 10, 1, 1), std::invalid_argument);
}

class EnvGuard {
 public:
  EnvGuard() {
    for (const char* name : kNames) ::unsetenv(name);
  }
  ~EnvGuard() {
    for (const char* name : kNames) ::unsetenv(name);
  }
  static constexpr const char* kNames[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                           "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                                           "TORCHELASTIC_USE_AGENT_STORE"};
};

TEST(EnvRendezvous, ReadsTorchrunSlurmOrNothing) {
  EnvGuard guard;
  EXPECT_EQ(read_env_rendezvous().source, "none");
  EXPECT_EQ(ProcessGroup::from_env().size(), 1);
  ::setenv("SLURM_PROCID", "2", 1);
  ::setenv("SLURM_NTASKS", "4", 1);
  ::setenv("SLURM_LOCALID", "0", 1);
  ::setenv("MASTER_ADDR", "node1", 1);
  ::setenv("MASTER_PORT", "29500", 1);
  auto slurm = read_env_rendezvous();
  EXPECT_EQ(slurm.source, "slurm");
  EXPECT_EQ(slurm.rank, 2);
  EXPECT_EQ(slurm.world_size, 4);
  EXPECT_EQ(slurm.master_port, 29500);
  ::setenv("RANK", "1", 1);
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("LOCAL_RANK", "1", 1);
  ::setenv("TORCHELASTIC_USE_AGENT_STORE", "True", 1);
  auto torchrun = read_env_rendezvous();
  EXPECT_EQ(torchrun.source, "torchrun");
  EXPECT_EQ(torchrun.rank, 1);
  EXPECT_EQ(torchrun.local_rank, 1);
  EXPECT_TRUE(torchrun.agent_store);
}

TEST(EnvRendezvous, NamesTheBadVariable) {
  EnvGuard guard;
  auto message_of = [] { return scaletrain::testing::error_message([] { read_env_rendezvous(); }); };
  ::setenv("RANK", "0", 1);
  EXPECT_NE(message_of().find("WORLD_SIZE is not set"), std::string::npos) << message_of();
  ::setenv("WORLD_SIZE", "two", 1);
  EXPECT_NE(message_of().find("WORLD_SIZE: got 'two'"), std::string::npos) << message_of();
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("RANK", "2", 1);
  EXPECT_NE(message_of().find("RANK: got 2, expected less than WORLD_SIZE"), std::string::npos) << message_of();
  ::setenv("RANK", "1", 1);
  EXPECT_NE(message_of().find("MASTER_ADDR is not set"), std::string::npos) << message_of();
  ::setenv("MASTER_ADDR", "127.0.0.1", 1);
  ::setenv("MASTER_PORT", "70000", 1);
  EXPECT_NE(message_of().find("MASTER_PORT: got 70000"), std::string::npos) << message_of();
}

TEST(ProcessGroup, OneProcessAloneCopiesOrDoesNothing) {
  ProcessGroup group;
  EXPECT_EQ(group.rank(), 0);
  EXPECT_EQ(group.size(), 1);
  at::Tensor t = at::arange(4, at::kFloat);
  group.all_reduce(t).wait();
  EXPECT_TRUE(at::equal(t, at::arange(4, at::kFloat)));
  at::Tensor out = at::zeros({4});
  group.reduce_scatter(out, t).wait();
  EXPECT_TRUE(at::equal(out, t));
  EXPECT_THROW(group.reduce_scatter(out, at::zeros({3})), DistError);
}

class Collectives : public ::testing::TestWithParam<int> {};

TEST_P(Collectives, MatchValuesComputedFromEveryRanksInput) {
  auto results = run_ranks(GetParam(), {"collectives"}, 120);
  for (const auto& result : results) ASSERT_EQ(result.exit_code, 0) << outputs(results);
}

INSTANTIATE_TEST_SUITE_P(Ranks, Collectives, ::testing::Values(1, 2, 3, 4));

TEST(Collectives, FallbacksThroughAllReduceMatchToo) {
  auto results = run_ranks(3, {"collectives", "fallback"}, 120);
  for (const auto& result : results) ASSERT_EQ(result.exit_code, 0) << outputs(results);
}

TEST(Collectives, AKilledRankMakesTheOthersFailWithAMessage) {
  auto results = run_ranks(3, {"die"}, 90);
  EXPECT_EQ(results[2].signal, SIGKILL) << outputs(results);
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_EQ(results[static_cast<size_t>(rank)].exit_code, 3) << outputs(results);  // a DistError, not a hang
    EXPECT_NE(results[static_cast<size_t>(rank)].output.find("failed on rank " + std::to_string(rank)), std::string::npos)
        << outputs(results);
    EXPECT_LT(results[static_cast<size_t>(rank)].seconds, 60) << outputs(results);
  }
}

}  // namespace
}  // namespace scaletrain::dist
