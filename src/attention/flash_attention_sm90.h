#pragma once
// The Hopper (sm_90a, wgmma) flash attention kernels of flash_attention_sm90.cu, compiled only when
// the build targets sm_90 (SCALETRAIN_WITH_SM90). launch_forward and launch_backward of
// flash_attention_cuda.h call them on a device of compute capability 9.0 unless
// SCALETRAIN_FLASH_SM90=0 is set in the environment.
#include "flash_attention_cuda.h"

namespace scaletrain::attention::cuda::sm90 {

// As cuda::launch_forward (same arguments, results and limits); the device must be sm_90.
cudaError_t launch_forward(DType type, const Shape& shape, const ForwardArgs& args, cudaStream_t stream);

// dK and dV of cuda::launch_backward (delta must be computed), and with with_dq dq_accum too.
cudaError_t launch_dk_dv(DType type, const Shape& shape, const BackwardArgs& args, bool with_dq, cudaStream_t stream);

}  // namespace scaletrain::attention::cuda::sm90
