// A one-thread kernel that reports which compiled architecture the driver chose for this GPU.
// It checks the build end to end (nvcc flags, fatbinary, runtime, driver) without torch headers.
#include <cuda_runtime.h>

#include <string>

namespace scaletrain::core {
namespace {

__global__ void report_arch(int* out) {
#ifdef __CUDA_ARCH__
  *out = __CUDA_ARCH__;
#endif
}

bool ok(cudaError_t status, std::string* error, const char* what) {
  if (status == cudaSuccess) return true;
  *error = std::string(what) + ": " + cudaGetErrorString(status);
  return false;
}

}  // namespace

// Returns __CUDA_ARCH__ of the image run on `device_index`, or -1 with `error` set.
int cuda_probe_kernel_arch(int device_index, std::string* error) {
  int* device_value = nullptr;
  int value = -1;
  if (!ok(cudaSetDevice(device_index), error, "cudaSetDevice")) return -1;
  if (!ok(cudaMalloc(&device_value, sizeof(int)), error, "cudaMalloc")) return -1;
  bool good = ok(cudaMemset(device_value, 0xff, sizeof(int)), error, "cudaMemset");
  if (good) {
    report_arch<<<1, 1>>>(device_value);
    good = ok(cudaGetLastError(), error, "kernel launch") &&
           ok(cudaMemcpy(&value, device_value, sizeof(int), cudaMemcpyDeviceToHost), error, "cudaMemcpy");
  }
  cudaFree(device_value);
  return good ? value : -1;
}

}  // namespace scaletrain::core
