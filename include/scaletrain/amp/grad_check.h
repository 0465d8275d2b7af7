#pragma once
// The gradient pass of a mixed-precision step, fused over all gradients at once: unscale (divide
// by the loss scale), detect inf/NaN, compute the global L2 norm of the unscaled gradients and
// clip them to a largest norm.
//
// On CUDA it is at most two multi-tensor launches over every gradient (grouped by dtype),
// whatever the number of tensors. With clipping: a read-only pass that checks for inf/NaN and
// sums the squares of g * inv_scale per chunk, then a read-write pass that multiplies by
// inv_scale * clip_coef, where clip_coef = min(1, max_norm / (norm + 1e-6)) as in
// torch.nn.utils.clip_grad_norm_; the second pass is skipped on the device (no host sync) when an
// inf/NaN was found or the factor is 1. Without clipping, the one pass also writes g * inv_scale.
// torch's separate passes (_amp_foreach_non_finite_check_and_unscale_, then clip_grad_norm_'s
// norm and multiply) read the gradients three times and write them twice.
//
// On the CPU the same semantics run on ATen's thread pool.
#include <vector>

#include <ATen/core/Tensor.h>

namespace scaletrain::amp {

struct GradCheckResult {
  // Two-element float tensor on the gradients' device: {found_inf (0 or 1), norm}. Reading it
  // (found_inf(), norm()) synchronises with the device; the tensor itself does not.
  at::Tensor values;
  // One float element on the same device: inv_scale * clip_coef, what the gradients were (or,
  // after gradient_factor, are to be) multiplied by.
  at::Tensor factor;
  // values[0] as a one-element tensor (no sync): the found-inf flag a fused optimizer reads.
  at::Tensor found_inf_flag() const { return values.narrow(0, 0, 1); }
  bool found_inf() const;
  // L2 norm of the unscaled gradients before clipping; inf or NaN when found_inf().
  double norm() const;
};

// Unscales `grads` in place by `inv_scale` and, when `max_norm` > 0, clips their global norm to
// `max_norm` (0 or +inf: no clipping; NaN or negative is an error). All tensors must be on one
// device, floating point (fp32, bf16, fp16) and contiguous, and no two may share memory (the
// same tensor twice, or overlapping views, would be unscaled twice). When an inf/NaN is found
// the step is to be skipped and the gradients are unspecified (unchanged when clipping,
// multiplied by inv_scale otherwise, as torch's unscale_). Throws std::invalid_argument naming
// the offending gradient or argument.
GradCheckResult unscale_check_clip_(const std::vector<at::Tensor>& grads, double inv_scale, double max_norm);

// The same checks, norm and factor, without writing the gradients: one read-only pass. A fused
// optimizer (optim::AdamW::step(StepScale)) then multiplies each gradient by `factor` as it reads
// it and skips the step on the device when the flag is set, so the step needs no host read and
// the gradients are read twice and written never.
GradCheckResult gradient_factor(const std::vector<at::Tensor>& grads, double inv_scale, double max_norm);
// The same with 1 / loss scale read from a one-element float32 tensor on the gradients' device
// (LossScaler::inv_scale() of a scaler kept on the device): no host read, capturable in a CUDA graph.
GradCheckResult gradient_factor(const std::vector<at::Tensor>& grads, const at::Tensor& inv_scale, double max_norm);

// The gradients of `params` that are defined.
std::vector<at::Tensor> gradients_of(const std::vector<at::Tensor>& params);

}  // namespace scaletrain::amp
