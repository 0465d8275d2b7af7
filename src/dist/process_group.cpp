// c10d groups behind dist::ProcessGroup. This is the one translation unit that includes the Gloo
// backend's header (it needs the gloo headers, see docs/building.md); NCCL lives in nccl_group.cpp.
#include "scaletrain/dist/process_group.h"

#include <cerrno>
#include <cstdlib>
#include <string>
#include <utility>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "dist/nccl_group.h"

namespace scaletrain::dist {

namespace {

const char* env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : nullptr;
}

int env_int(const char* name, int min_value) {
  const char* text = env(name);
  char* end = nullptr;
  errno = 0;
  long value = std::strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || value < min_value || value > (1L << 30)) {
    throw DistError(fmt::format("environment variable {}: got '{}', expected an integer >= {}", name, text, min_value));
  }
  return static_cast<int>(value);
}

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return c10d::ReduceOp::SUM;
    case ReduceOp::max: return c10d::ReduceOp::MAX;
    case ReduceOp::min: return c10d::ReduceOp::MIN;
  }
  return c10d::ReduceOp::SUM;
}

const char* op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::max: return "max";
    case ReduceOp::min: return "min";
  }
  return "?";
}

bool is_loopback(const std::string& address) {
  return address == "localhost" || address.rfind("127.", 0) == 0 || address == "::1";
}

std::string backend_for(const GroupOptions& options) {
  std::string backend = options.backend;
  bool cuda = options.device.rfind("cuda", 0) == 0;
  if (options.device != "cpu" && !cuda) {
    throw DistError(fmt::format("dist device: got '{}', expected 'cpu' or 'cuda[:N]'", options.device));
  }
  if (backend.empty()) backend = cuda ? "nccl" : "gloo";
  if (backend != "gloo" && backend != "nccl") {
    throw DistError(fmt::format("dist backend: got '{}', expected 'gloo' or 'nccl'", backend));
  }
  if (backend == "nccl" && !cuda) throw DistError("dist backend: nccl needs a CUDA device (got device 'cpu')");
  if (backend == "gloo" && cuda) {
    throw DistError(fmt::format("dist backend: gloo carries CPU tensors here (got device '{}'; use nccl)", options.device));
  }
  return backend;
}

c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
                                            const GroupOptions& options, const std::string& address) {
  auto gloo_options = c10d::ProcessGroupGloo::Options::create(options.timeout);
  if (const char* interface = env("GLOO_SOCKET_IFNAME")) {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(interface));
  } else if (is_loopback(address)) {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, gloo_options);
}

}  // namespace

EnvRendezvous read_env_rendezvous() {
  EnvRendezvous result;
  const char* rank_name = nullptr;
  const char* size_name = nullptr;
  const char* local_name = nullptr;
  if (env("RANK") != nullptr || env("WORLD_SIZE") != nullptr) {
    result.source = "torchrun";
    rank_name = "RANK";
    size_name = "WORLD_SIZE";
    local_name = "LOCAL_RANK";
  } else if (env("SLURM_PROCID") != nullptr && env("SLURM_NTASKS") != nullptr) {
    result.source = "slurm";
    rank_name = "SLURM_PROCID";
    size_name = "SLURM_NTASKS";
    local_name = "SLURM_LOCALID";
  } else {
    result.source = "none";
    return result;
  }
  for (const char* name : {rank_name, size_name}) {
    if (env(name) == nullptr) throw DistError(fmt::format("environment variable {} is not set (expected with {})", name, result.source));
  }
  result.rank = env_int(rank_name, 0);
  result.world_size = env_int(size_name, 1);
  result.local_rank = env(local_name) != nullptr ? env_int(local_name, 0) : 0;
  if (result.rank >= result.world_size) {
    throw DistError(fmt::format("environment variable {}: got {}, expected less than {} = {}", rank_name, result.rank,
                                size_name, result.world_size));
  }
  if (result.world_size > 1) {
    if (env("MASTER_ADDR") == nullptr) throw DistError("environment variable MASTER_ADDR is not set (expected the address of rank 0)");
    if (env("MASTER_PORT") == nullptr) throw DistError("environment variable MASTER_PORT is not set (expected a free TCP port)");
  }
  if (env("MASTER_ADDR") != nullptr && env("MASTER_PORT") != nullptr) {
    result.master_addr = env("MASTER_ADDR");
    result.master_port = env_int("MASTER_PORT", 1);
    if (result.master_port > 65535) throw DistError(fmt::format("environment variable MASTER_PORT: got {}, expected 1..65535", result.master_port));
  }
  const char* agent = env("TORCHELASTIC_USE_AGENT_STORE");
  result.agent_store = agent != nullptr && (std::string(agent) == "True" || std::string(agent) == "1");
  return result;
}

// ------------------------------------------------------------------------------------------------
struct ProcessGroup::State {
  c10::intrusive_ptr<c10d::Backend> backend;  // null: one process alone
  std::string name = "single";
  int rank = 0;
  int size = 1;
  std::chrono::milliseconds timeout = GroupOptions{}.timeout;
  bool native_reduce_scatter = false;
  bool native_all_gather = false;
};

ProcessGroup::ProcessGroup() : state_(std::make_shared<State>()) {}
ProcessGroup::ProcessGroup(std::shared_ptr<State> state) : state_(std::move(state)) {}

ProcessGroup ProcessGroup::create(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world_size,
                                  const GroupOptions& options) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw DistError(fmt::format("dist: rank {} of world size {} (expected 0 <= rank < world size)", rank, world_size));
  }
  std::string backend = backend_for(options);
  auto state = std::make_shared<State>();
  state->rank = rank;
  state->size = world_size;
  state->timeout = options.timeout;
  state->name = backend;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("scaletrain", store);
  try {
    if (backend == "gloo") {
      std::string address = env("MASTER_ADDR") != nullptr ? env("MASTER_ADDR") : "127.0.0.1";
      state->backend = make_gloo(prefixed, rank, world_size, options, address);
    } else {
      state->backend = make_nccl_backend(prefixed, rank, world_size, options.device, options.timeout);
    }
  } catch (const DistError&) {
    throw;
  } catch (const std::exception& e) {
    throw DistError(fmt::format("dist: rank {} of {} could not join the {} group: {}", rank, world_size, backend, e.what()));
  }
  state->native_reduce_scatter = !options.force_fallbacks;
  state->native_all_gather = !options.force_fallbacks;
  return ProcessGroup(std::move(state));
}

ProcessGroup ProcessGroup::from_env(const GroupOptions& options) {
  EnvRendezvous rendezvous = read_env_rendezvous();
  // One process and no rendezvous address: alone. (torchrun --nproc_per_node 1 sets an address:
  // then a group of one, as torch.distributed makes.)
  if (rendezvous.world_size == 1 && rendezvous.master_addr.empty()) return ProcessGroup();
  GroupOptions resolved = options;
  if (resolved.device == "cuda") resolved.device = fmt::format("cuda:{}", rendezvous.local_rank);
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(rendezvous.master_port);
  store_options.isServer = rendezvous.rank == 0 && !rendezvous.agent_store;
  store_options.numWorkers = rendezvous.world_size;
  store_options.waitWorkers = false;
  store_options.timeout = options.timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(rendezvous.master_addr, store_options);
  } catch (const std::exception& e) {
    throw DistError(fmt::format("dist: rank {} could not reach the store at {}:{} ({}): {}", rendezvous.rank,
                                rendezvous.master_addr, rendezvous.master_port,
                                store_options.isServer ? "serving it" : "as a client", e.what()));
  }
  return create(store, rendezvous.rank, rendezvous.world_size, resolved);
}

ProcessGroup ProcessGroup::adopt(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::string& device_type,
                                 const GroupOptions& options) {
  if (!group) throw DistError("dist: adopt got no process group");
  c10::DeviceType type = device_type == "cuda" ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
  if (device_type != "cpu" && device_type != "cuda") {
    throw DistError(fmt::format("dist: adopt device_type '{}', expected 'cpu' or 'cuda'", device_type));
  }
  auto state = std::make_shared<State>();
  try {
    state->backend = group->getBackend(type);
  } catch (const std::exception& e) {
    throw DistError(fmt::format("dist: the process group has no backend for {} tensors: {}", device_type, e.what()));
  }
  state->rank = group->getRank();
  state->size = group->getSize();
  state->name = state->backend->getBackendName();
  state->timeout = options.timeout;
  state->native_reduce_scatter = !options.force_fallbacks;
  state->native_all_gather = !options.force_fallbacks;
  return ProcessGroup(std::move(state));
}

int ProcessGroup::rank() const { return state_->rank; }
int ProcessGroup::size() const { return state_->size; }
std::string ProcessGroup::backend_name() const { return state_->name; }
std::chrono::milliseconds ProcessGroup::timeout() const { return state_->timeout; }
bool ProcessGroup::native_reduce_scatter() const { return state_->native_reduce_scatter; }
bool ProcessGroup::native_all_gather() const { return state_->native_all_gather; }
c10::intrusive_ptr<c10d::Backend> ProcessGroup::backend() const { return state_->backend; }

namespace {

void check_flat(const at::Tensor& tensor, const char* collective, const char* name) {
  if (!tensor.defined() || !tensor.is_contiguous()) {
    throw DistError(fmt::format("dist {}: {} must be a defined contiguous tensor", collective, name));
  }
}

bool not_supported(const std::exception& e) {
  std::string what = e.what();
  return what.find("not support") != std::string::npos || what.find("not implemented") != std::string::npos ||
         what.find("Not implemented") != std::string::npos;
}

}  // namespace

Work ProcessGroup::all_reduce(at::Tensor& tensor, ReduceOp op) const {
  check_flat(tensor, "all_reduce", "tensor");
  if (!state_->backend) return {};
  c10d::AllreduceOptions options;
  options.reduceOp = to_c10d(op);
  options.timeout = state_->timeout;
  std::vector<at::Tensor> tensors{tensor};
  std::string what = fmt::format("all_reduce({}, {} elements)", op_name(op), tensor.numel());
  try {
    return Work(state_->backend->allreduce(tensors, options), what, state_->rank);
  } catch (const std::exception& e) {
    throw DistError(fmt::format("dist {} failed on rank {} of {}: {}", what, state_->rank, state_->size, e.what()));
  }
}

Work ProcessGroup::reduce_scatter(at::Tensor& output, const at::Tensor& input, ReduceOp op) const {
  check_flat(output, "reduce_scatter", "output");
  check_flat(input, "reduce_scatter", "input");
  if (input.numel() != output.numel() * state_->size || input.scalar_type() != output.scalar_type() ||
      input.device() != output.device()) {
    throw DistError(fmt::format("dist reduce_scatter: input of {} {} elements for an output of {} {} elements on {} ranks "
                                "(expected world size x output, same dtype and device)",
                                input.numel(), c10::toString(input.scalar_type()), output.numel(),
                                c10::toString(output.scalar_type()), state_->size));
  }
  if (!state_->backend) {
    if (output.data_ptr() != input.data_ptr()) output.view({-1}).copy_(input.view({-1}));
    return {};
  }
  std::string what = fmt::format("reduce_scatter({}, {} elements)", op_name(op), input.numel());
  if (state_->native_reduce_scatter) {
    try {
      c10d::ReduceScatterOptions options;
      options.reduceOp = to_c10d(op);
      options.timeout = state_->timeout;
      // A source that overlaps the destination is copied first (the backend may write the output
      // before it has read all of the input), except NCCL's in-place form (output = own chunk).
      bool own_chunk = output.data_ptr() ==
                       static_cast<char*>(input.data_ptr()) + state_->rank * output.numel() * output.element_size();
      bool copy = output.storage().is_alias_of(input.storage()) && !(own_chunk && state_->name == "nccl");
      at::Tensor source = copy ? input.clone() : input;
      auto work = state_->backend->_reduce_scatter_base(output, source, options);
      return Work(std::move(work), what, state_->rank);
    } catch (const std::exception& e) {
      if (!not_supported(e)) {
        throw DistError(fmt::format("dist {} failed on rank {} of {}: {}", what, state_->rank, state_->size, e.what()));
      }
      state_->native_reduce_scatter = false;
    }
  }
  // Fallback: all-reduce a copy of the whole input and keep this rank's chunk.
  at::Tensor reduced = input.clone();
  all_reduce(reduced, op).wait();
  output.copy_(reduced.narrow(0, state_->rank * output.numel(), output.numel()).view(output.sizes()));
  return {};
}

Work ProcessGroup::all_gather(at::Tensor& output, const at::Tensor& input) const {
  check_flat(output, "all_gather", "output");
  check_flat(input, "all_gather", "input");
  if (output.numel() != input.numel() * state_->size || input.scalar_type() != output.scalar_type() ||
      input.device() != output.device()) {
    throw DistError(fmt::format("dist all_gather: output of {} {} elements for an input of {} {} elements on {} ranks "
                                "(expected world size x input, same dtype and device)",
                                output.numel(), c10::toString(output.scalar_type()), input.numel(),
                                c10::toString(input.scalar_type()), state_->size));
  }
  at::Tensor flat_output = output.view({-1});
  at::Tensor slot = flat_output.narrow(0, state_->rank * input.numel(), input.numel());
  bool in_place = slot.data_ptr() == input.data_ptr();
  if (!state_->backend) {
    if (!in_place) flat_output.copy_(input.view({-1}));
    return {};
  }
  std::string what = fmt::format("all_gather({} elements)", output.numel());
  if (state_->native_all_gather) {
    try {
      // NCCL gathers in place; Gloo may read the input after writing the output, so it gets a copy.
      at::Tensor source = in_place && state_->name != "nccl" ? input.clone() : input;
      auto work = state_->backend->_allgather_base(output, source);
      return Work(std::move(work), what, state_->rank);
    } catch (const std::exception& e) {
      if (!not_supported(e)) {
        throw DistError(fmt::format("dist {} failed on rank {} of {}: {}", what, state_->rank, state_->size, e.what()));
      }
      state_->native_all_gather = false;
    }
  }
  // Fallback: every rank contributes its chunk into zeros; the sum is the gathered tensor.
  at::Tensor mine = input.view({-1}).clone();
  flat_output.zero_();
  slot.copy_(mine);
  all_reduce(flat_output, ReduceOp::sum).wait();
  return {};
}

Work ProcessGroup::broadcast(at::Tensor& tensor, int root) const {
  check_flat(tensor, "broadcast", "tensor");
  if (root < 0 || root >= state_->size) {
    throw DistError(fmt::format("dist broadcast: root {} (expected 0..{})", root, state_->size - 1));
  }
  if (!state_->backend) return {};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  options.timeout = state_->timeout;
  std::vector<at::Tensor> tensors{tensor};
  std::string what = fmt::format("broadcast(root {}, {} elements)", root, tensor.numel());
  try {
    return Work(state_->backend->broadcast(tensors, options), what, state_->rank);
  } catch (const std::exception& e) {
    throw DistError(fmt::format("dist {} failed on rank {} of {}: {}", what, state_->rank, state_->size, e.what()));
  }
}

at::Device ProcessGroup::device() const {
  return state_->name == "nccl" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
}

void ProcessGroup::barrier() const {
  if (!state_->backend) return;
  at::Tensor one = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(device()));
  all_reduce(one).wait();
}

// ------------------------------------------------------------------------------------------------
Work::Work(c10::intrusive_ptr<c10d::Work> work, std::string what, int rank)
    : work_(std::move(work)), what_(std::move(what)), rank_(rank) {}
Work::Work() = default;
Work::~Work() = default;
Work::Work(Work&&) noexcept = default;
Work& Work::operator=(Work&&) noexcept = default;

bool Work::pending() const { return static_cast<bool>(work_); }

void Work::wait() {
  if (!work_) return;
  auto work = std::move(work_);
  try {
    work->wait();
  } catch (const std::exception& e) {
    throw DistError(fmt::format("dist {} failed on rank {} (a peer rank may have exited or timed out): {}", what_,
                                rank_, e.what()));
  }
}

}  // namespace scaletrain::dist
