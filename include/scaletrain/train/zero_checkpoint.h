#pragma once
// Sharded checkpoints of ZeroAdamW: each rank writes its own part of the optimizer state (its
// slices of every parameter's exp_avg, exp_avg_sq and fp32 master) into one checkpoint folder of a
// CheckpointStore, and rank 0 adds the caller's files (the model's weights, the training state)
// and the manifest with every file's size and CRC-32. The folder appears whole or not at all: a
// rank killed during the save leaves the previous checkpoint the newest valid one.
//
//   <dir>/step_00000040/
//     zero_rank00000_of00004.pt ... zero_rank00003_of00004.pt   one per rank
//     model.pt ...                                                  the caller's files (rank 0)
//     manifest.json
//
// Loading reads every shard (any world size, stage, bucket size or offload setting: the slices
// are per parameter, not per bucket) and gives each rank its chunks: resharding. Every rank holds
// the whole state on the host while it loads.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "scaletrain/optim/zero_adamw.h"
#include "scaletrain/train/checkpoint.h"

namespace scaletrain::train {

// Called on each rank once its shard is on disk, before the ranks agree on the manifest (tests
// kill a rank there).
using AfterShardWritten = std::function<void()>;

// A collective: every rank of adamw's group calls it with the same step; rank 0's `files` go into
// the checkpoint (the other ranks' are ignored). Returns the checkpoint's folder once it exists.
// Throws IOError when a write fails, dist::DistError when a rank fails.
std::string save_sharded(const CheckpointStore& store, int64_t step, const optim::ZeroAdamW& adamw,
                         const std::vector<std::pair<std::string, std::string>>& files,
                         const AfterShardWritten& after_shard_written = {});

// Whether `name` is a ZeroAdamW shard's file name ("zero_rank00002_of00004.pt").
bool is_shard_file(const std::string& name);
// Whether `checkpoint` holds ZeroAdamW shards.
bool has_shards(const Checkpoint& checkpoint);

// Every rank: takes its chunks of the state in `checkpoint` (read and verified by the store).
// Throws IOError naming the checkpoint when a shard is missing, malformed, or the shards do not
// cover every parameter exactly once (a checkpoint of another model).
void load_sharded(const Checkpoint& checkpoint, optim::ZeroAdamW& adamw);

}  // namespace scaletrain::train
