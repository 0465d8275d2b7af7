#pragma once
// Launchers of the fused gradient pass (grad_check.cu), free of torch headers so that the .cu
// file compiles quickly. Called by grad_check.cpp, which owns the checks and the workspace.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "scale_rule.h"

namespace scaletrain::amp::cuda {

enum class GradType { f32, f16, bf16 };

struct GradSpan {
  void* data;
  int64_t numel;
};

// Elements handled by one thread block.
constexpr int64_t kChunkElements = 32768;
inline int64_t chunks_of(int64_t numel) { return (numel + kChunkElements - 1) / kChunkElements; }

// 1 / loss scale: `value`, or *device when not null (read on the device: no host read).
struct InvScale {
  float value;
  const float* device;
};

// Workspace layout (floats): [0] found_inf, [1] norm, [2] factor, [3] unused, then one partial
// sum of squares per chunk. Element 0 must be zero before the first launch_check.
constexpr int64_t kWorkspaceHeader = 4;

// Pass 1 over `count` tensors of one dtype whose chunks start at partial index `first_chunk`:
// flags inf/NaN in g * inv_scale and writes each chunk's sum of squares; with `write`, stores
// g * inv_scale back.
cudaError_t launch_check(const GradSpan* spans, int64_t count, GradType type, InvScale inv_scale, bool write,
                         float* workspace, int64_t first_chunk, cudaStream_t stream);
// Sums the `chunks` partials into the norm and computes factor = inv_scale * clip_coef
// (clip_coef = 1 when max_norm <= 0).
cudaError_t launch_finalize(float* workspace, int64_t chunks, InvScale inv_scale, float max_norm, cudaStream_t stream);
// Pass 2: g *= factor, unless found_inf or factor == 1 (decided on the device).
cudaError_t launch_scale(const GradSpan* spans, int64_t count, GradType type, const float* workspace,
                         cudaStream_t stream);

// One dynamic-scale update (scale_rule.h) from the overflow flag *found_inf, on the device: the
// four-double state, and the float32 scale and 1 / scale the loss and the gradient pass read.
cudaError_t launch_update_scale(double* state, float* scale, float* inv_scale, const float* found_inf,
                                const ScaleRule& rule, cudaStream_t stream);

}  // namespace scaletrain::amp::cuda
