#include "scaletrain/core/build_info.h"

#include <torch/version.h>

#include "scaletrain/core/error.h"
#include "scaletrain/core/version.h"

namespace scaletrain::core {

#ifdef SCALETRAIN_WITH_CUDA
int cuda_probe_kernel_arch(int device_index, std::string* error);  // cuda_probe.cu
#endif

BuildInfo build_info() {
  BuildInfo info;
  info.version = SCALETRAIN_VERSION;
  info.torch_version = TORCH_VERSION;
#ifdef SCALETRAIN_WITH_CUDA
  info.cuda = true;
  info.cuda_architectures = SCALETRAIN_CUDA_ARCHITECTURES;
#endif
  return info;
}

int cuda_kernel_arch(int device_index) {
#ifdef SCALETRAIN_WITH_CUDA
  std::string error;
  int arch = cuda_probe_kernel_arch(device_index, &error);
  if (arch < 0) throw Error("CUDA device " + std::to_string(device_index) + ": " + error);
  return arch;
#else
  (void)device_index;
  throw Error("scaletrain was built without CUDA (configure with -DSCALETRAIN_CUDA=ON)");
#endif
}

}  // namespace scaletrain::core
