#pragma once
// Launchers of the CUDA flash attention kernels (flash_attention.cu), free of torch headers so
// that the .cu file compiles quickly. Called by flash_attention.cpp, which owns the checks,
// allocation and autograd.
//
// One kernel family serves the dense (batch, heads, seq, head_dim) layout with any strides and the
// packed layout (total, heads, head_dim) + cu_seqlens: element (b, i, h, d) of a tensor lives at
//   base + b * batch + (start_b + i) * row + h * head + d
// with start_b = cu_seqlens[b] for packed tensors (whose batch stride is 0) and 0 for dense ones.
#include <cstdint>

#include <cuda_runtime_api.h>

#include "core/kernel_dtype.h"

namespace scaletrain::attention::cuda {

using core::DType;

struct Strides {
  int64_t batch, row, head;
};

struct Shape {
  int batch = 0, heads = 0, kv_heads = 0, dim = 0;
  int q_len = 0, k_len = 0;   // dense: every sequence's lengths; packed: the longest (grid size)
  const int* cu_q = nullptr;  // packed: batch + 1 device offsets; dense: null
  const int* cu_k = nullptr;
  bool causal = false;  // bottom right: query i sees keys j <= i + k_len - q_len
  float scale = 1.f;
};

// The head dims the kernels are built for (64 and 128).
bool supports_head_dim(int dim);

struct ForwardArgs {
  const void *q, *k, *v;
  Strides sq, sk, sv;
  void* out;
  Strides so;
  float* lse;  // row stride 1
  Strides sl;
};

// out = softmax(q k^T * scale) v per (sequence, head); lse = the rows' natural log-sum-exp (-inf
// and a zero row for a query that sees no key). q, k, v, out: 16-byte aligned rows.
// On a device of compute capability 9.0 in a build for sm_90 this and launch_backward run the
// Hopper kernels of flash_attention_sm90.cu unless SCALETRAIN_FLASH_SM90=0 is set
// (hopper_kernels_enabled(), read at each call).
cudaError_t launch_forward(DType type, const Shape& shape, const ForwardArgs& args, cudaStream_t stream);
bool hopper_kernels_enabled();

// The forward kernel this thread launched last: "portable", "cpasync" (the Hopper kernel that loads
// with cp.async), "persistent/N" or "blocks/N" (the Hopper copy-engine kernel on a persistent grid or
// a block per work item, N consumer warpgroups); nullptr before the first. note_forward_kernel sets it.
const char* last_forward_kernel();
void note_forward_kernel(const char* name);

struct BackwardArgs {
  const void *q, *k, *v, *out, *dout;
  Strides sq, sk, sv, so, sdo;
  const float* lse;  // the forward's, strides sl (row stride 1)
  float* delta;      // scratch in lse's layout: rowsum(dout * out)
  Strides sl;
  float* dq_accum;  // fp32, zeroed by the caller; receives dq / scale (atomic adds); unused when deterministic
  Strides sdq;
  void* dq;  // deterministic: dq, written in the inputs' dtype; else unused
  Strides sdq_out;
  void *dk, *dv;  // written, in the inputs' dtype
  Strides sdk, sdv;
};

// dq_accum += (dS k) without the scale, dk = scale * dS^T q, dv = P^T dout, recomputing P from
// lse. dk and dv sum the query heads of their key/value head. deterministic: dq = scale * dS k is
// written to `dq` by a kernel of its own, without atomics (every result bit-reproducible).
cudaError_t launch_backward(DType type, const Shape& shape, const BackwardArgs& args, bool deterministic,
                            cudaStream_t stream);

}  // namespace scaletrain::attention::cuda
