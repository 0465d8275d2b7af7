#pragma once
// Element types as the torch-free CUDA launchers see them (the .cu files include no torch header,
// so that they compile quickly). core/tensor_dtype.h maps a tensor to one.
namespace scaletrain::core::cuda {

enum class DType { none, f32, f16, bf16 };

}  // namespace scaletrain::core::cuda
