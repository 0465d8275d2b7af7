#pragma once
// What this build of scaletrain contains, and a check that its CUDA kernels run on a device.
#include <string>

namespace scaletrain::core {

struct BuildInfo {
  std::string version;             // "0.1.0"
  std::string torch_version;       // torch the library was built against
  bool cuda = false;               // CUDA kernels compiled in
  std::string cuda_architectures;  // "80;90" when cuda
};

BuildInfo build_info();

// Runs a one-thread kernel on CUDA device `device_index` that returns __CUDA_ARCH__ of the image
// the driver picked (e.g. 900). Proves the build holds a kernel image this GPU can run.
// Throws Error when built without CUDA or when the launch fails (with CUDA's message).
int cuda_kernel_arch(int device_index);

}  // namespace scaletrain::core
