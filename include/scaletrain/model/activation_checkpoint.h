#pragma once
// Activation checkpointing for LibTorch's C++ API, which has no torch::utils::checkpoint.
//
// checkpoint(function, input) returns function(input) but keeps only `input` for backward, not the
// activations inside `function`. Backward runs `function` again with grad enabled and
// backpropagates through the recomputed graph: parameters used inside `function` receive their
// gradients in `.grad` during that inner backward, the way PyTorch's reentrant
// `torch.utils.checkpoint(use_reentrant=True)` does. Memory drops to one saved tensor per
// checkpointed call; the cost is one more forward pass of `function` per backward.
//
// The recomputation sees the same random numbers and autocast state as the original call: the CPU
// generator (and the generator of the input's device, e.g. CUDA) are saved before the forward, set
// again for the recomputation and put back afterwards, so dropout masks match and the random stream
// after backward is the one an uncheckpointed run would have. Autocast (enabled flag and dtype, for
// the CPU and the input's device type) is re-entered as it was.
//
// Limits, as with PyTorch's reentrant checkpoint:
// - `function` must be deterministic given the RNG state and must not change state that its
//   recomputation would see differently (e.g. append to a KV cache).
// - Parameters reach backward only through the inner backward: torch::autograd::grad (or backward
//   with `inputs`) through a checkpoint is rejected with an error.
#include <functional>

#include <ATen/core/Tensor.h>

namespace scaletrain::model {

// A function of one tensor. Everything else it needs (modules, other tensors) is captured by value,
// because it is called again during backward, after the caller's frame is gone.
using CheckpointedFunction = std::function<at::Tensor(const at::Tensor& input)>;

// Returns function(input), recomputing function's activations in backward instead of storing them.
// With grad mode off this is function(input). Gradients flow to `input` when it requires grad, and
// to parameters used inside `function` even when `input` does not (the output then requires grad
// whatever `function` uses, and backward recomputes it even if nothing inside needs a gradient).
at::Tensor checkpoint(CheckpointedFunction function, const at::Tensor& input);

}  // namespace scaletrain::model
