#pragma once
// ZeroAdamW: AdamW with its state sharded over the ranks of a process group (ZeRO stages 1 and 2),
// a torch::optim::Optimizer (param groups, LR schedulers).
//
// The parameters become views into one flat buffer laid out in buckets (dist/bucket_layout.h);
// rank r owns chunk r of every bucket and keeps AdamW's fp32 state (exp_avg, exp_avg_sq, and an
// fp32 master copy when the model is bf16/fp16) for its chunks only.
//   stage 1: the gradients are views into a flat gradient buffer of the model's size; each bucket
//            is reduce-scattered as soon as backward has produced its last gradient.
//   stage 2: each gradient is copied into its bucket's buffer when backward produces it and freed;
//            the bucket is reduce-scattered when complete and its buffer released, so a rank holds
//            gradients for its chunks plus the buckets in flight instead of the whole model's.
// Buckets are reduced in one order on every rank whatever order backward produces them in. A step
// then takes the global gradient norm (one all-reduce of a number), skips the step on every rank
// when it is not finite (a loss-scaled inf on any rank), clips, runs the fused AdamW on this rank's
// chunks and all-gathers the updated parameters bucket by bucket.
//
//   auto group = dist::ProcessGroup::from_env();
//   optim::ZeroAdamW adamw(model->parameters(), optim::ZeroAdamWOptions(6e-4).stage(2).max_grad_norm(1.0), group);
//   for (int micro = 0; micro < k; ++micro) {
//     adamw.set_gradient_sync(micro + 1 == k);   // reduce on the last micro-step only
//     (loss_of(micro) / k).backward();
//   }
//   adamw.step();
//   adamw.zero_grad();
//
// cpu_offload (stages 1 and 2) keeps AdamW's state of this rank's chunks (fp32 master, exp_avg,
// exp_avg_sq) in host memory, pinned for a CUDA model, so the device holds the model's parameters
// and the gradients in flight only (about 2 bytes per parameter for a bf16 model at stage 2). As
// each bucket is reduced during backward, a worker thread copies this rank's chunk to the host on
// a side stream and sums its squares; step() then runs the CPU AdamW (optim/adamw_cpu) bucket by
// bucket on that thread, from the model's first parameters, while the previous bucket's values
// are copied back and all-gathered. The step is exact (the clip factor needs the whole norm
// first), so the CPU step cannot overlap backward; with overlap_forward it overlaps the next
// forward instead.
//
// Stage 3 also shards the parameters: a rank keeps only its chunks of the values, and a unit of
// parameters (a transformer block: `units` at construction) is all-gathered before a forward or
// backward that uses it and freed after. The parameters stay views of a per-bucket tensor whose
// storage comes and goes, so modules and autograd's saved tensors need no change; the model's
// code brackets each unit's forward:
//
//   optim::ZeroAdamW adamw(groups, optim::ZeroAdamWOptions(6e-4).stage(3), group, unit_of_each_param);
//   x = adamw.run_unit(u, [&] { return block_u->forward(x); });   // gather, forward, free, and
//                                                                  // backward gathers it again
//
// Gathering unit u also starts unit u + 1's all-gather (u - 1's in backward), so communication
// overlaps compute. A unit gathered for backward is freed once all its gradients have arrived.
// Outside run_unit the parameters have no storage: gather_parameters() / release_parameters()
// bracket code that reads or writes the whole model (saving, evaluation without units); writes
// made in between are kept. Gradients are handled as at stage 2. Every rank must use the same
// parameters in each backward (a parameter without a gradient on one rank only would leave the
// ranks' gathered units, and so their collectives, apart). Destroying the optimizer leaves the
// parameters that are not gathered without storage: gather_parameters() first to keep the model.
//
// With one process (a default ProcessGroup) it is AdamW over flat buffers. Checkpoints hold the
// whole state gathered from every rank (gather_state), loadable on another world size, stage or
// offload.
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/optim/optimizer.h>

#include "scaletrain/dist/bucket_layout.h"
#include "scaletrain/dist/process_group.h"

namespace scaletrain::optim {

// Per param group: lr, betas, eps, weight_decay (as torch::optim::AdamWOptions). The rest applies
// to the whole optimizer and is read from the defaults given to the constructor.
struct ZeroAdamWOptions : public torch::optim::OptimizerCloneableOptions<ZeroAdamWOptions> {
  ZeroAdamWOptions(double lr = 1e-3);  // NOLINT(google-explicit-constructor): as AdamWOptions
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 1e-2;
  // 1: shard optimizer state; 2: also gradients; 3: also parameters.
  TORCH_ARG(int64_t, stage) = 1;
  // Keep the optimizer state in host memory and step it on the CPU (see above).
  TORCH_ARG(bool, cpu_offload) = false;
  // cpu_offload: the share of this rank's optimizer state that moves to the host, in (0, 1]. The
  // rest, the buckets the next forward needs first (rounded up to whole buckets), stays on the
  // device and is stepped there, so that the forward can start while the CPU steps the others.
  TORCH_ARG(double, offload_fraction) = 1.0;
  // cpu_offload: step() returns once the norm is known and the CPU steps the buckets behind it,
  // from the model's first parameters; the caller waits for a parameter's bucket before the
  // forward that uses it (wait_parameter; Python's ZeroAdamW does it in a forward pre-hook), so
  // the CPU step overlaps the next forward. Parameters read or written before then race with the
  // copies back: synchronize() first. With more than one rank the worker thread all-gathers on
  // the group meanwhile: give the optimizer a group no one else uses until then (Python's
  // ZeroAdamW makes its own). Every other call of the optimizer waits for the step itself.
  TORCH_ARG(bool, overlap_forward) = false;
  // Gradient bucket size in MiB (of the model's dtype): the unit of reduce-scatter and all-gather.
  TORCH_ARG(double, bucket_mb) = 25.0;
  // Clip the global gradient norm to this (0: no clipping), as torch.nn.utils.clip_grad_norm_.
  TORCH_ARG(double, max_grad_norm) = 0.0;
  // Divide the summed gradients by the world size (DDP's mean), else keep the sum.
  TORCH_ARG(bool, average_gradients) = true;
  // Copy rank 0's parameters to every rank at construction (as DDP does).
  TORCH_ARG(bool, broadcast_parameters) = true;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

// What a step leaves on the device (no host read until asked): the found-inf flag (1: the step was
// skipped on every rank) and the global norm of the unscaled, averaged gradients before clipping.
struct ZeroStepResult {
  at::Tensor found_inf;  // one float32 element
  at::Tensor norm;       // one float32 element
};

// One parameter's AdamW state, whole (as torch.optim.AdamW holds it), on the CPU.
struct ZeroParamState {
  double step = 0;
  at::Tensor exp_avg;     // fp32, the parameter's shape
  at::Tensor exp_avg_sq;  // fp32
  at::Tensor master;      // fp32 values of a bf16/fp16 model; undefined for an fp32 model
};

// This rank's part of one parameter's state: elements [start, start + numel) of the flattened
// parameter (those in this rank's chunks), on the CPU.
struct ZeroParamSlice {
  int64_t param = 0;      // index in param-group order
  int64_t start = 0;
  double step = 0;
  at::Tensor exp_avg;     // fp32, 1-d
  at::Tensor exp_avg_sq;  // fp32
  at::Tensor master;      // fp32 values of a bf16/fp16 model; undefined for an fp32 model
};

// Bytes of the tensors a rank holds now, by kind (ZeRO's accounting).
struct ZeroMemory {
  int64_t parameter_bytes = 0;  // the model's parameters (the flat buffer; stage 3: this rank's chunks and units gathered)
  int64_t gradient_bytes = 0;   // gradient buffers: the flat one (stage 1), this rank's chunks, buckets in flight
  int64_t optimizer_bytes = 0;  // exp_avg, exp_avg_sq, fp32 master, step counts (0 with cpu_offload)
  // cpu_offload: host memory: the optimizer state above, this rank's gradient chunks and (bf16/fp16
  // model) the rounded values to copy back.
  int64_t host_bytes = 0;
};

class ZeroAdamW : public torch::optim::Optimizer {
 public:
  // Every parameter: one dtype (fp32, bf16, fp16), one device (CPU for a Gloo group, CUDA for an
  // NCCL one), contiguous, requires_grad. `units` (stage 3): per parameter in param-group order,
  // its unit, numbered in the order the forward uses them (empty: each parameter its own unit).
  // Throws std::invalid_argument naming a bad option or parameter; collectives that fail throw
  // dist::DistError.
  ZeroAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, ZeroAdamWOptions defaults = {},
            dist::ProcessGroup group = {}, std::vector<int64_t> units = {});
  ZeroAdamW(std::vector<at::Tensor> params, ZeroAdamWOptions defaults = {}, dist::ProcessGroup group = {},
            std::vector<int64_t> units = {});
  ~ZeroAdamW() override;
  ZeroAdamW(const ZeroAdamW&) = delete;
  ZeroAdamW& operator=(const ZeroAdamW&) = delete;

  // One step (reduces any bucket backward has not completed, e.g. of unused parameters).
  at::Tensor step(LossClosure closure = nullptr) override;
  // One step with the gradients multiplied by `inv_scale` (1 / loss scale: one float32 element on
  // the parameters' device, or undefined for 1) before averaging, the norm and clipping.
  ZeroStepResult step_scaled(const at::Tensor& inv_scale);

  // Stage 1 zeroes the flat gradient buffer (the gradients stay views of it, whatever
  // set_to_none says); stage 2 drops the gradients.
  void zero_grad(bool set_to_none = true);

  // Whether the next backward reduces gradients as they are produced (true by default). Set it
  // false for the micro-steps before the last one of an accumulated step: gradients add up
  // locally and are reduced once.
  void set_gradient_sync(bool sync);
  bool gradient_sync() const;

  // overlap_forward: waits for the step of parameter `index`'s bucket (host) and makes the current
  // CUDA stream wait for its values (the device); synchronize() does it for every parameter. Both
  // return at once when no step is pending.
  void wait_parameter(int64_t index);
  void synchronize();

  // Stage 3 (at stages 1-2 these do nothing: the parameters are always whole). Collectives: every
  // rank gathers and releases the same units in the same order.
  int64_t num_units() const;               // 0 below stage 3
  int64_t unit_of(int64_t index) const;    // parameter `index`'s unit (-1 below stage 3)
  // Makes unit `unit`'s parameters whole (waits) and starts the gather of `prefetch`, the unit the
  // forward needs next (default unit + 1; -1: none; none either inside backward, where activation
  // checkpointing recomputes). Counted: each call needs a release_unit(); the unit is freed when
  // none is left and no backward needs it.
  void gather_unit(int64_t unit, std::optional<int64_t> prefetch = std::nullopt);
  void release_unit(int64_t unit);
  // Backward gathers `unit` again when it reaches `output` (a hook on it), before the forward that
  // produced `output` is differentiated, and prefetches the unit backward needs next (default
  // unit - 1); the hold ends when the unit's last gradient arrives or the backward ends.
  // prepare_backward() is that hook's work, for callers that register hooks themselves (Python).
  void gather_for_backward(const at::Tensor& output, int64_t unit, std::optional<int64_t> prefetch = std::nullopt);
  void prepare_backward(int64_t unit, std::optional<int64_t> prefetch = std::nullopt);
  // gather_unit, forward(), release_unit, gather_for_backward on its output.
  at::Tensor run_unit(int64_t unit, const std::function<at::Tensor()>& forward,
                      std::optional<int64_t> prefetch = std::nullopt, std::optional<int64_t> backward_prefetch = std::nullopt);
  // Every unit whole / released; parameter writes made in between are kept.
  void gather_parameters();
  void release_parameters();

  const dist::BucketLayout& layout() const;
  const dist::ProcessGroup& process_group() const;
  ZeroMemory memory() const;

  // The whole state per parameter (param-group order), gathered from every rank's chunks: a
  // collective, call it on every rank; each receives all of it. It does not depend on the world
  // size, stage or buckets, so scatter_state() of another run takes it (resharding), and it is
  // torch.optim.AdamW's state (Python's state_dict() is this).
  std::vector<ZeroParamState> gather_state() const;
  // This rank's slices of the state (no collective): what a sharded checkpoint writes per rank
  // (train/zero_checkpoint.h). Slices of every rank together cover every parameter once.
  std::vector<ZeroParamSlice> local_state() const;
  // Takes this rank's chunks of `state` (one entry per parameter, shapes checked; std::invalid_argument
  // naming the parameter otherwise). A bf16/fp16 model also gets its parameters from the masters.
  void scatter_state(const std::vector<ZeroParamState>& state);

  // gather_state() / scatter_state() through an archive ("param_<i>/exp_avg", ...). Collectives.
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace scaletrain::optim
