// Build information and the CUDA kernel probe. Reference: the device's compute capability as
// reported by the CUDA runtime through torch.
#include <gtest/gtest.h>
#include <torch/version.h>

#include "scaletrain/core/build_info.h"
#include "scaletrain/core/error.h"
#include "scaletrain/core/version.h"
#include "test_util.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace scaletrain::core {
namespace {

TEST(BuildInfo, VersionAndTorch) {
  auto info = build_info();
  EXPECT_EQ(info.version, SCALETRAIN_VERSION);
  EXPECT_EQ(info.torch_version, TORCH_VERSION);
#ifdef SCALETRAIN_WITH_CUDA
  EXPECT_TRUE(info.cuda);
#else
  EXPECT_FALSE(info.cuda);
  EXPECT_THROW(cuda_kernel_arch(0), Error);
#endif
}

TEST(BuildInfo, KernelImageRunsOnEveryDevice) {
  SCALETRAIN_REQUIRE_CUDA();
#ifndef SCALETRAIN_WITH_CUDA
  GTEST_SKIP() << "built without CUDA kernels";
#else
  for (int d = 0; d < static_cast<int>(torch::cuda::device_count()); ++d) {
    cudaDeviceProp prop{};
    ASSERT_EQ(cudaGetDeviceProperties(&prop, d), cudaSuccess);
    const int arch = cuda_kernel_arch(d);
    EXPECT_GE(arch, 800);
    EXPECT_LE(arch, prop.major * 100 + prop.minor * 10);  // an image at or below the device's capability
  }
#endif
}

}  // namespace
}  // namespace scaletrain::core
