#pragma once
// One training step captured in a CUDA graph and replayed: after capture, a step costs one
// launch from the host instead of one per kernel (about a thousand for GPT-2 small), and the
// host runs ahead of the GPU without gaps between kernels.
//
//   StepGraph graph(device);
//   c10::StreamGuard on_side_stream(graph.stream());  // warm-up steps, capture and replays
//   for (int i = 0; i < 3; ++i) eager_step();             // cuBLAS, autograd, optimizer state
//   graph.capture([&] { loss = step_on(static_inputs); });  // records, runs nothing
//   for (...) { static_inputs.copy_(next, true); lr.fill_(lr_at(s)); graph.replay(); }
//
// What the captured step reads must live at fixed addresses (copy new inputs into the tensors
// the capture read; read the learning rate from device memory, optim::StepScale::lr) and nothing
// in it may wait for the host (no .item(), no host copy). Tensors created inside the capture
// live in the graph's private memory pool and hold each replay's results. torch registers the CUDA
// generator with the graph, but replayed dropout masks were not those of uncaptured steps on the
// H200 (torch 2.11): the trainer does not capture a model with dropout.
#include <functional>
#include <memory>

#include <c10/core/Device.h>
#include <c10/core/Stream.h>

namespace scaletrain::train {

class StepGraph {
 public:
  // Throws std::runtime_error when this build has no CUDA or `device` is not a CUDA device.
  explicit StepGraph(const c10::Device& device);
  ~StepGraph();
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  // The stream (not the default one, which cannot be captured) on which warm-up steps, the
  // capture and the replays run. Warm-up steps on it let cuBLAS and the autograd engine set up
  // their per-stream state outside the capture. (The constructor waits for the work queued on the
  // current stream, so that the side stream starts after it.)
  c10::Stream stream() const;
  // Records `step` into the graph and instantiates it; nothing runs. Frees the caching
  // allocator's unused blocks first, so that the graph's pool does not come on top of the
  // warm-up steps' cached memory. Throws what `step` throws (the capture is abandoned; torch's
  // allocator and generator may be left mid-capture, so do not go on training in the process).
  void capture(const std::function<void()>& step);
  bool captured() const;
  // Runs the captured step on the current stream.
  void replay();
  // Waits for the graph's stream.
  void synchronize() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace scaletrain::train
