#pragma once
// The Trainer composes the areas for one run: dataset (data/), GPT (model/), gradient
// accumulation (accum/), AdamW (or ZeroAdamW over the ranks of a torchrun launch, optim.zero_stage)
// with warmup + cosine schedule and gradient clipping, periodic
// evaluation, metrics, checkpoints (checkpoint.h, train_state.h), and the files of a run folder
// (config.yaml, metrics.jsonl, summary.json, model.pt). It holds no technique logic.
#include <memory>
#include <optional>
#include <string>

#include <c10/core/Device.h>
#include <torch/optim/adamw.h>

#include "scaletrain/accum/gradient_accumulation.h"
#include "scaletrain/amp/loss_scaler.h"
#include "scaletrain/amp/precision.h"
#include "scaletrain/data/dataset.h"
#include "scaletrain/dist/process_group.h"
#include "scaletrain/model/gpt.h"
#include "scaletrain/train/checkpoint.h"
#include "scaletrain/train/config.h"
#include "scaletrain/train/eval.h"
#include "scaletrain/train/profile.h"
#include "scaletrain/train/progress.h"
#include "scaletrain/train/step_graph.h"

namespace scaletrain::optim {
class ZeroAdamW;
}  // namespace scaletrain::optim

namespace scaletrain::train {

class TrainState;
struct TrainProgress;

struct TrainSummary {
  int64_t steps = 0;
  int64_t parameters = 0;
  int64_t tokens = 0;  // non-padding input tokens processed
  double seconds = 0;  // training loop only
  double tokens_per_second = 0;
  double final_loss = NAN;  // mean training loss of the last logging interval
  std::string device;
  std::string precision;
  int64_t skipped_steps = 0;     // optimizer steps skipped for inf/NaN gradients
  double loss_scale = NAN;       // at the end (NaN without a loss scaler)
  int64_t peak_memory_bytes = 0;  // CUDA: most memory allocated at once; 0 on the CPU
  bool cuda_graph = false;        // the steps after the warm-up were replays of one CUDA graph
  std::optional<EvalResult> before;
  EvalResult after;
};

// "cpu" or "cuda"; throws ConfigError (train.device) when CUDA is asked for but absent.
c10::Device resolve_device(DeviceChoice choice);
// Whether optim.fused picks scaletrain's fused AdamW on `device` (on; or auto and CUDA).
bool uses_fused_adamw(FusedChoice choice, const c10::Device& device);

class Trainer {
 public:
  // Builds dataset and model (seeded by train.seed) on the chosen device. Throws ConfigError,
  // DataError.
  explicit Trainer(RunConfig config);
  // Trains train.max_steps steps, evaluates, writes the run folder and returns the summary. Saves
  // a checkpoint every checkpoint.every steps. With `resume` (see find_resume_checkpoint), first
  // restores the model, optimizer, RNG and progress it holds and continues from its step, without
  // the before-training evaluation, appending to metrics.jsonl; throws ConfigError when the
  // configuration cannot continue that run (check_resumable) and IOError when it does not fit.
  TrainSummary fit(const std::optional<Checkpoint>& resume = std::nullopt);
  // Validation loss, plus generation metrics when `generate`.
  EvalResult evaluate(bool generate);
  // Profiles a window of the next fit()'s steps (see profile.h). Throws std::invalid_argument.
  void profile(ProfileWindow window) { profiler_.emplace(std::move(window)); }

  // Why this run's step cannot be captured in a CUDA graph (train.cuda_graph), "" when it can.
  std::string cuda_graph_blocker() const;

  model::GPT& model() { return model_; }
  const data::Dataset& dataset() const { return *dataset_; }
  const c10::Device& device() const { return device_; }
  const RunConfig& config() const { return config_; }

 private:
  void report(const std::string& line);
  // Writes the checkpoint of `progress` and prunes older ones; returns the seconds it took.
  double save_checkpoint(const TrainState& state, const TrainProgress& progress);
  // Forward and backward over the micro-batches of optimizer step `step`; returns the step's
  // mean token loss (detached) and adds the step's non-padding input tokens to `tokens`.
  at::Tensor accumulate_gradients(int64_t step, accum::GradientAccumulator& accumulator, int64_t& tokens);
  // The dataset's micro-batches of optimizer step `step` (this rank's); adds their non-padding
  // input tokens to `tokens`.
  std::vector<data::Batch> step_batches(int64_t step, int64_t micro_steps, int64_t& tokens) const;
  // Forward and backward over a step's micro-batches already on the device (the accumulator's
  // begin_step done when there are several); returns the step's mean token loss (detached).
  at::Tensor micro_steps(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& targets,
                         const accum::GradientAccumulator& accumulator);
  // Forward and backward of one micro-batch already on the device, with its mean token loss.
  at::Tensor forward_backward(const at::Tensor& inputs, const at::Tensor& targets);
  // Step `step` through `graph`: its micro-batches copied into the tensors the capture reads, the
  // learning rate into device memory; eager for the first kGraphWarmupSteps steps of the run
  // (`done` counts them), then captured once (all micro-batches and the optimizer step) and
  // replayed. Returns the loss (device) and sets `grad_norm` and adds the batches' tokens to `tokens`.
  at::Tensor graphed_step(int64_t step, int64_t done, double lr, StepGraph& graph, torch::optim::Optimizer& optimizer,
                          accum::GradientAccumulator& accumulator, int64_t& tokens, at::Tensor& grad_norm);
  // Backward of one micro-batch's loss: scaled when there is a loss scaler, then gradients moved
  // into fp32 master gradients when accumulating in fp32.
  void backward(const at::Tensor& loss);
  // The parameters the optimizer updates: the fp32 master copies, or the model's own.
  std::vector<at::Tensor> trainable_parameters();
  // Sets the optimizer's gradients and, with master weights, the model's to none.
  void clear_gradients(torch::optim::Optimizer& optimizer);
  // Clipping and the optimizer step, through the loss scaler's fused pass under mixed precision.
  // Returns the gradient norm before clipping as a tensor on the device (undefined when clipping
  // is off in fp32): the fused path neither reads it nor the skip decision on the host.
  at::Tensor clip_and_step(torch::optim::Optimizer& optimizer);
  // AdamW per optim.fused: scaletrain's fused one (writing the model's low-precision copy in its
  // pass when there are master weights) or LibTorch's.
  std::unique_ptr<torch::optim::Optimizer> make_optimizer();
  // Steps skipped for inf/NaN gradients: those counted on the host plus those counted on the
  // device by the fused path (reads the device counter).
  int64_t skipped_steps() const;
  // A log interval's loss sum and tokens: as given with one rank; with several, the mean of the
  // ranks' sums and the sum of their tokens (one all-reduce).
  std::pair<double, int64_t> across_ranks(double loss_sum, int64_t tokens) const;
  // The mixed-precision part of a checkpoint: skipped steps and the loss scaler's state (JSON).
  std::string amp_state_json() const;
  void restore_amp_state(const std::string& json);
  RunConfig config_;
  c10::Device device_;
  std::unique_ptr<data::Dataset> dataset_;
  model::GPT model_{nullptr};
  std::optional<amp::LossScaler> scaler_;
  std::unique_ptr<amp::MasterWeights> master_;  // with amp.low_precision_params
  int64_t skipped_steps_ = 0;
  at::Tensor skipped_on_device_;  // float count on the device (fused path), added to skipped_steps_
  bool fused_ = false;            // the optimizer is optim::AdamW
  // The ranks of a torchrun/Slurm launch (one process: a group of one) and, with optim.zero_stage,
  // the ZeroAdamW that fit() made.
  dist::ProcessGroup group_;
  optim::ZeroAdamW* zero_ = nullptr;
  // CUDA-graph steps: what the capture reads (batch, learning rate) and what it leaves (loss, norm).
  at::Tensor lr_on_device_, graph_inputs_, graph_targets_, graph_loss_, graph_norm_;
  ProgressBar* progress_ = nullptr;  // set while fit() runs
  std::optional<StepProfiler> profiler_;
};

// Writes the model's parameters and buffers atomically; throws IOError.
void save_model(model::GPT& model, const std::string& path);
// Loads parameters saved by save_model into a model built with the same options; throws IOError
// naming the file when it is missing, corrupt or of another shape.
void load_model(model::GPT& model, const std::string& path);
// The bytes save_model writes (one flat torch archive: "blocks.0.attn.qkv.weight" -> tensor).
std::string model_archive(model::GPT& model);
// load_model on bytes; `origin` names them in errors ("'runs/x/model.pt'").
void load_model_archive(model::GPT& model, const std::string& bytes, const std::string& origin);

// The end-of-run table printed by the CLI.
std::string format_summary(const TrainSummary& summary);
// summary.json contents.
std::string summary_json(const TrainSummary& summary);
// One line per evaluation ("loss 0.1234 | exact match 61.5% | BLEU-4 ...").
std::string format_eval(const EvalResult& result);

}  // namespace scaletrain::train
