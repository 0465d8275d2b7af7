#include "scaletrain/amp/precision.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/generated/variable_factories.h>

#include "scaletrain/core/error.h"

namespace scaletrain::amp {

AutocastGuard::AutocastGuard(Precision precision, c10::DeviceType device_type)
    : active_(precision != Precision::fp32), device_type_(device_type) {
  if (!active_) return;
  was_enabled_ = at::autocast::is_autocast_enabled(device_type_);
  previous_dtype_ = at::autocast::get_autocast_dtype(device_type_);
  at::autocast::set_autocast_enabled(device_type_, true);
  at::autocast::set_autocast_dtype(device_type_, compute_dtype(precision));
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  // As torch.autocast's __exit__: the cast cache lives until the outermost region ends.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type_, was_enabled_);
  at::autocast::set_autocast_dtype(device_type_, previous_dtype_);
}

bool autocast_supported(Precision precision, c10::DeviceType device_type, std::string* why) {
  if (precision == Precision::fp32) return true;
  if (device_type != c10::DeviceType::CPU && device_type != c10::DeviceType::CUDA) {
    if (why) *why = "autocast is only used on CPU and CUDA";
    return false;
  }
  if (!at::autocast::is_autocast_available(device_type)) {
    if (why) *why = "this torch build has no autocast for " + c10::DeviceTypeName(device_type, true);
    return false;
  }
  return true;
}

bool cpu_has_native_fp16() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512fp16");
#else
  return true;
#endif
}

void check_supported(const AmpOptions& options, c10::DeviceType device_type) {
  std::string why;
  if (!autocast_supported(options.precision(), device_type, &why))
    throw core::ConfigError("amp.precision", std::string("amp.precision: ") + core::enum_name(options.precision()) + " on " +
                                                 c10::DeviceTypeName(device_type, true) + ": " + why);
  if (options.precision() == Precision::fp16 && device_type == c10::DeviceType::CPU && !cpu_has_native_fp16() &&
      !options.emulated_fp16()) {
    throw core::ConfigError("amp.precision",
                            "amp.precision: fp16 on this CPU has no native fp16 arithmetic (no AVX512-FP16), so torch "
                            "emulates it about 10x slower than fp32; expected bf16 or fp32 here, fp16 on a GPU, or "
                            "amp.emulated_fp16=true to run it anyway");
  }
}

MasterWeights::MasterWeights(std::vector<at::Tensor> model_params) : model_(std::move(model_params)) {
  at::NoGradGuard no_grad;
  for (const auto& p : model_) master_.push_back(p.detach().to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).requires_grad_(true));
}

void MasterWeights::accumulate_gradients() {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < model_.size(); ++i) {
    auto& model_grad = model_[i].mutable_grad();
    if (!model_grad.defined()) continue;
    auto& master_grad = master_[i].mutable_grad();
    if (master_grad.defined()) master_grad.add_(model_grad);
    else master_grad = model_grad.to(at::kFloat, false, true);
    model_grad.reset();
  }
}

void MasterWeights::copy_to_model() {
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < model_.size(); ++i) model_[i].copy_(master_[i]);
}

void MasterWeights::zero_grad() {
  for (auto& m : master_) m.mutable_grad().reset();
}

}  // namespace scaletrain::amp
