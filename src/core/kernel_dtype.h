#pragma once
// Element types as the torch-free kernel files see them (the .cu files and the CPU AdamW kernels
// include no torch header, so that they compile quickly). core/tensor_dtype.h maps a tensor to one.
namespace scaletrain::core {

enum class DType { none, f32, f16, bf16 };

}  // namespace scaletrain::core
