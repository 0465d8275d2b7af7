#pragma once
// A tensor's element type for the torch-free kernel launchers (core/kernel_dtype.h).
#include <ATen/core/Tensor.h>

#include "kernel_dtype.h"

namespace scaletrain::core {

// none for an undefined tensor or a type the kernels do not take.
inline DType dtype_of(const at::Tensor& t) {
  if (!t.defined()) return DType::none;
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: return DType::none;
  }
}

}  // namespace scaletrain::core
