#pragma once
// What a checkpoint of a training run holds, and how it is written and restored. The files of one
// checkpoint (stored by CheckpointStore, see checkpoint.h):
//
//   model.pt      parameters and buffers (save_model's archive)
//   optimizer.pt  the torch optimizer archive: param groups with their options, per-parameter
//                 step counts and moments
//   trainer.json  progress (step, micro-step, accumulation, batch size, data position, tokens,
//                 the open logging interval), the CPU and CUDA RNG states, and one JSON object
//                 per extra component under "components"
//   tensors.pt    named tensors of the extra components, "<component>/<tensor>" (only when some
//                 component registered tensors)
//   config.yaml   the resolved configuration of the run
//
// Extra parts of the state (the loss scaler, fp32 master weights) register with one line each,
// before restore() and the first save:
//
//   state.add_json("loss_scaler", [&] { return scaler_to_json(scaler); },
//                  [&](const std::string& json) { scaler_from_json(scaler, json); });
//   state.add_tensors("master_weights", [&] { return master.named_tensors(); });
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include "scaletrain/model/gpt.h"
#include "scaletrain/train/checkpoint.h"
#include "scaletrain/train/config.h"

namespace scaletrain::train {

// Where a run stands at an optimizer-step boundary.
struct TrainProgress {
  int64_t step = 0;        // optimizer steps done: the next step to run
  int64_t micro_step = 0;  // micro-batches of `step` done; always 0 at a step boundary
  int64_t grad_accum_steps = 1;
  int64_t batch_size = 0;
  // Dataset batch index of the next micro-batch: step * grad_accum_steps + micro_step (the
  // datasets are stateless, so this is the whole data position).
  int64_t next_batch = 0;
  int64_t tokens = 0;  // non-padding input tokens trained on so far
  // The logging interval still open (steps since the last metric line), so that the first line
  // after a resume reports the same mean loss as an uninterrupted run.
  double interval_loss_sum = 0;
  int64_t interval_steps = 0;
  int64_t interval_tokens = 0;
  double last_loss = NAN;  // mean loss of the last metric line (NaN before the first)
};

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

class TrainState {
 public:
  // `optimizer` must outlive this object.
  TrainState(model::GPT model, torch::optim::Optimizer& optimizer);

  // A component saved as one JSON object (text) in trainer.json "components"."<name>"; `restore`
  // receives the same text back.
  void add_json(std::string name, std::function<std::string()> save, std::function<void(const std::string&)> restore);
  // A component made of named tensors: `tensors` returns the live tensors; saving writes them to
  // tensors.pt, restoring copies the saved values into them (shapes and dtypes must match).
  void add_tensors(std::string name, std::function<NamedTensors()> tensors);

  // The checkpoint files of the current state at `progress` (RNG states as of now).
  std::vector<std::pair<std::string, std::string>> files(const TrainProgress& progress,
                                                         const std::string& config_yaml) const;
  // Puts model, optimizer, components and RNG states back as `checkpoint` holds them; returns its
  // progress. Throws IOError naming the checkpoint and file when something is missing or does not
  // fit this model.
  TrainProgress restore(const Checkpoint& checkpoint) const;

 private:
  struct JsonComponent {
    std::string name;
    std::function<std::string()> save;
    std::function<void(const std::string&)> restore;
  };
  struct TensorComponent {
    std::string name;
    std::function<NamedTensors()> tensors;
  };
  model::GPT model_;
  torch::optim::Optimizer* optimizer_;
  std::vector<JsonComponent> json_components_;
  std::vector<TensorComponent> tensor_components_;
};

// Throws ConfigError when `config` cannot continue the run of `checkpoint`: a key of model.*,
// data.*, train.batch_size, train.grad_accum_steps or train.seed differs ("checkpoint '...' was
// trained with model.n_layer=2, the config says 4"), or train.max_steps is below the checkpoint's
// step. Other keys (max_steps, optim.*, eval.*, train.log_every, checkpoint.*, ...) may change;
// the changes are logged.
void check_resumable(const Checkpoint& checkpoint, const RunConfig& config);

// The checkpoint to resume from for `scaletrain train --resume WHAT`:
//   "none"  nullopt;
//   "auto"  the newest valid checkpoint in config.checkpoint_dir(), skipping corrupt ones with a
//           warning; nullopt (and a log line) when there is none;
//   a path  exactly that checkpoint folder; IOError when it does not verify.
// Throws UsageError for "auto" without a checkpoint folder (checkpoint.dir and train.out_dir empty).
std::optional<Checkpoint> find_resume_checkpoint(const RunConfig& config, const std::string& what);

}  // namespace scaletrain::train
