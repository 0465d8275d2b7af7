#pragma once
// The NCCL backend of dist::ProcessGroup, apart from process_group.cpp so that only CUDA builds
// compile ProcessGroupNCCL's header (and need nccl.h).
#include <chrono>
#include <string>

#include <c10/util/intrusive_ptr.h>

namespace c10d {
class Backend;
class Store;
}  // namespace c10d

namespace scaletrain::dist {

// Joins an NCCL group on `device` ("cuda:N"; it becomes the current device). Throws DistError in
// a build without CUDA or when the device is not there.
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                    int world_size, const std::string& device,
                                                    std::chrono::milliseconds timeout);

}  // namespace scaletrain::dist
