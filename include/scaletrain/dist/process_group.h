#pragma once
// A thin handle on a c10d process group: the ranks that train together and the collectives that
// ZeroAdamW and the trainer run between them. c10d does the communication (Gloo on CPU tensors,
// NCCL on CUDA tensors); this layer adds
//   - rendezvous from the environment that torchrun and Slurm set (env://), or adoption of a group
//     a caller already has (torch.distributed's default group, passed from Python);
//   - collectives on flat tensors that every backend runs, with a fallback where one lacks a
//     collective (reduce-scatter and all-gather through all-reduce);
//   - errors that name the collective, the rank and the likely cause (a peer rank died or timed
//     out) instead of hanging: every wait is bounded by the group's timeout.
//
//   auto group = dist::ProcessGroup::from_env();          // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//   group.all_reduce(loss_sum);                            // sum over ranks, in place
//   group.reduce_scatter(my_chunk, gradients).wait();      // gradients: size() equal chunks
//
// A default-constructed ProcessGroup is one process alone (rank 0 of 1): collectives copy or do
// nothing, so single-process code needs no special case.
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

namespace c10d {
class Backend;
class ProcessGroup;
class Store;
class Work;
}  // namespace c10d

namespace scaletrain::dist {

// A collective failed or timed out: a peer rank exited, the network broke, or ranks disagree on
// the sequence of collectives. The message names the collective and this rank.
class DistError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class ReduceOp { sum, max, min };

// Which c10d backend carries the collectives.
enum class BackendKind { gloo, nccl };

struct GroupOptions {
  // Every collective and the rendezvous fail after this long (DistError) instead of hanging.
  std::chrono::milliseconds timeout = std::chrono::minutes(10);
  // Empty: NCCL when `device` is CUDA, else Gloo.
  std::string backend = {};
  // The tensors' device: CPU for Gloo; a CUDA device for NCCL (LOCAL_RANK picks it in from_env).
  std::string device = "cpu";
  // Emulate reduce-scatter and all-gather with all-reduce even where the backend has them (tests
  // of the fallback; a backend that lacks one switches to it by itself).
  bool force_fallbacks = false;
};

// The rank, world size and rendezvous address read from the environment.
struct EnvRendezvous {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr;
  int master_port = 0;
  // torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE).
  bool agent_store = false;
  std::string source;  // "torchrun" (RANK/WORLD_SIZE), "slurm" (SLURM_PROCID/SLURM_NTASKS) or "none"
};

// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun), else SLURM_PROCID,
// SLURM_NTASKS, SLURM_LOCALID with MASTER_ADDR/MASTER_PORT; neither: one process. Throws
// DistError naming the variable that is missing or malformed.
EnvRendezvous read_env_rendezvous();

// A pending collective. wait() blocks until it is done (on CUDA: until the current stream is
// ordered after it) and throws DistError if it failed or timed out. Waiting twice is harmless.
class Work {
 public:
  Work();
  Work(c10::intrusive_ptr<c10d::Work> work, std::string what, int rank);
  ~Work();
  Work(Work&&) noexcept;
  Work& operator=(Work&&) noexcept;
  Work(const Work&) = delete;
  Work& operator=(const Work&) = delete;

  void wait();
  bool pending() const;

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  std::string what_;
  int rank_ = 0;
};

class ProcessGroup {
 public:
  // One process alone.
  ProcessGroup();

  // Rendezvous through the environment (see read_env_rendezvous): rank 0 serves a TCP store at
  // MASTER_ADDR:MASTER_PORT unless torchrun's agent does; every rank then joins the backend. No
  // variables (or one process without MASTER_ADDR): one process alone.
  static ProcessGroup from_env(const GroupOptions& options = {});
  // Joins a group through a store the caller made (tests: a TCPStore on loopback).
  static ProcessGroup create(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
                             const GroupOptions& options = {});
  // Uses a group the caller already has (torch.distributed's, from Python): its backend for
  // `device_type` ("cpu" or "cuda") carries the collectives.
  static ProcessGroup adopt(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::string& device_type,
                            const GroupOptions& options = {});

  int rank() const;
  int size() const;
  std::string backend_name() const;  // "gloo", "nccl", or "single" for one process alone
  // The device of the tensors the collectives take: CUDA (the current device) for NCCL, else CPU.
  at::Device device() const;
  std::chrono::milliseconds timeout() const;

  // In place over all ranks. `tensor` contiguous, same shape and dtype on every rank.
  Work all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::sum) const;
  // `input` holds size() equal contiguous chunks; rank r receives the reduction of chunk r into
  // `output` (input.numel() == size() * output.numel(), same dtype and device). `output` may be
  // rank()'s chunk of `input` itself.
  Work reduce_scatter(at::Tensor& output, const at::Tensor& input, ReduceOp op = ReduceOp::sum) const;
  // `output` holds size() chunks of input.numel(); chunk r receives rank r's `input`. `input` may
  // be rank()'s chunk of `output` itself (gathering in place).
  Work all_gather(at::Tensor& output, const at::Tensor& input) const;
  Work broadcast(at::Tensor& tensor, int root) const;
  // Waits until every rank has arrived (a one-element all-reduce, so it is bounded by the timeout).
  void barrier() const;

  // Whether reduce-scatter / all-gather run natively or through all-reduce (see GroupOptions).
  bool native_reduce_scatter() const;
  bool native_all_gather() const;

  // The c10d backend (null for one process alone), for code that calls c10d directly.
  c10::intrusive_ptr<c10d::Backend> backend() const;

 private:
  struct State;
  explicit ProcessGroup(std::shared_ptr<State> state);
  std::shared_ptr<State> state_;
};

}  // namespace scaletrain::dist
