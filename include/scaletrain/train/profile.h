#pragma once
// Kernel-level profile of a window of training steps, through the profiler LibTorch ships
// (Kineto/CUPTI, CUDA activity only, so the host is not slowed by per-op records):
//   scaletrain train --config ... --profile prof.json --profile-steps 10,20
// writes prof.json: the window's steps and wall time, and every CUDA kernel (also memcpy and
// memset) by name with its count and total device time. benchmarks/python/profile_gpt2_step.py
// groups the names by kind (GEMM, attention, elementwise, optimizer, ...) next to PyTorch's.
#include <chrono>
#include <cstdint>
#include <string>

namespace scaletrain::train {

struct ProfileWindow {
  int64_t first_step = 5;  // 0-based optimizer step at which recording starts
  int64_t steps = 10;      // steps recorded
  std::string path;        // JSON written at the end of the window; empty: no profiling
};

class StepProfiler {
 public:
  // Throws std::invalid_argument naming `--profile-steps` when first_step < 0 or steps < 1.
  explicit StepProfiler(ProfileWindow window);
  // Throws std::invalid_argument (naming --profile-steps or --profile) when the window does not lie
  // within steps [from_step, max_steps) of the run or the file's folder does not exist.
  void check(int64_t from_step, int64_t max_steps) const;
  // Call before and after each optimizer step. Recording starts before window.first_step (after
  // the device has finished the previous steps) and stops after its last step: the device is
  // synchronised, the JSON written (atomically) and the profiler released.
  void before_step(int64_t step);
  void after_step(int64_t step);
  bool active() const { return active_; }

 private:
  ProfileWindow window_;
  bool active_ = false;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace scaletrain::train
