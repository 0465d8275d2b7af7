#pragma once
// The dynamic loss scale's update rule, one definition for the host (LossScaler::update) and for
// the device (grad_check.cu's update kernel, which reads the overflow flag where the gradient
// pass wrote it). Torch-free and __host__ __device__.
//
// State, four doubles: the scale (always a float32 value, as torch.amp.GradScaler keeps it), the
// growth tracker, the hysteresis tracker and the skipped-step count.
#include <cstdint>

#if defined(__CUDACC__)
#define SCALETRAIN_HOST_DEVICE __host__ __device__
#else
#define SCALETRAIN_HOST_DEVICE
#endif

namespace scaletrain::amp {

struct ScaleRule {
  double growth_factor, backoff_factor, min_scale, max_scale;
  int64_t growth_interval, hysteresis;
  bool dynamic;
};

enum ScaleSlot { kScale = 0, kGrowthTracker = 1, kHysteresisTracker = 2, kSkippedSteps = 3, kScaleSlots = 4 };

// torch.amp.GradScaler stores the scale as float32 after multiplying it by a double factor.
SCALETRAIN_HOST_DEVICE inline double to_float32(double value) { return static_cast<double>(static_cast<float>(value)); }

// One step's update: back off after `hysteresis` overflows, grow after `growth_interval` finite
// steps, never below min_scale, above max_scale or to inf.
SCALETRAIN_HOST_DEVICE inline void update_scale(double* state, bool found_inf, const ScaleRule& r) {
  if (found_inf) state[kSkippedSteps] += 1;
  if (!r.dynamic) return;
  if (found_inf) {
    state[kGrowthTracker] = 0;
    state[kHysteresisTracker] -= 1;
    if (state[kHysteresisTracker] <= 0) {
      state[kHysteresisTracker] = 0;
      const double low = to_float32(r.min_scale), backed = to_float32(state[kScale] * r.backoff_factor);
      state[kScale] = low > backed ? low : backed;
    }
  } else {
    state[kGrowthTracker] += 1;
    if (state[kGrowthTracker] == static_cast<double>(r.growth_interval)) {
      state[kGrowthTracker] = 0;
      state[kHysteresisTracker] = static_cast<double>(r.hysteresis);
      const double grown = to_float32(state[kScale] * r.growth_factor), high = to_float32(r.max_scale);
      if (grown - grown == 0) state[kScale] = high < grown ? high : grown;  // finite: as GradScaler, never inf
    }
  }
}

}  // namespace scaletrain::amp
