#pragma once
// Launchers of the fused residual-add + LayerNorm kernels (layer_norm.cu), free of torch headers.
// Called by layer_norm.cpp, which owns the checks, allocation and autograd.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "core/kernel_dtype.h"

namespace scaletrain::model::cuda {

using core::DType;

// The widest row the kernels take (one warp per row, the row in registers) and the granule of
// its width (16-byte fp32 / 8-byte 16-bit loads).
constexpr int64_t kLayerNormMaxCols = 1024;
constexpr int64_t kLayerNormColStep = 4;

struct LayerNormShape {
  int64_t rows, cols;
  float eps;
};

// Every pointer is a dense (rows, cols) array, or (cols) for weight and bias.
struct LayerNormForwardArgs {
  const void* x;
  DType x_type;
  const void* residual;  // null: normalise x itself
  DType residual_type;
  const void* weight;
  const void* bias;  // may be null
  DType param_type;
  void* sum;  // x + residual in x's type (only with residual)
  void* out;
  DType out_type;
  float* mean;  // (rows)
  float* rstd;  // (rows)
};

struct LayerNormBackwardArgs {
  const void* grad_out;  // d out, out's type
  DType out_type;
  const void* grad_sum;  // d sum in x's type, or null: added to d x
  const void* input;     // what was normalised (sum, or x), x's type
  DType x_type;
  const float* mean;
  const float* rstd;
  const void* weight;
  DType param_type;
  void* grad_x;          // x's type
  void* grad_residual;   // residual's type, or null
  DType residual_type;
  float* partials;       // (2, layer_norm_backward_blocks(rows), cols) workspace
  void* grad_weight;     // param type, or null
  void* grad_bias;       // param type, or null
};

// sum = x + residual (rounded to x's type), out = (sum - mean) * rstd * weight + bias in fp32,
// rounded to out's type; rstd = 1 / sqrt(biased variance + eps).
cudaError_t launch_layer_norm_forward(const LayerNormForwardArgs& args, const LayerNormShape& shape,
                                      cudaStream_t stream);
// The blocks of the backward kernel for `rows` rows on the current device (the partials' middle size).
int64_t layer_norm_backward_blocks(int64_t rows, int64_t cols);
// grad_x = grad_sum + d LayerNorm, grad_residual the same rounded to the residual's type; the
// weight and bias gradients summed over rows in a fixed order (deterministic).
cudaError_t launch_layer_norm_backward(const LayerNormBackwardArgs& args, const LayerNormShape& shape,
                                       cudaStream_t stream);

}  // namespace scaletrain::model::cuda
