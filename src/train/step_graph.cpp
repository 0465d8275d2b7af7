#include "scaletrain/train/step_graph.h"

#include <stdexcept>

#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA

#ifdef SCALETRAIN_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace scaletrain::train {

#ifdef SCALETRAIN_WITH_CUDA

struct StepGraph::Impl {
  explicit Impl(c10::cuda::CUDAStream s) : stream(s) {}
  c10::cuda::CUDAStream stream;
  at::cuda::CUDAGraph graph;
  bool captured = false;
};

StepGraph::StepGraph(const c10::Device& device) {
  if (!device.is_cuda()) throw std::runtime_error("StepGraph: device " + device.str() + ", expected a CUDA device");
  const c10::cuda::CUDAGuard guard(device);
  // What the default stream has queued (the model's initialisation) comes before the side stream's work.
  c10::cuda::getCurrentCUDAStream().synchronize();
  impl_ = std::make_unique<Impl>(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()));
}

StepGraph::~StepGraph() = default;

c10::Stream StepGraph::stream() const { return impl_->stream.unwrap(); }

void StepGraph::capture(const std::function<void()>& step) {
  if (impl_->captured) throw std::logic_error("StepGraph::capture: already captured");
  const c10::cuda::CUDAStreamGuard on_stream(impl_->stream);
  impl_->stream.synchronize();
  c10::cuda::CUDACachingAllocator::emptyCache();
  impl_->graph.capture_begin();
  try {
    step();
  } catch (...) {
    try {
      impl_->graph.capture_end();  // leaves the stream out of capture mode
    } catch (...) {
    }
    throw;
  }
  impl_->graph.capture_end();
  impl_->captured = true;
}

bool StepGraph::captured() const { return impl_->captured; }

void StepGraph::replay() {
  if (!impl_->captured) throw std::logic_error("StepGraph::replay: nothing captured");
  impl_->graph.replay();
}

void StepGraph::synchronize() const { impl_->stream.synchronize(); }

#else

struct StepGraph::Impl {};

StepGraph::StepGraph(const c10::Device& device) {
  throw std::runtime_error("StepGraph: this build of scaletrain has no CUDA (device " + device.str() + ")");
}
StepGraph::~StepGraph() = default;
c10::Stream StepGraph::stream() const { return c10::Stream(c10::Stream::DEFAULT, c10::Device(c10::kCPU)); }
void StepGraph::capture(const std::function<void()>&) {}
bool StepGraph::captured() const { return false; }
void StepGraph::replay() {}
void StepGraph::synchronize() const {}

#endif

}  // namespace scaletrain::train
