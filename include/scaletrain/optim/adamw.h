#pragma once
// Fused AdamW: a torch::optim::Optimizer with torch.optim.AdamW's arithmetic that updates every
// parameter in one pass over its memory.
//
// On CUDA one multi-tensor launch per param group (and per 48 parameters) reads each element's
// fp32 value, gradient and both moments once and writes the value, the moments and, when the
// model keeps a bf16/fp16 copy of its weights, the rounded copy, in the same pass. The
// mixed-precision step stays on the device: the gradient pass's unscale x clip factor and its
// found-inf flag are read from device memory (StepScale), so a skipped step needs no host read,
// and step counts live on the device. On the CPU the same arithmetic runs on ATen's thread pool.
//
//   optim::AdamW adamw(groups, torch::optim::AdamWOptions(6e-4).betas({0.9, 0.95}));
//   auto check = amp::gradient_factor(grads, 1.0 / scale, /*max_norm=*/1.0);  // no gradient write
//   adamw.step(optim::StepScale{check.factor, check.found_inf_flag()});      // no host sync
//
// Options are torch::optim::AdamWOptions (lr, betas, eps, weight_decay per param group; amsgrad
// is not supported and is refused). Parameters must be fp32 and contiguous; gradients fp32,
// bf16 or fp16. Checkpoints (save/load) hold each parameter's step count, exp_avg and exp_avg_sq.
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>

namespace scaletrain::optim {

// Per-parameter state. `step` is a 0-dim float32 tensor on the parameter's device, counted there
// (as torch.optim.AdamW(fused=True) keeps it), so that a step skipped on the device leaves it.
struct AdamWParamState : public torch::optim::OptimizerCloneableParamState<AdamWParamState> {
  TORCH_ARG(at::Tensor, step);
  TORCH_ARG(at::Tensor, exp_avg);
  TORCH_ARG(at::Tensor, exp_avg_sq);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

// What a step reads from device memory instead of the host. Either may be undefined.
struct StepScale {
  at::Tensor factor = {};     // one float32 element: every gradient is multiplied by it (unscale x clip)
  at::Tensor found_inf = {};  // one float32 element: nonzero skips the step (nothing changes, counts included)
  // float64, one element per param group (or one for all groups): the learning rate, read on the
  // device in place of each group's lr option, so that a step captured in a CUDA graph follows
  // a schedule (the trainer fills it before each replay). The arithmetic is the option's. Checked
  // (finite, >= 0) on the CPU only: on CUDA the kernel reads it as it is.
  at::Tensor lr = {};
};

// The fused step without an optimizer object (what AdamW::step calls per param group, and what a
// Python torch.optim.Optimizer or a benchmark calls with its own state): one step of `params`
// (fp32, contiguous, one device) with `grads` (fp32/bf16/fp16), moments `exp_avgs` and
// `exp_avg_sqs` (fp32, the parameters' shapes), step counts `steps` (one-element float32 tensors,
// incremented) and `copies` (empty, or one bf16/fp16/fp32 tensor per parameter, written; an
// undefined entry: none). Throws std::invalid_argument naming the offending list and index.
void adamw_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& copies,
                 const torch::optim::AdamWOptions& options, const StepScale& scale = {});

class AdamW : public torch::optim::Optimizer {
 public:
  // Throws std::invalid_argument naming a bad option (lr, betas, eps, weight_decay, amsgrad).
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                 torch::optim::AdamWOptions defaults = {});
  explicit AdamW(std::vector<at::Tensor> params, torch::optim::AdamWOptions defaults = {});

  // One step of every parameter that has a gradient.
  at::Tensor step(LossClosure closure = nullptr) override;
  // One step with each gradient multiplied by scale.factor, skipped on the device when
  // scale.found_inf is nonzero. The host never reads either.
  void step(const StepScale& scale);

  // Low-precision copies of the parameters (the model's bf16/fp16 weights), one per parameter in
  // param-group order, same shapes: each step rounds the updated fp32 values into them in the same
  // pass. A parameter without a gradient takes its copy's gradient (bf16/fp16) when the copy has
  // one, so the model's gradients need no fp32 copy. Throws std::invalid_argument naming a
  // mismatched copy. An empty vector removes the copies.
  void set_model_copies(std::vector<at::Tensor> copies);
  const std::vector<at::Tensor>& model_copies() const { return copies_; }

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  std::vector<at::Tensor> copies_;
};

}  // namespace scaletrain::optim
