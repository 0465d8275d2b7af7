#pragma once
// Launchers of the linear layers' kernels (linear.cu): the bias gradient and the MLP's GELU, free
// of torch headers. Called by linear.cpp, which owns the checks, allocation and autograd.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "core/kernel_dtype.h"

namespace scaletrain::model::cuda {

using core::DType;

// The slabs of rows the first pass splits `rows` into (the partials' leading size).
int64_t column_sum_slabs(int64_t rows, int64_t cols);
// out[c] = sum over rows of in[r, c] in fp32, rounded to out_type: in (rows, cols) dense in
// in_type, cols a multiple of 4; partials (column_sum_slabs(rows, cols), cols) fp32 workspace.
// Each slab's rows and then the slabs are added in a fixed order (deterministic).
cudaError_t launch_column_sums(const void* in, DType in_type, int64_t rows, int64_t cols, float* partials, void* out,
                               DType out_type, cudaStream_t stream);
// out = gelu_tanh(in), n elements of `type` (fp32 math), both 16-byte aligned.
cudaError_t launch_gelu(const void* in, void* out, DType type, int64_t n, cudaStream_t stream);
// The MLP's GELU backward, over (rows, cols) dense tensors of `type`, cols a multiple of 4, 16-byte
// aligned: act = gelu_tanh(pre) (the bits launch_gelu writes), grad = grad gelu_tanh'(pre) in
// place, and (bias_grad not null) bias_grad[c] = the fp32 sum of the new grad's column c, rounded
// to bias_type; partials as for launch_column_sums.
cudaError_t launch_gelu_backward(const void* pre, void* grad, void* act, DType type, int64_t rows, int64_t cols,
                                 float* partials, void* bias_grad, DType bias_type, cudaStream_t stream);

}  // namespace scaletrain::model::cuda
