#pragma once
// Launchers of the linear layer's bias-gradient kernel (linear.cu), free of torch headers. Called
// by linear.cpp, which owns the checks, allocation and autograd.
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

}  // namespace scaletrain::model::cuda
