#pragma once
// The memory a run's model states take, known from the configuration before anything is
// allocated: parameters, gradients, AdamW moments and fp32 master copies. The trainer checks it
// against the device's memory first, so a model that cannot fit fails in a second with one line
// instead of an allocator's message after the dataset is built.
#include <cstdint>
#include <string>

#include <c10/core/Device.h>

#include "scaletrain/amp/amp_options.h"
#include "scaletrain/model/gpt_options.h"

namespace scaletrain::plan {

// Bytes of each kind of model state; doubles, so that absurd configurations do not overflow.
struct ModelStateBytes {
  double parameters = 0;  // the model's parameter count (not bytes)
  double weights = 0;     // the model's parameters, in their dtype
  double gradients = 0;   // their gradients, plus fp32 master gradients with low_precision_params
  double master = 0;      // fp32 master weights (low_precision_params only)
  double optimizer = 0;   // AdamW's two fp32 moments per trainable parameter
  double buffers = 0;     // rotary tables
  double host = 0;        // ZeRO's CPU offload: the state of the offloaded share, in host memory
  // On the device (host excluded).
  double total() const { return weights + gradients + master + optimizer + buffers; }
};

// How ZeroAdamW holds the states of one of `world` ranks (optim.zero_stage; stage 0: plain AdamW).
struct ZeroPlan {
  int64_t stage = 0;
  int64_t world = 1;
  bool cpu_offload = false;
  double offload_fraction = 1.0;  // with cpu_offload: the share of the state on the host
};

// Parameter count of model::GPT built with `options` (exact: tests compare it with the model's).
double gpt_parameter_count(const model::GPTOptions& options);

// Model-state bytes of training a GPT with these options (activations, ZeRO's buckets in flight
// and its gathered stage-3 units not included), per rank with ZeRO: stage 1 divides AdamW's state
// (and the fp32 master) by the world size, stage 2 also the gradients, stage 3 also the weights;
// cpu_offload moves the share offload_fraction of the state to the host, with a gradient chunk and
// a copy-back buffer: 16 bytes per parameter of that share.
ModelStateBytes model_state_bytes(const model::GPTOptions& model, const amp::AmpOptions& amp,
                                  const ZeroPlan& zero = {});

// Total memory of `device` in bytes: the GPU's, or the host's RAM (capped by a cgroup limit).
// 0 when unknown.
double device_memory_bytes(const c10::Device& device);

// Throws ConfigError naming the model keys, the estimate and the device's memory when the model
// states alone exceed the device's memory, or the offloaded state (or the fp32 model built on the
// host) the host's.
void check_model_fits(const model::GPTOptions& model, const amp::AmpOptions& amp, const c10::Device& device,
                      const ZeroPlan& zero = {});

// "1.50 GiB", "128.0 TiB"
std::string format_bytes(double bytes);

}  // namespace scaletrain::plan
