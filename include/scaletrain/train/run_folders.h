#pragma once
// Before the first step of a run: creates the run folder (train.out_dir) and the checkpoint
// folder, and checks that every file and checkpoint the run will write can be written there. A
// folder that is a file, lies under one or refuses writes, or a checkpoint name (step_N) or output
// file name taken by something else, then fails at once with one line naming the key and the path,
// instead of at the first save after the steps before it were spent (and again at every
// `--resume auto`).
#include <cstdint>

#include "scaletrain/train/config.h"

namespace scaletrain::train {

// `first_step`: the step the run starts from (0, or the resumed checkpoint's). Throws ConfigError.
void prepare_run_folders(const RunConfig& config, int64_t first_step = 0);

}  // namespace scaletrain::train
