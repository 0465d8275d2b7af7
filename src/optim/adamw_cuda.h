#pragma once
// Launcher of the fused multi-tensor AdamW step (adamw.cu), free of torch headers so that the .cu
// file compiles quickly. Called by adamw.cpp, which owns the checks and the state.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "core/kernel_dtype.h"

namespace scaletrain::optim::cuda {

using core::DType;

// One parameter's step: fp32 value and moments (updated in place), its gradient (`grad_type`,
// read), an optional low-precision copy (`copy_type`, written) and its step count (a float on
// the device, incremented there).
struct ParamSpan {
  float* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  void* copy;  // null when copy_type is none
  float* step;
  int64_t numel;
};

// Hyperparameters of one param group (all tensors of a launch share them).
struct Hyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
};

// Elements handled by one thread block (16384: 448 KB of traffic; with fewer, longer blocks the
// last wave leaves the GPU part-idle longer: 65536 took 2% more time on GPT-2 124M on an H200).
constexpr int64_t kChunkElements = 16384;
inline int64_t chunks_of(int64_t numel) { return (numel + kChunkElements - 1) / kChunkElements; }

// One AdamW step (torch.optim.AdamW's arithmetic, bias corrections in double) over `count`
// tensors whose gradients all have `grad_type` and copies `copy_type`. Each gradient is
// multiplied by *factor when factor is not null; when found_inf is not null and *found_inf != 0
// nothing is written, step counts included. When lr is not null, *lr replaces hyper.lr. The
// three pointers are read on the device.
cudaError_t launch_adamw(const ParamSpan* spans, int64_t count, DType grad_type, DType copy_type, const Hyper& hyper,
                         const double* lr, const float* factor, const float* found_inf, cudaStream_t stream);

}  // namespace scaletrain::optim::cuda
