#pragma once
// Starts scaletrain_dist_worker as `world` separate processes that meet over Gloo on loopback
// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set as torchrun sets them) and collects each rank's
// exit code and output.
#include <string>
#include <vector>

namespace scaletrain::testing {

struct RankResult {
  int exit_code = -1;    // -1: killed by a signal, -2: still running at the deadline (then killed)
  int signal = 0;        // the signal that ended it, if any
  std::string output;    // stdout and stderr
  double seconds = 0;    // until it ended
};

// Runs the worker with `args` on `world` ranks; waits at most `timeout_s` seconds in all.
std::vector<RankResult> run_ranks(int world, const std::vector<std::string>& args, double timeout_s = 300);

// All of the ranks' outputs, each line prefixed by its rank (for failure messages).
std::string outputs(const std::vector<RankResult>& results);

}  // namespace scaletrain::testing
