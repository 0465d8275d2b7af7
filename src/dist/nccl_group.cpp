#include "dist/nccl_group.h"

#include <fmt/format.h>

#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA
#include "scaletrain/dist/process_group.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace scaletrain::dist {

c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                    int world_size, const std::string& device,
                                                    std::chrono::milliseconds timeout) {
#ifdef SCALETRAIN_WITH_CUDA
  c10::Device cuda_device(device);
  if (!cuda_device.is_cuda() || !cuda_device.has_index()) {
    throw DistError(fmt::format("dist device: got '{}', expected cuda:N for nccl", device));
  }
  if (cuda_device.index() >= c10::cuda::device_count()) {
    throw DistError(fmt::format("dist device: {} is not there ({} CUDA devices visible to rank {})", device,
                                c10::cuda::device_count(), rank));
  }
  c10::cuda::set_device(cuda_device.index());
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
#else
  (void)store;
  (void)world_size;
  (void)timeout;
  throw DistError(fmt::format("dist backend nccl (device {}, rank {}): this build has no CUDA", device, rank));
#endif
}

}  // namespace scaletrain::dist
