#pragma once
// Launchers of the fused GPT kernels (fused_ops.cu), free of torch headers so that the .cu file
// compiles quickly. Called by fused_ops.cpp, which owns the checks, allocation and autograd.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "core/kernel_dtype.h"

namespace scaletrain::model::cuda {

using core::DType;

// Strides (in elements) of a (batch, heads, seq, head_dim) tensor whose last dimension is dense.
struct HeadStrides {
  int64_t batch, head, seq;
};

struct RopeShape {
  int64_t batch, seq, heads, half;  // head_dim = 2 * half
  int64_t table_batch_stride;       // 0 when every sequence shares the tables, else seq * half
};

// qkv (batch, seq, 3, heads, 2 * half) dense -> q, k, v dense (batch, seq, heads, 2 * half).
cudaError_t launch_rope_forward(DType type, const void* qkv, const float* cos, const float* sin, void* q, void* k,
                                void* v, const RopeShape& shape, cudaStream_t stream);
// The gradients of q, k, v (strided) -> the gradient of qkv (dense).
cudaError_t launch_rope_backward(DType type, const void* dq, const void* dk, const void* dv, const HeadStrides& sq,
                                 const HeadStrides& sk, const HeadStrides& sv, const float* cos, const float* sin,
                                 void* dqkv, const RopeShape& shape, cudaStream_t stream);

struct CrossEntropyShape {
  int64_t rows, classes, row_stride;  // row_stride: elements between rows of logits
  int64_t ignore_index;
};

// Per row: lse = log(sum(exp(logits[:classes]))), loss = lse - logits[target] (0 for an ignored
// row, NaN for a target outside [0, classes)).
cudaError_t launch_cross_entropy_forward(DType type, const void* logits, const int64_t* targets,
                                         const CrossEntropyShape& shape, float* loss, float* lse,
                                         cudaStream_t stream);
// grad[r, c] = (softmax(logits[r])[c] - [c == target]) * scale[r * scale_stride] for c < classes
// (scale_stride 0: one scale for every row), 0 for the other columns of the row (columns in all)
// and for ignored or invalid rows. grad is dense.
cudaError_t launch_cross_entropy_backward(DType type, const void* logits, const int64_t* targets, const float* lse,
                                          const float* scale, int64_t scale_stride, const CrossEntropyShape& shape,
                                          int64_t columns, void* grad, cudaStream_t stream);

}  // namespace scaletrain::model::cuda
