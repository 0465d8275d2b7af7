#pragma once
// Device conversions between the stored element types and fp32, shared by the CUDA kernels.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/kernel_dtype.h"

namespace scaletrain::core::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as ATen's casts do.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Four 16-bit values, for 8-byte loads and stores.
struct alignas(8) Half4 {
  __half x[4];
};
struct alignas(8) BFloat4 {
  __nv_bfloat16 x[4];
};

// x rounded to `type` and stored at p[i] of a `type` array.
__device__ __forceinline__ void store_as(void* p, DType type, int64_t i, float x) {
  if (type == DType::f32) {
    static_cast<float*>(p)[i] = x;
  } else if (type == DType::bf16) {
    static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(x);
  } else {
    static_cast<__half*>(p)[i] = from_float<__half>(x);
  }
}

}  // namespace scaletrain::core::cuda
