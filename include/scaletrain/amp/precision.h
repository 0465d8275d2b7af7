#pragma once
// The precision policy of a training step: autocast for the forward, and fp32 master weights
// when the model's own parameters are kept in bf16/fp16.
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include "scaletrain/amp/amp_options.h"

namespace scaletrain::amp {

// Runs its scope under autocast to the precision's dtype on `device_type` (like `with
// torch.autocast(device_type, dtype)`); does nothing for fp32. Restores the previous state.
class AutocastGuard {
 public:
  AutocastGuard(Precision precision, c10::DeviceType device_type);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_;
  c10::DeviceType device_type_;
  bool was_enabled_ = false;
  c10::ScalarType previous_dtype_ = c10::ScalarType::Undefined;
};

// Whether autocast to `precision` is available on `device_type`; the reason when not.
bool autocast_supported(Precision precision, c10::DeviceType device_type, std::string* why = nullptr);
// Whether this CPU does fp16 arithmetic natively (x86 AVX512-FP16, or Arm).
bool cpu_has_native_fp16();
// Throws ConfigError (amp.precision) when `options` cannot run on `device_type`: autocast missing,
// or fp16 on a CPU without native fp16 unless amp.emulated_fp16.
void check_supported(const AmpOptions& options, c10::DeviceType device_type);

// fp32 copies of low-precision model parameters. The optimizer updates the copies (`master()`);
// gradients move from the model to the copies, and the updated values are rounded back into
// the model after each step.
//
//   MasterWeights master(model->parameters());
//   AdamW adamw(master.master());
//   ... backward per micro-batch, then master.accumulate_gradients() (fp32 accumulation) ...
//   adamw.step(); master.copy_to_model();
class MasterWeights {
 public:
  explicit MasterWeights(std::vector<at::Tensor> model_params);

  // fp32 leaf tensors, one per model parameter, in the same order.
  const std::vector<at::Tensor>& master() const { return master_; }
  const std::vector<at::Tensor>& model_params() const { return model_; }
  // Adds the model's gradients (where defined) into the fp32 gradients and releases the model's:
  // call after each micro-batch's backward for fp32 gradient accumulation, or once per step.
  void accumulate_gradients();
  // Rounds the fp32 values into the model's parameters.
  void copy_to_model();
  // Releases the fp32 gradients.
  void zero_grad();

 private:
  std::vector<at::Tensor> model_;
  std::vector<at::Tensor> master_;
};

}  // namespace scaletrain::amp
