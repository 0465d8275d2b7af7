#include "scaletrain/optim/zero_adamw.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <c10/core/DeviceGuard.h>
#include <fmt/format.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/optim/adamw.h>
#include <torch/serialize/archive.h>

#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA
#include "scaletrain/optim/adamw.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <cuda_runtime_api.h>

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace scaletrain::optim {

ZeroAdamWOptions::ZeroAdamWOptions(double lr) : lr_(lr) {}

void ZeroAdamWOptions::serialize(torch::serialize::OutputArchive& archive) const {
  archive.write("lr", at::scalar_tensor(lr_, at::kDouble));
  archive.write("beta1", at::scalar_tensor(std::get<0>(betas_), at::kDouble));
  archive.write("beta2", at::scalar_tensor(std::get<1>(betas_), at::kDouble));
  archive.write("eps", at::scalar_tensor(eps_, at::kDouble));
  archive.write("weight_decay", at::scalar_tensor(weight_decay_, at::kDouble));
}

void ZeroAdamWOptions::serialize(torch::serialize::InputArchive& archive) {
  at::Tensor value;
  archive.read("lr", value);
  lr_ = value.item<double>();
  archive.read("beta1", value);
  double beta1 = value.item<double>();
  archive.read("beta2", value);
  betas_ = std::make_tuple(beta1, value.item<double>());
  archive.read("eps", value);
  eps_ = value.item<double>();
  archive.read("weight_decay", value);
  weight_decay_ = value.item<double>();
}

namespace {

using torch::autograd::variable_list;

std::vector<torch::optim::OptimizerParamGroup> as_groups(std::vector<at::Tensor> params) {
  return {torch::optim::OptimizerParamGroup(std::move(params))};
}

void check_options(const ZeroAdamWOptions& options, int64_t group) {
  auto where = group < 0 ? std::string("ZeroAdamW") : fmt::format("ZeroAdamW param group {}", group);
  auto [beta1, beta2] = options.betas();
  if (!(options.lr() >= 0)) throw std::invalid_argument(fmt::format("{}: lr {} (expected >= 0)", where, options.lr()));
  if (!(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1)) {
    throw std::invalid_argument(fmt::format("{}: betas ({}, {}) (expected each in [0, 1))", where, beta1, beta2));
  }
  if (!(options.eps() >= 0)) throw std::invalid_argument(fmt::format("{}: eps {} (expected >= 0)", where, options.eps()));
  if (!(options.weight_decay() >= 0)) {
    throw std::invalid_argument(fmt::format("{}: weight_decay {} (expected >= 0)", where, options.weight_decay()));
  }
}

void check_whole_options(const ZeroAdamWOptions& options) {
  if (options.stage() < 1 || options.stage() > 3) {
    throw std::invalid_argument(fmt::format("ZeroAdamW: stage {} (expected 1, 2 or 3)", options.stage()));
  }
  if (options.overlap_forward() && !options.cpu_offload()) {
    throw std::invalid_argument("ZeroAdamW: overlap_forward needs cpu_offload (the step it overlaps is the CPU's)");
  }
  if (!(options.offload_fraction() > 0 && options.offload_fraction() <= 1)) {
    throw std::invalid_argument(fmt::format("ZeroAdamW: offload_fraction {} (expected a share in (0, 1])",
                                            options.offload_fraction()));
  }
  if (!(options.bucket_mb() > 0) || !std::isfinite(options.bucket_mb())) {
    throw std::invalid_argument(fmt::format("ZeroAdamW: bucket_mb {} (expected a finite number > 0)", options.bucket_mb()));
  }
  if (!(options.max_grad_norm() >= 0)) {
    throw std::invalid_argument(fmt::format("ZeroAdamW: max_grad_norm {} (expected >= 0; 0 turns clipping off)",
                                            options.max_grad_norm()));
  }
}

torch::optim::AdamWOptions adamw_options(const ZeroAdamWOptions& options) {
  return torch::optim::AdamWOptions(options.lr())
      .betas(options.betas())
      .eps(options.eps())
      .weight_decay(options.weight_decay());
}

// Offload's host state: `numel` elements, page-locked for a CUDA model. Allocated here rather than
// by torch's caching host allocator, which rounds every allocation up to a power of two (the state
// of a 5B-parameter model would ask for 32 GiB per 20 GB tensor).
at::Tensor host_empty(int64_t numel, at::ScalarType dtype, bool pinned, const char* what) {
  const auto options = at::TensorOptions().dtype(dtype);
  if (!pinned) return at::empty({numel}, options);
#ifdef SCALETRAIN_WITH_CUDA
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  void* data = nullptr;
  const cudaError_t status = cudaHostAlloc(&data, std::max<size_t>(bytes, 1), cudaHostAllocDefault);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it
    throw std::runtime_error(fmt::format(
        "ZeroAdamW: cpu_offload could not pin {:.2f} GiB of host memory for {} ({}); the offloaded state "
        "takes 16 bytes per parameter of this rank's share",
        static_cast<double>(bytes) / (1 << 30), what, cudaGetErrorString(status)));
  }
  return at::from_blob(data, {numel}, [](void* p) { (void)cudaFreeHost(p); }, options);
#else
  return at::empty({numel}, options);
#endif
}

constexpr int64_t kAlign = 64;  // elements: every parameter and chunk starts 128-byte aligned in bf16

}  // namespace

struct ZeroAdamW::Impl {
  ZeroAdamWOptions options;
  dist::ProcessGroup group;
  dist::BucketLayout layout;
  std::vector<at::Tensor> params;  // in param-group order: the layout's indices
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  int64_t world = 1;
  int64_t rank = 0;

  at::TensorOptions model_options;  // the parameters' dtype and device
  at::Tensor param_flat;   // stages 1-2: the model's parameters, padded (the parameters are views of it)
  at::Tensor grad_flat;    // stage 1: the gradients (views of it)
  at::Tensor grad_shard;   // stage 2: this rank's chunks of the reduced gradients, bucket after bucket
  // This rank's chunks' state on the model's device (with offload: of the buckets kept there).
  at::Tensor master;       // fp32 copy of this rank's chunks (undefined for an fp32 model)
  at::Tensor exp_avg;      // fp32, this rank's chunks
  at::Tensor exp_avg_sq;   // fp32
  std::vector<at::Tensor> steps;           // per bucket, one float32 element (adamw_step_'s count)
  std::vector<int64_t> shard_offset;       // per bucket: first element of its chunk in its home's shard tensors
  std::vector<std::vector<std::pair<int64_t, int64_t>>> gaps;  // per bucket: padding ranges (offset, numel) in it

  // Per-step reduction state (guarded by mutex: hooks run on autograd's threads).
  std::mutex mutex;
  bool sync = true;
  std::vector<at::Tensor> bucket_grad;     // stage 2: buffers of buckets being filled or reduced
  std::vector<bool> filled;                // stage 2: per parameter: its gradient is in its bucket
  std::vector<bool> seen;                  // per parameter: its gradient of this step arrived
  std::vector<int64_t> ready_count;
  std::vector<bool> ready;
  std::vector<dist::Work> works;
  size_t next_launch = 0;

  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::vector<uintptr_t> hook_keys;

  // Stage 3: the values live in param_shard (this rank's chunks, model dtype); each bucket has a
  // whole-bucket tensor of its own whose storage is allocated and all-gathered while its unit is
  // in use and freed after (the parameters are views of it, so they see the storage come and go;
  // autograd's saved parameters too: backward gathers before it reads them). Guarded by mutex.
  bool sharded_params = false;
  at::Tensor param_shard;
  std::vector<at::Tensor> bucket_param;          // per bucket
  std::vector<bool> gathered;                    // per bucket: storage allocated (values there or on the way)
  std::vector<dist::Work> gathering;             // per bucket: its all-gather in flight
  std::vector<std::vector<size_t>> unit_buckets; // per unit: its buckets
  std::vector<int64_t> unit_params;              // per unit: its parameters' count
  std::vector<int64_t> unit_hold;                // per unit: gather_unit() calls not yet released
  std::vector<bool> unit_backward;               // per unit: gathered for the backward in progress
  std::vector<int64_t> unit_arrived;             // per unit: gradients arrived since that gather
  std::vector<int64_t> units;                    // per parameter: its unit
  bool end_queued = false;                       // the running backward's end callback is queued

  // CPU offload: master, exp_avg and exp_avg_sq of this rank's chunks live in host memory (pinned
  // for a CUDA model) and the CPU AdamW steps them, on a worker thread that takes jobs in order:
  //   land b: wait for bucket b's reduction, copy this rank's chunk to host_grad on the copy
  //           stream, sum its squares (queued as backward launches the bucket);
  //   step b: AdamW on bucket b's chunk, its values copied back on the copy stream (and
  //           all-gathered), an event recorded (queued by step() once the norm is known).
  // The main thread waits for a bucket's step where its parameters are needed next: every one
  // at the end of step(), or (overlap_forward) each before the forward that uses it.
  struct Job {
    bool step;
    size_t bucket;
  };
  enum class Pending : uint8_t { none, queued, stepped };
  bool offload = false;
  std::vector<bool> on_host;         // per bucket: its state lives on the host (else on the device)
  at::Tensor host_master;            // fp32: the values of this rank's host chunks
  at::Tensor host_exp_avg;           // fp32
  at::Tensor host_exp_avg_sq;        // fp32
  at::Tensor host_grad;              // model dtype: this rank's reduced gradient chunks
  at::Tensor host_copy;              // model dtype (bf16/fp16 model): the stepped values, rounded, to copy back
  std::vector<at::Tensor> reduced;   // stage 2, per bucket being landed: the reduction's output on the device
  std::vector<double> squares;       // per bucket: sum of squares of this rank's landed chunk (CPU model)
  std::vector<at::Tensor> device_squares;  // per bucket: the same on the device (CUDA model)
  StepScale host_scale;              // the queued step's factor and found-inf flag (CPU)
  std::vector<torch::optim::AdamWOptions> step_options;  // per param group, as at step() (a scheduler may change lr after)
  std::vector<Pending> pending;      // per bucket: its step's state
  std::vector<dist::Work> gathers;   // per bucket stepped: the all-gather of its values (world > 1)
  std::thread worker;
  mutable std::mutex worker_mutex;   // guards the queue, counts, pending, worker_error, reduced
  std::condition_variable worker_cv;
  std::condition_variable done_cv;
  std::deque<Job> queue;
  size_t launched = 0;
  size_t landed = 0;
  bool stopping = false;
  std::exception_ptr worker_error;
#ifdef SCALETRAIN_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> copy_stream;
  std::vector<std::optional<at::cuda::CUDAEvent>> copied;  // per bucket: its copy back is done
#endif

  at::Tensor bucket_view(const at::Tensor& flat, const dist::Bucket& bucket) const {
    return flat.narrow(0, bucket.offset, bucket.numel);
  }
  // This rank's chunk of bucket b's values in the model's dtype, and the whole bucket (stage 3:
  // valid while gathered).
  at::Tensor param_chunk(size_t b) const {
    const auto& bucket = layout.buckets[b];
    // Every bucket's size is a multiple of the world size: offset / world is its chunk's place in the shard.
    return sharded_params ? param_shard.narrow(0, bucket.offset / world, bucket.chunk_numel(world)) : chunk_of(param_flat, bucket);
  }
  at::Tensor param_bucket(size_t b) const {
    return sharded_params ? bucket_param[b] : bucket_view(param_flat, layout.buckets[b]);
  }
  at::Tensor chunk_of(const at::Tensor& flat, const dist::Bucket& bucket) const {
    return flat.narrow(0, bucket.chunk_offset(rank, world), bucket.chunk_numel(world));
  }
  at::Tensor shard_chunk(const at::Tensor& shard, size_t b) const {
    return shard.narrow(0, shard_offset[b], layout.buckets[b].chunk_numel(world));
  }
  at::Tensor slot(const at::Tensor& flat_bucket, size_t b, int64_t param) const {
    const auto& p = params[static_cast<size_t>(param)];
    return flat_bucket.narrow(0, layout.param_offset[static_cast<size_t>(param)] - layout.buckets[b].offset, p.numel())
        .view(p.sizes());
  }
  // This rank's chunk of bucket b's reduced gradients: stage 1 reduces in place into its own chunk
  // of the flat gradient buffer; stage 2 into the shard tensor (the bucket buffer is released).
  at::Tensor grad_chunk(size_t b) const {
    return options.stage() == 1 ? chunk_of(grad_flat, layout.buckets[b]) : shard_chunk(grad_shard, b);  // 2, 3
  }
  // The parameters' version counters, summed: the user's in-place writes (load_state_dict, ...)
  // change it; ours go through param_flat's views, whose counter is another.
  int64_t params_version = 0;
  int64_t current_params_version() const {
    int64_t sum = 0;
    for (const auto& p : params) sum += static_cast<int64_t>(p._version());
    return sum;
  }
  // Before a step: parameters written since the last one (a model's weights loaded after the
  // optimizer's state) replace the fp32 masters, which would otherwise overwrite them.
  // Stage 3: of the gathered buckets (the others' parameters have no storage to write).
  void adopt_written_parameters() {
    const int64_t version = current_params_version();
    if (version == params_version) return;
    for (size_t b = 0; b < layout.buckets.size(); ++b) {
      if (sharded_params) {
        if (!gathered[b]) continue;
        wait_gathered(b);
        param_chunk(b).copy_(own_chunk(b));
      }
      at::Tensor value = master_of(b);
      if (value.defined()) value.copy_(param_chunk(b));
    }
    params_version = version;
  }

  // ---- Stage 3: gathering and freeing parameters ----
  // This rank's chunk of gathered bucket b (bucket_param's offsets are the bucket's own).
  at::Tensor own_chunk(size_t b) const {
    const int64_t chunk = layout.buckets[b].chunk_numel(world);
    return bucket_param[b].narrow(0, rank * chunk, chunk);
  }
  void set_storage(size_t b, bool allocate) {
    c10::DeviceGuard on_device(device);  // the caching allocator allocates on the current device's stream
    c10::StorageImpl* storage = bucket_param[b].storage().unsafeGetStorageImpl();
    const size_t nbytes = allocate ? bucket_param[b].nbytes() : 0;
    storage->set_data_ptr_noswap(allocate ? storage->allocator()->allocate(nbytes) : at::DataPtr(nullptr, device));
    storage->set_nbytes(nbytes);
  }
  // Starts bucket b's all-gather (its storage allocated on the current stream) unless it is there.
  void start_gather(size_t b) {
    if (gathered[b]) return;
    if (offload) wait_stepped(b);  // its values are this step's
    set_storage(b, true);
    // The whole bucket's chunk r comes from rank r's param_shard chunk (bucket_param's own chunk
    // offsets are bucket-relative).
    try {
      gathering[b] = group.all_gather(bucket_param[b], param_chunk(b));  // NOLINT: bucket_param[b] is an lvalue
    } catch (...) {
      set_storage(b, false);
      throw;
    }
    gathered[b] = true;
  }
  // Offload: bucket b's CPU step is still queued (a prefetch would wait for it).
  bool step_pending(size_t b) {
    if (!offload) return false;
    std::lock_guard<std::mutex> lock(worker_mutex);
    return !pending.empty() && pending[b] == Pending::queued;
  }
  void wait_gathered(size_t b) {
    dist::Work work = std::move(gathering[b]);
    gathering[b] = dist::Work();
    work.wait();
  }
  void free_bucket(size_t b) {
    if (!gathered[b]) return;
    wait_gathered(b);  // the collective is done with the storage
    set_storage(b, false);
    gathered[b] = false;
  }
  void check_unit(int64_t unit, const char* what) const {
    if (unit < 0 || unit >= static_cast<int64_t>(unit_buckets.size())) {
      throw std::invalid_argument(fmt::format("ZeroAdamW::{}: unit {} (expected 0 to {})", what, unit,
                                              static_cast<int64_t>(unit_buckets.size()) - 1));
    }
  }
  // Not a bucket whose CPU step is still running (overlap_forward): its gather waits for it then.
  void prefetch_unit(int64_t unit) {
    if (unit < 0 || unit >= static_cast<int64_t>(unit_buckets.size())) return;
    for (size_t b : unit_buckets[static_cast<size_t>(unit)]) {
      if (!step_pending(b)) start_gather(b);
    }
  }
  // Caller holds mutex.
  void gather_unit_locked(int64_t unit, int64_t prefetch) {
    for (size_t b : unit_buckets[static_cast<size_t>(unit)]) start_gather(b);
    prefetch_unit(prefetch);  // issued before this unit's wait: it overlaps the compute that follows
    for (size_t b : unit_buckets[static_cast<size_t>(unit)]) wait_gathered(b);
  }
  void maybe_free_unit(int64_t unit) {
    auto u = static_cast<size_t>(unit);
    if (unit_hold[u] > 0 || unit_backward[u]) return;
    for (size_t b : unit_buckets[u]) free_bucket(b);
  }
  // Backward reaches a forward that used `unit`: gather it for the backward (until its last
  // gradient arrives, or the backward ends) and prefetch `prefetch`, the unit backward needs next.
  void prepare_backward(int64_t unit, int64_t prefetch) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!end_queued && torch::autograd::get_current_graph_task_id() != -1) {
      // At the end of this backward every hold it took ends (a unit with a parameter that got no
      // gradient would otherwise stay gathered into the next backward).
      end_queued = true;
      torch::autograd::Engine::get_default_engine().queue_callback([this] { end_backward(); });
    }
    auto u = static_cast<size_t>(unit);
    if (!unit_backward[u]) {
      unit_backward[u] = true;
      unit_arrived[u] = 0;
    }
    gather_unit_locked(unit, prefetch);
  }
  void end_backward() {
    std::lock_guard<std::mutex> lock(mutex);
    end_queued = false;
    end_backward_holds();
  }
  // Caller holds mutex.
  void end_backward_holds() {
    for (size_t u = 0; u < unit_backward.size(); ++u) {
      if (!unit_backward[u]) continue;
      unit_backward[u] = false;
      maybe_free_unit(static_cast<int64_t>(u));
    }
  }
  // A gradient of `index` arrived: its unit is freed after its last one (caller holds mutex).
  void count_arrival(int64_t index) {
    auto u = static_cast<size_t>(units[static_cast<size_t>(index)]);
    if (!unit_backward[u]) return;
    if (++unit_arrived[u] < unit_params[u]) return;
    unit_backward[u] = false;
    maybe_free_unit(static_cast<int64_t>(u));
  }
  // After a step: units not held are freed (a backward hold whose unit got no gradient ends too);
  // held ones get the new values.
  void refresh_after_step() {
    std::lock_guard<std::mutex> lock(mutex);
    std::fill(unit_backward.begin(), unit_backward.end(), false);
    for (size_t u = 0; u < unit_buckets.size(); ++u) {
      if (unit_hold[u] > 0) {
        for (size_t b : unit_buckets[u]) {
          free_bucket(b);
          start_gather(b);
        }
      } else {
        maybe_free_unit(static_cast<int64_t>(u));
      }
    }
    for (size_t b = 0; b < layout.buckets.size(); ++b) {
      if (gathered[b]) wait_gathered(b);
    }
  }

  // Bucket b's chunk of the optimizer state, wherever it lives (master: undefined when none).
  at::Tensor exp_avg_of(size_t b) const { return shard_chunk(on_host[b] ? host_exp_avg : exp_avg, b); }
  at::Tensor exp_avg_sq_of(size_t b) const { return shard_chunk(on_host[b] ? host_exp_avg_sq : exp_avg_sq, b); }
  at::Tensor master_of(size_t b) const {
    const at::Tensor& home = on_host[b] ? host_master : master;
    return home.defined() ? shard_chunk(home, b) : at::Tensor();
  }
  // Parameter i's slot in the whole flat buffer `flat` (parameters or stage-1 gradients).
  at::Tensor param_view(const at::Tensor& flat, size_t i) const {
    return flat.narrow(0, layout.param_offset[i], params[i].numel()).view(params[i].sizes());
  }

  void reset_step_state() {
    size_t n = layout.buckets.size();
    ready_count.assign(n, 0);
    ready.assign(n, false);
    works.clear();
    works.resize(n);
    bucket_grad.assign(n, at::Tensor());
    filled.assign(params.size(), false);
    next_launch = 0;
    seen.assign(params.size(), false);
    if (offload) {  // the worker is idle: every launched bucket has landed
      std::lock_guard<std::mutex> lock(worker_mutex);
      reduced.assign(n, at::Tensor());
      squares.assign(n, 0.0);
      device_squares.assign(n, at::Tensor());
      launched = landed = 0;
      if (pending.empty()) pending.assign(n, Pending::none);
      if (gathers.empty()) gathers.resize(n);
#ifdef SCALETRAIN_WITH_CUDA
      if (copied.empty()) copied.resize(n);
#endif
    }
  }

  // Stage 2: the bucket's buffer, allocated on first use with its padding zeroed.
  at::Tensor& stage2_buffer(size_t b) {
    if (!bucket_grad[b].defined()) {
      bucket_grad[b] = at::empty({layout.buckets[b].numel}, model_options);
      for (auto [offset, numel] : gaps[b]) bucket_grad[b].narrow(0, offset, numel).zero_();
    }
    return bucket_grad[b];
  }

  // Moves parameter `index`'s gradient into the bucket (stage 2) or checks it is still the flat
  // buffer's view (stage 1: a user may have replaced or dropped it).
  void collect(size_t b, int64_t index) {
    auto& param = params[static_cast<size_t>(index)];
    const at::Tensor& grad = param.grad();
    if (options.stage() >= 2) {
      if (filled[static_cast<size_t>(index)]) return;
      at::Tensor target = slot(stage2_buffer(b), b, index);
      if (grad.defined()) {
        target.copy_(grad);
        param.mutable_grad().reset();
      } else {
        target.zero_();
      }
      filled[static_cast<size_t>(index)] = true;
      return;
    }
    at::Tensor target = param_view(grad_flat, static_cast<size_t>(index));
    if (grad.defined() && grad.data_ptr() == target.data_ptr()) return;
    if (grad.defined()) {
      target.copy_(grad);
    } else {
      target.zero_();
    }
    param.mutable_grad() = target;
  }

  void launch(size_t b) {
    // Offload: the last step's all-gathers are issued before this step's reductions, in this order
    // on every rank.
    if (offload) wait_all_stepped();
    const auto& bucket = layout.buckets[b];
    at::Tensor input = options.stage() >= 2 ? stage2_buffer(b) : bucket_view(grad_flat, bucket);
    at::Tensor output;
    if (offload && options.stage() >= 2 && on_host[b]) {
      output = at::empty({bucket.chunk_numel(world)}, model_options);
      // A CPU model's worker copies it from reduced[b] (and lets go); a CUDA model's copy stream
      // keeps it alive by record_stream, so that it returns to the allocator as soon as it is copied.
      bool on_copy_stream = false;
#ifdef SCALETRAIN_WITH_CUDA
      on_copy_stream = copy_stream.has_value();
#endif
      if (!on_copy_stream) {
        std::lock_guard<std::mutex> lock(worker_mutex);
        reduced[b] = output;
      }
    } else {
      output = grad_chunk(b);
    }
    works[b] = group.reduce_scatter(output, input);
    // Stage 2: the collective keeps its input alive until it is waited for (Gloo's work holds it;
    // NCCL's until wait(), on the compute stream in finish_reduction or on the copy stream, which
    // then records it, in land_on_copy_stream); this rank lets go, so only the buckets in flight
    // hold memory.
    bucket_grad[b] = at::Tensor();
    if (offload) {
#ifdef SCALETRAIN_WITH_CUDA
      if (copy_stream) {
        land_on_copy_stream(b, input, output);
        return;
      }
#endif
      {
        std::lock_guard<std::mutex> lock(worker_mutex);
        queue.push_back({false, b});
        ++launched;
      }
      worker_cv.notify_one();
    }
  }

#ifdef SCALETRAIN_WITH_CUDA
  // Offload of a CUDA model, as bucket b is launched: queues on the copy stream, behind the
  // reduction, the sum of squares of this rank's chunk (on the device) and its copy to the host.
  // Nothing waits here; step() synchronises once.
  void land_on_copy_stream(size_t b, const at::Tensor& input, const at::Tensor& output) {
    RECORD_FUNCTION("ZeroAdamW::land", std::vector<c10::IValue>());
    at::cuda::CUDAEvent queued;  // a group of one reduces by a copy on the compute stream
    queued.record(c10::cuda::getCurrentCUDAStream(device.index()));
    queued.block(*copy_stream);
    c10::cuda::CUDAStreamGuard on_copy_stream(*copy_stream);
    works[b].wait();  // NCCL: the copy stream waits for the reduction
    // ProcessGroupNCCL lets go of the collective's tensors at wait(), trusting the stream that
    // waited (this one); stage 2's input was allocated on the compute stream, which must not
    // reuse it before the reduction has read it.
    if (options.stage() >= 2) input.record_stream(*copy_stream);
    device_squares[b] = at::linalg_vector_norm(output, 2, std::nullopt, false, at::kFloat).square();
    if (!on_host[b]) return;  // stepped on the device
    shard_chunk(host_grad, b).copy_(output, /*non_blocking=*/true);
    // Stage 2's buffer was allocated on the compute stream: not reused before the copy is done.
    if (options.stage() >= 2) output.record_stream(*copy_stream);
  }
#endif

  // Offload of a CPU model, on the worker thread: bucket b's chunk of reduced gradients to the host.
  void land(size_t b) {
    RECORD_FUNCTION("ZeroAdamW::land", std::vector<c10::IValue>());
    works[b].wait();  // Gloo: this thread waits
    at::Tensor source;
    {
      std::lock_guard<std::mutex> lock(worker_mutex);
      source = options.stage() == 1 ? chunk_of(grad_flat, layout.buckets[b]) : on_host[b] ? reduced[b] : grad_chunk(b);
    }
    if (on_host[b]) shard_chunk(host_grad, b).copy_(source);
    double norm = at::linalg_vector_norm(source, 2, std::nullopt, false, at::kFloat).item<double>();
    std::lock_guard<std::mutex> lock(worker_mutex);
    squares[b] = norm * norm;
    reduced[b] = at::Tensor();  // stage 2: the device buffer goes back to the allocator
  }

  // Offload, on the worker thread (the copy stream current): bucket b's AdamW step on the host and
  // its values back to the device.
  void step_bucket(size_t b) {
    RECORD_FUNCTION("ZeroAdamW::step_bucket", std::vector<c10::IValue>());
    const auto& bucket = layout.buckets[b];
    at::Tensor value = shard_chunk(host_master, b);
    at::Tensor copy = host_copy.defined() ? shard_chunk(host_copy, b) : at::Tensor();
    adamw_step_({value}, {shard_chunk(host_grad, b)}, {shard_chunk(host_exp_avg, b)}, {shard_chunk(host_exp_avg_sq, b)},
                {steps[b]}, {copy}, step_options[static_cast<size_t>(bucket.group)], host_scale);
    at::Tensor chunk = param_chunk(b);
    chunk.copy_(copy.defined() ? copy : value, /*non_blocking=*/true);
    // Stage 3 gathers when the parameters are next needed (start_gather waits for this step).
    if (world > 1 && !sharded_params) {
      at::Tensor whole = param_bucket(b);
      gathers[b] = group.all_gather(whole, chunk);  // NCCL: after the copy (the copy stream is current)
    }
#ifdef SCALETRAIN_WITH_CUDA
    if (copy_stream) {
      copied[b].emplace();
      copied[b]->record(*copy_stream);
    }
#endif
  }

  void worker_loop() {
    at::NoGradGuard no_grad;
#ifdef SCALETRAIN_WITH_CUDA
    std::optional<c10::cuda::CUDAStreamGuard> on_copy_stream;
    if (copy_stream) on_copy_stream.emplace(*copy_stream);
#endif
    for (;;) {
      Job job{};
      {
        std::unique_lock<std::mutex> lock(worker_mutex);
        worker_cv.wait(lock, [this] { return stopping || !queue.empty(); });
        if (stopping) return;
        job = queue.front();
        queue.pop_front();
      }
      try {
        if (job.step) {
          step_bucket(job.bucket);
        } else {
          land(job.bucket);
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(worker_mutex);
        if (!worker_error) worker_error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(worker_mutex);
        if (job.step) {
          pending[job.bucket] = Pending::stepped;
        } else {
          ++landed;
        }
      }
      done_cv.notify_all();
    }
  }

  void rethrow_worker_error() {
    if (worker_error) {
      auto error = std::exchange(worker_error, nullptr);
      std::rethrow_exception(error);
    }
  }

  // Offload: waits until every launched bucket has landed; rethrows the first failure.
  void wait_landed() {
    std::unique_lock<std::mutex> lock(worker_mutex);
    done_cv.wait(lock, [this] { return landed == launched; });
    rethrow_worker_error();
  }

  // Offload: waits for bucket b's queued step; the current stream then waits for its copy back
  // and all-gather (the host does not). Nothing to do when no step of it is pending.
  void wait_stepped(size_t b) {
    dist::Work gather;
    {
      std::unique_lock<std::mutex> lock(worker_mutex);
      if (pending.empty() || pending[b] == Pending::none) return;
      done_cv.wait(lock, [this, b] { return pending[b] == Pending::stepped; });
      pending[b] = Pending::none;
      gather = std::move(gathers[b]);
    }
    // This bucket's copy back and all-gather first, even when another bucket's job failed.
#ifdef SCALETRAIN_WITH_CUDA
    if (copied[b]) copied[b]->block(c10::cuda::getCurrentCUDAStream(device.index()));
#endif
    gather.wait();
    std::lock_guard<std::mutex> lock(worker_mutex);
    rethrow_worker_error();
  }

  void wait_all_stepped() {
    if (!offload) return;
    {
      std::lock_guard<std::mutex> lock(worker_mutex);
      if (std::all_of(pending.begin(), pending.end(), [](Pending p) { return p == Pending::none; })) return;
    }
    for (size_t b = 0; b < layout.buckets.size(); ++b) wait_stepped(b);
  }

  // AdamW on this rank's chunks of the buckets whose state is on the device (every bucket without
  // offload), one call per param group; then their all-gathers (returned, not waited for).
  std::vector<dist::Work> step_device_buckets(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                                              const StepScale& scale) {
    for (size_t g = 0; g < groups.size(); ++g) {
      const auto& options = static_cast<const ZeroAdamWOptions&>(groups[g].options());
      std::vector<at::Tensor> values, grads, exp_avgs, exp_avg_sqs, bucket_steps, copies;
      for (size_t b = 0; b < layout.buckets.size(); ++b) {
        if (layout.buckets[b].group != static_cast<int64_t>(g) || on_host[b]) continue;
        at::Tensor model_chunk = param_chunk(b);
        if (master.defined()) {
          values.push_back(shard_chunk(master, b));
          copies.push_back(model_chunk);
        } else {
          values.push_back(model_chunk);
          copies.emplace_back();
        }
        grads.push_back(grad_chunk(b));
        exp_avgs.push_back(shard_chunk(exp_avg, b));
        exp_avg_sqs.push_back(shard_chunk(exp_avg_sq, b));
        bucket_steps.push_back(steps[b]);
      }
      if (!values.empty()) {
        adamw_step_(values, grads, exp_avgs, exp_avg_sqs, bucket_steps, copies, adamw_options(options), scale);
      }
    }
    // Every rank's updated chunks to every rank (stage 3: when next needed).
    std::vector<dist::Work> gathers;
    if (sharded_params) return gathers;
    for (size_t b = 0; b < layout.buckets.size(); ++b) {
      if (on_host[b]) continue;
      at::Tensor whole = param_bucket(b);
      gathers.push_back(group.all_gather(whole, param_chunk(b)));
    }
    return gathers;
  }

  // Offload: this rank's sum of squares of the landed gradients (one float32 element on the
  // model's device). A CUDA model's compute stream then waits for every copy to the host.
  at::Tensor landed_squares() {
#ifdef SCALETRAIN_WITH_CUDA
    if (copy_stream) {
      // finish_reduction() made the compute stream wait for the copy stream.
      return at::stack(device_squares).sum().reshape({1});
    }
#endif
    double local = 0;
    for (double q : squares) local += q;
    return at::full({1}, local, at::TensorOptions().dtype(at::kFloat).device(device));
  }

  // Offload: queues the step of every bucket, from the model's first parameters (the next
  // forward's first need).
  void queue_steps(const std::vector<torch::optim::OptimizerParamGroup>& groups, const StepScale& scale) {
#ifdef SCALETRAIN_WITH_CUDA
    // The gradients' copies to the host are done (the norm's read waited for them already; this
    // keeps it so whatever the norm's arithmetic becomes).
    if (copy_stream) copy_stream->synchronize();
#endif
    host_scale = scale;
    step_options.clear();
    for (const auto& g : groups) step_options.push_back(adamw_options(static_cast<const ZeroAdamWOptions&>(g.options())));
#ifdef SCALETRAIN_WITH_CUDA
    if (copy_stream) {
      // The copies back come after whatever the compute stream has queued (backward's last reads
      // of the parameters).
      at::cuda::CUDAEvent queued;
      queued.record(c10::cuda::getCurrentCUDAStream(device.index()));
      queued.block(*copy_stream);
    }
#endif
    {
      std::lock_guard<std::mutex> lock(worker_mutex);
      for (size_t b = layout.buckets.size(); b-- > 0;) {
        if (!on_host[b]) continue;
        pending[b] = Pending::queued;
        queue.push_back({true, b});
      }
    }
    worker_cv.notify_one();
  }

  void stop_worker() {
    if (!worker.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(worker_mutex);
      stopping = true;
    }
    worker_cv.notify_all();
    worker.join();
  }

  void launch_ready_in_order() {
    while (next_launch < layout.buckets.size() && ready[next_launch]) {
      launch(next_launch);
      ++next_launch;
    }
  }

  // Autograd post-hook of parameter `index`: its gradient for this backward is complete.
  void on_gradient(int64_t index) {
    std::lock_guard<std::mutex> lock(mutex);
    if (sharded_params) count_arrival(index);
    if (!sync) {
      if (seen[static_cast<size_t>(index)]) {
        throw std::logic_error(fmt::format(
            "ZeroAdamW: parameter {} received a gradient with gradient sync off after a backward with sync on, "
            "before step(); turn sync on for the last micro-step only",
            index));
      }
      return;
    }
    auto b = static_cast<size_t>(layout.param_bucket[static_cast<size_t>(index)]);
    if (seen[static_cast<size_t>(index)]) {
      // Its bucket may be reduced already: this gradient would be lost or reduced twice.
      throw std::logic_error(fmt::format(
          "ZeroAdamW: parameter {} received a second gradient with gradient sync on before step(); "
          "call set_gradient_sync(false) before every micro-step but the last",
          index));
    }
    seen[static_cast<size_t>(index)] = true;
    collect(b, index);
    if (++ready_count[b] == static_cast<int64_t>(layout.buckets[b].params.size())) {
      ready[b] = true;
      launch_ready_in_order();
    }
  }

  // Completes every bucket's reduction (collecting gradients backward did not announce).
  void finish_reduction() {
    std::lock_guard<std::mutex> lock(mutex);
    for (size_t b = next_launch; b < layout.buckets.size(); ++b) {
      if (!ready[b]) {
        for (int64_t index : layout.buckets[b].params) collect(b, index);
        ready[b] = true;
      }
    }
    launch_ready_in_order();
    if (offload) {
      wait_landed();
#ifdef SCALETRAIN_WITH_CUDA
      if (copy_stream) {  // the compute stream's next writes (zero_grad, a step) after the copies
        at::cuda::CUDAEvent landed_all;
        landed_all.record(*copy_stream);
        landed_all.block(c10::cuda::getCurrentCUDAStream(device.index()));
      }
#endif
    } else {
      for (auto& work : works) work.wait();
    }
    bucket_grad.assign(layout.buckets.size(), at::Tensor());  // stage 2: release the bucket buffers
  }

};

ZeroAdamW::ZeroAdamW(std::vector<at::Tensor> params, ZeroAdamWOptions defaults, dist::ProcessGroup group,
                     std::vector<int64_t> units)
    : ZeroAdamW(as_groups(std::move(params)), std::move(defaults), std::move(group), std::move(units)) {}

ZeroAdamW::ZeroAdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, ZeroAdamWOptions defaults,
                     dist::ProcessGroup group, std::vector<int64_t> units)
    : torch::optim::Optimizer(param_groups, std::make_unique<ZeroAdamWOptions>(defaults)),
      impl_(std::make_unique<Impl>()) {
  check_options(defaults, -1);
  check_whole_options(defaults);
  Impl& s = *impl_;
  s.options = defaults;
  s.group = std::move(group);
  s.world = s.group.size();
  s.rank = s.group.rank();

  std::vector<int64_t> numels;
  std::vector<int64_t> group_of;
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    check_options(static_cast<const ZeroAdamWOptions&>(param_groups_[g].options()), static_cast<int64_t>(g));
    for (const auto& param : param_groups_[g].params()) {
      auto index = s.params.size();
      if (!param.defined() || !param.requires_grad()) {
        throw std::invalid_argument(fmt::format("ZeroAdamW: parameter {} must be defined and require grad", index));
      }
      if (!param.is_contiguous()) throw std::invalid_argument(fmt::format("ZeroAdamW: parameter {} must be contiguous", index));
      auto dtype = param.scalar_type();
      if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) {
        throw std::invalid_argument(fmt::format("ZeroAdamW: parameter {} is {} (expected float32, bfloat16 or float16)",
                                                index, c10::toString(dtype)));
      }
      if (index == 0) {
        s.dtype = dtype;
        s.device = param.device();
      } else if (dtype != s.dtype || param.device() != s.device) {
        throw std::invalid_argument(fmt::format(
            "ZeroAdamW: parameter {} is {} on {}, parameter 0 {} on {} (expected one dtype and one device)", index,
            c10::toString(dtype), param.device().str(), c10::toString(s.dtype), s.device.str()));
      }
      if (param.numel() == 0) throw std::invalid_argument(fmt::format("ZeroAdamW: parameter {} is empty", index));
      if (!param.is_leaf()) throw std::invalid_argument(fmt::format("ZeroAdamW: parameter {} is not a leaf tensor", index));
      for (size_t j = 0; j < s.params.size(); ++j) {
        if (s.params[j].unsafeGetTensorImpl() == param.unsafeGetTensorImpl()) {
          throw std::invalid_argument(
              fmt::format("ZeroAdamW: parameters {} and {} are the same tensor (pass tied weights once)", j, index));
        }
      }
      s.params.push_back(param);
      numels.push_back(param.numel());
      group_of.push_back(static_cast<int64_t>(g));
    }
  }
  if (s.params.empty()) throw std::invalid_argument("ZeroAdamW: no parameters");
  std::string backend = s.group.backend_name();
  if ((backend == "gloo" && !s.device.is_cpu()) || (backend == "nccl" && !s.device.is_cuda())) {
    throw std::invalid_argument(fmt::format("ZeroAdamW: parameters on {} with a {} process group (expected {} tensors)",
                                            s.device.str(), backend, backend == "gloo" ? "CPU" : "CUDA"));
  }

  // Stage 3's units: one per parameter unless given.
  s.sharded_params = defaults.stage() == 3;
  if (!units.empty() && units.size() != s.params.size()) {
    throw std::invalid_argument(fmt::format("ZeroAdamW: {} units for {} parameters (expected one per parameter, or none)",
                                            units.size(), s.params.size()));
  }
  for (size_t i = 0; i < units.size(); ++i) {
    if (units[i] < 0) throw std::invalid_argument(fmt::format("ZeroAdamW: parameter {} in unit {} (expected >= 0)", i, units[i]));
  }
  if (s.sharded_params) {
    if (units.empty()) {
      for (size_t i = 0; i < s.params.size(); ++i) units.push_back(static_cast<int64_t>(i));
    }
    s.units = units;
  }

  auto element = static_cast<int64_t>(c10::elementSize(s.dtype));
  auto bucket_numel = std::max<int64_t>(1, static_cast<int64_t>(defaults.bucket_mb() * 1024 * 1024) / element);
  s.layout = dist::plan_buckets(numels, group_of, bucket_numel, s.world, kAlign, s.units);

  // The flat parameter buffer: copy the parameters in and make them views of it.
  auto model_options = at::TensorOptions().dtype(s.dtype).device(s.device);
  s.model_options = model_options;
  s.param_flat = at::zeros({s.layout.total_numel}, model_options);
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < s.params.size(); ++i) {
      at::Tensor view = s.param_view(s.param_flat, i);
      view.copy_(s.params[i]);
      s.params[i].set_data(view);
    }
  }
  if (defaults.broadcast_parameters()) s.group.broadcast(s.param_flat, 0).wait();
  if (s.sharded_params) {
    // Stage 3: this rank keeps its chunks; each bucket gets a tensor of its own, the parameters
    // become views of it, and its storage is freed until its unit is gathered.
    const size_t n = s.layout.buckets.size();
    at::NoGradGuard no_grad;
    s.param_shard = at::empty({s.layout.shard_numel()}, model_options);
    s.bucket_param.resize(n);
    s.gathered.assign(n, false);
    s.gathering.resize(n);
    for (size_t b = 0; b < n; ++b) {
      const auto& bucket = s.layout.buckets[b];
      s.param_chunk(b).copy_(s.chunk_of(s.param_flat, bucket));
      // A tensor of the bucket's size whose storage is freed at once (no second copy of the model).
      s.bucket_param[b] = at::empty({bucket.numel}, model_options);
      for (int64_t index : bucket.params) {
        s.params[static_cast<size_t>(index)].set_data(s.slot(s.bucket_param[b], b, index));
      }
      s.set_storage(b, false);
    }
    s.param_flat = at::Tensor();
    int64_t unit_count = 0;
    for (int64_t u : s.units) unit_count = std::max(unit_count, u + 1);
    s.unit_buckets.resize(static_cast<size_t>(unit_count));
    s.unit_params.assign(static_cast<size_t>(unit_count), 0);
    for (size_t b = 0; b < n; ++b) {
      s.unit_buckets[static_cast<size_t>(s.layout.buckets[b].unit)].push_back(b);
      s.unit_params[static_cast<size_t>(s.layout.buckets[b].unit)] += static_cast<int64_t>(s.layout.buckets[b].params.size());
    }
    s.unit_hold.assign(static_cast<size_t>(unit_count), 0);
    s.unit_backward.assign(static_cast<size_t>(unit_count), false);
    s.unit_arrived.assign(static_cast<size_t>(unit_count), 0);
  }

  // This rank's chunks: where each bucket's state lives and where its chunk sits in that home's
  // shard tensors, and the padding. Offload keeps on the device the buckets the next forward needs
  // first (layout order reversed), up to 1 - offload_fraction of the shard, rounded up to buckets.
  s.offload = defaults.cpu_offload();
  int64_t shard_total = 0;
  for (const auto& bucket : s.layout.buckets) shard_total += bucket.chunk_numel(s.world);
  s.on_host.assign(s.layout.buckets.size(), false);
  if (s.offload) {
    const double keep = (1.0 - defaults.offload_fraction()) * static_cast<double>(shard_total);
    int64_t kept = 0;
    for (size_t b = s.layout.buckets.size(); b-- > 0;) {
      s.on_host[b] = !(static_cast<double>(kept) < keep);
      if (!s.on_host[b]) kept += s.layout.buckets[b].chunk_numel(s.world);
    }
  }
  int64_t device_numel = 0;
  int64_t host_numel = 0;
  s.gaps.resize(s.layout.buckets.size());
  for (size_t b = 0; b < s.layout.buckets.size(); ++b) {
    const auto& bucket = s.layout.buckets[b];
    int64_t& home_numel = s.on_host[b] ? host_numel : device_numel;
    s.shard_offset.push_back(home_numel);
    home_numel += bucket.chunk_numel(s.world);
    int64_t cursor = 0;
    std::vector<std::pair<int64_t, int64_t>> by_offset;
    for (int64_t index : bucket.params) {
      by_offset.emplace_back(s.layout.param_offset[static_cast<size_t>(index)] - bucket.offset,
                             s.params[static_cast<size_t>(index)].numel());
    }
    for (auto [offset, numel] : by_offset) {
      if (offset > cursor) s.gaps[b].emplace_back(cursor, offset - cursor);
      cursor = offset + numel;
    }
    if (bucket.numel > cursor) s.gaps[b].emplace_back(cursor, bucket.numel - cursor);
  }
  // The device's state, and the host's (pinned for a CUDA model).
  auto fp32 = at::TensorOptions().dtype(at::kFloat).device(s.device);
  auto host = at::TensorOptions().dtype(at::kFloat).pinned_memory(s.device.is_cuda());
  if (device_numel > 0) {
    if (defaults.stage() >= 2) s.grad_shard = at::zeros({device_numel}, model_options);
    s.exp_avg = at::zeros({device_numel}, fp32);
    s.exp_avg_sq = at::zeros({device_numel}, fp32);
    if (s.dtype != at::kFloat) s.master = at::empty({device_numel}, fp32);
  }
  if (host_numel > 0) {
    const bool pinned = s.device.is_cuda();
    s.host_exp_avg = host_empty(host_numel, at::kFloat, pinned, "exp_avg").zero_();
    s.host_exp_avg_sq = host_empty(host_numel, at::kFloat, pinned, "exp_avg_sq").zero_();
    s.host_master = host_empty(host_numel, at::kFloat, pinned, "the fp32 master");
    s.host_grad = host_empty(host_numel, s.dtype, pinned, "the gradient chunks").zero_();
    if (s.dtype != at::kFloat) s.host_copy = host_empty(host_numel, s.dtype, pinned, "the values to copy back");
  }
  for (size_t b = 0; b < s.layout.buckets.size(); ++b) {
    at::Tensor value = s.master_of(b);
    if (value.defined()) value.copy_(s.param_chunk(b));
    s.steps.push_back(at::zeros({1}, s.on_host[b] ? host : fp32));
  }
#ifdef SCALETRAIN_WITH_CUDA
  if (s.offload && s.device.is_cuda()) {
    s.copy_stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, s.device.index());
  }
#endif
  if (defaults.stage() == 1) {
    s.grad_flat = at::zeros({s.layout.total_numel}, model_options);
    for (size_t i = 0; i < s.params.size(); ++i) {
      s.params[i].mutable_grad() = s.param_view(s.grad_flat, i);
    }
  }
  s.params_version = s.current_params_version();
  s.reset_step_state();
  if (s.offload) {
    Impl* impl = impl_.get();
    s.worker = std::thread([impl] { impl->worker_loop(); });
  }

  // A post-hook on each parameter's gradient accumulator: it runs once backward has added the
  // parameter's gradient into .grad.
  for (size_t i = 0; i < s.params.size(); ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(s.params[i]);
    if (!accumulator) throw std::invalid_argument(fmt::format("ZeroAdamW: parameter {} has no gradient accumulator", i));
    auto index = static_cast<int64_t>(i);
    Impl* impl = impl_.get();
    s.hook_keys.push_back(accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [impl, index](const variable_list& outputs, const variable_list&) {
          impl->on_gradient(index);
          return outputs;
        })));
    s.accumulators.push_back(std::move(accumulator));
  }
}

ZeroAdamW::~ZeroAdamW() {
  for (size_t i = 0; i < impl_->hook_keys.size(); ++i) impl_->accumulators[i]->del_post_hook(impl_->hook_keys[i]);
  try {
    impl_->wait_all_stepped();
  } catch (const std::exception&) {
  }
  impl_->stop_worker();
  auto quietly_wait = [](dist::Work& work) {
    try {
      work.wait();  // buffers stay alive until the backend is done with them
    } catch (const std::exception&) {
    }
  };
  for (auto& work : impl_->works) quietly_wait(work);
  for (auto& work : impl_->gathering) quietly_wait(work);
}

void ZeroAdamW::set_gradient_sync(bool sync) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->sync = sync;
}

bool ZeroAdamW::gradient_sync() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->sync;
}
const dist::BucketLayout& ZeroAdamW::layout() const { return impl_->layout; }
const dist::ProcessGroup& ZeroAdamW::process_group() const { return impl_->group; }

void ZeroAdamW::zero_grad(bool /*set_to_none*/) {
  Impl& s = *impl_;
  // Reductions of this step already launched (a backward without step(), e.g. a skipped batch)
  // are completed, so that every rank runs the same collectives in the same order.
  bool started = false;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    started = s.next_launch > 0 || std::find(s.seen.begin(), s.seen.end(), true) != s.seen.end();
  }
  if (started) s.finish_reduction();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.options.stage() == 1) {
    s.grad_flat.zero_();
    for (size_t i = 0; i < s.params.size(); ++i) {
      at::Tensor view = s.param_view(s.grad_flat, i);
      if (!s.params[i].grad().defined() || s.params[i].grad().data_ptr() != view.data_ptr()) {
        s.params[i].mutable_grad() = view;
      }
    }
  } else {
    for (auto& param : s.params) param.mutable_grad().reset();
  }
  s.end_backward_holds();  // stage 3: holds of a backward that gathered outside autograd's engine
  s.reset_step_state();
}

at::Tensor ZeroAdamW::step(LossClosure closure) {
  at::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  step_scaled(at::Tensor());
  return loss;
}

ZeroStepResult ZeroAdamW::step_scaled(const at::Tensor& inv_scale) {
  at::NoGradGuard no_grad;
  Impl& s = *impl_;
  if (inv_scale.defined() && (inv_scale.numel() != 1 || inv_scale.device() != s.device)) {
    throw std::invalid_argument(fmt::format("ZeroAdamW::step_scaled: inv_scale must be one element on {} (got {} on {})",
                                            s.device.str(), inv_scale.numel(), inv_scale.device().str()));
  }
  s.wait_all_stepped();
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.adopt_written_parameters();
  }
  s.finish_reduction();

  // The global norm: this rank's sum of squares (fp32), summed over ranks.
  at::Tensor squares;
  if (s.offload) {
    squares = s.landed_squares();
  } else {
    std::vector<at::Tensor> chunks;
    for (size_t b = 0; b < s.layout.buckets.size(); ++b) chunks.push_back(s.grad_chunk(b));
    squares = at::stack(at::_foreach_norm(chunks, 2, at::kFloat)).square().sum().reshape({1});
  }
  s.group.all_reduce(squares).wait();
  // Offload: the scale arithmetic runs where the step does, on the host.
  const at::Device step_device = s.offload ? at::Device(at::kCPU) : s.device;
  squares = squares.to(step_device);
  auto fp32 = at::TensorOptions().dtype(at::kFloat).device(step_device);
  at::Tensor grad_scale = at::ones({1}, fp32);
  if (s.options.average_gradients()) grad_scale.fill_(1.0 / static_cast<double>(s.world));
  if (inv_scale.defined()) grad_scale = grad_scale * inv_scale.to(step_device, at::kFloat);
  ZeroStepResult result;
  result.norm = squares.sqrt() * grad_scale;
  result.found_inf = at::isfinite(result.norm).logical_not().to(at::kFloat);
  at::Tensor factor = grad_scale;
  if (s.options.max_grad_norm() > 0) {
    factor = grad_scale * (s.options.max_grad_norm() / (result.norm + 1e-6)).clamp_max(1.0);
  }
  StepScale scale{factor, result.found_inf};
  if (s.offload) {
    if (result.found_inf.item<float>() == 0.f) {
      // The device's buckets first (their all-gathers issued before the worker's, in one order
      // on every rank), then the host's behind them.
      StepScale on_device{factor.to(s.device), result.found_inf.to(s.device)};
      auto gathers = s.step_device_buckets(param_groups_, on_device);
      s.queue_steps(param_groups_, scale);
      for (auto& work : gathers) work.wait();
      if (!s.options.overlap_forward()) s.wait_all_stepped();
    }
    result.norm = result.norm.to(s.device);
    result.found_inf = result.found_inf.to(s.device);
  } else {
    auto gathers = s.step_device_buckets(param_groups_, scale);
    for (auto& work : gathers) work.wait();
  }
  if (s.sharded_params) s.refresh_after_step();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.reset_step_state();
  s.params_version = s.current_params_version();
  return result;
}

void ZeroAdamW::synchronize() { impl_->wait_all_stepped(); }

void ZeroAdamW::wait_parameter(int64_t index) {
  Impl& s = *impl_;
  if (index < 0 || index >= static_cast<int64_t>(s.params.size())) {
    throw std::invalid_argument(fmt::format("ZeroAdamW::wait_parameter: index {} (expected 0 to {})", index,
                                            s.params.size() - 1));
  }
  s.wait_stepped(static_cast<size_t>(s.layout.param_bucket[static_cast<size_t>(index)]));
}

ZeroMemory ZeroAdamW::memory() const {
  impl_->wait_all_stepped();
  const Impl& s = *impl_;
  auto bytes = [](const at::Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : int64_t{0}; };
  ZeroMemory memory;
  memory.parameter_bytes = bytes(s.param_flat) + bytes(s.param_shard);
  for (const auto& whole : s.bucket_param) memory.parameter_bytes += static_cast<int64_t>(whole.storage().nbytes());
  memory.gradient_bytes = bytes(s.grad_flat) + bytes(s.grad_shard);
  for (const auto& buffer : s.bucket_grad) memory.gradient_bytes += bytes(buffer);
  if (s.options.stage() >= 2) {
    for (const auto& param : s.params) memory.gradient_bytes += bytes(param.grad());
  }
  memory.optimizer_bytes = bytes(s.exp_avg) + bytes(s.exp_avg_sq) + bytes(s.master);
  memory.host_bytes = bytes(s.host_exp_avg) + bytes(s.host_exp_avg_sq) + bytes(s.host_master) + bytes(s.host_grad) +
                      bytes(s.host_copy);
  for (size_t b = 0; b < s.steps.size(); ++b) (s.on_host[b] ? memory.host_bytes : memory.optimizer_bytes) += bytes(s.steps[b]);
  if (s.offload) {
    std::lock_guard<std::mutex> lock(s.worker_mutex);
    for (const auto& buffer : s.reduced) memory.gradient_bytes += bytes(buffer);
  }
  return memory;
}

std::vector<ZeroParamState> ZeroAdamW::gather_state() const {
  at::NoGradGuard no_grad;
  impl_->wait_all_stepped();
  const Impl& s = *impl_;
  std::vector<ZeroParamState> state(s.params.size());
  auto fp32 = at::TensorOptions().dtype(at::kFloat).device(s.device);
  for (size_t b = 0; b < s.layout.buckets.size(); ++b) {
    const auto& bucket = s.layout.buckets[b];
    double step = s.steps[b].item<double>();
    auto gather = [&](const at::Tensor& chunk, at::Tensor ZeroParamState::*field) {
      at::Tensor whole = at::empty({bucket.numel}, fp32);
      s.group.all_gather(whole, chunk.to(s.device)).wait();  // offload: from the host
      for (int64_t index : bucket.params) {
        auto i = static_cast<size_t>(index);
        state[i].*field = s.slot(whole, b, index).to(at::kCPU, /*non_blocking=*/false, /*copy=*/true);
      }
    };
    gather(s.exp_avg_of(b), &ZeroParamState::exp_avg);
    gather(s.exp_avg_sq_of(b), &ZeroParamState::exp_avg_sq);
    if (s.dtype != at::kFloat) gather(s.master_of(b), &ZeroParamState::master);  // an fp32 model's values are its parameters
    for (int64_t index : bucket.params) state[static_cast<size_t>(index)].step = step;
  }
  return state;
}

std::vector<ZeroParamSlice> ZeroAdamW::local_state() const {
  at::NoGradGuard no_grad;
  impl_->wait_all_stepped();
  const Impl& s = *impl_;
  std::vector<ZeroParamSlice> slices;
  auto cpu_copy = [](const at::Tensor& t) { return t.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true); };
  for (size_t b = 0; b < s.layout.buckets.size(); ++b) {
    const auto& bucket = s.layout.buckets[b];
    const int64_t chunk_begin = s.rank * bucket.chunk_numel(s.world);
    const int64_t chunk_end = chunk_begin + bucket.chunk_numel(s.world);
    const double step = s.steps[b].item<double>();
    for (int64_t index : bucket.params) {
      const int64_t param_begin = s.layout.param_offset[static_cast<size_t>(index)] - bucket.offset;
      const int64_t param_end = param_begin + s.params[static_cast<size_t>(index)].numel();
      const int64_t lo = std::max(param_begin, chunk_begin);
      const int64_t hi = std::min(param_end, chunk_end);
      if (lo >= hi) continue;
      ZeroParamSlice slice;
      slice.param = index;
      slice.start = lo - param_begin;
      slice.step = step;
      slice.exp_avg = cpu_copy(s.exp_avg_of(b).narrow(0, lo - chunk_begin, hi - lo));
      slice.exp_avg_sq = cpu_copy(s.exp_avg_sq_of(b).narrow(0, lo - chunk_begin, hi - lo));
      if (s.dtype != at::kFloat) slice.master = cpu_copy(s.master_of(b).narrow(0, lo - chunk_begin, hi - lo));
      slices.push_back(std::move(slice));
    }
  }
  return slices;
}

void ZeroAdamW::scatter_state(const std::vector<ZeroParamState>& state) {
  at::NoGradGuard no_grad;
  Impl& s = *impl_;
  s.wait_all_stepped();
  if (state.size() != s.params.size()) {
    throw std::invalid_argument(fmt::format("ZeroAdamW::scatter_state: {} parameter states for {} parameters",
                                            state.size(), s.params.size()));
  }
  for (size_t i = 0; i < state.size(); ++i) {
    auto check = [&](const at::Tensor& t, const char* name, bool required) {
      if (!t.defined()) {
        if (required) throw std::invalid_argument(fmt::format("ZeroAdamW::scatter_state: parameter {} has no {}", i, name));
        return;
      }
      if (t.numel() != s.params[i].numel()) {
        throw std::invalid_argument(fmt::format("ZeroAdamW::scatter_state: parameter {} {} has {} elements (expected {})", i,
                                                name, t.numel(), s.params[i].numel()));
      }
    };
    check(state[i].exp_avg, "exp_avg", true);
    check(state[i].exp_avg_sq, "exp_avg_sq", true);
    check(state[i].master, "master", false);
    if (!(state[i].step >= 0)) {
      throw std::invalid_argument(fmt::format("ZeroAdamW::scatter_state: parameter {} step {} (expected >= 0)", i, state[i].step));
    }
  }
  // Stage 3: the parameters whole while their values are set (this rank's chunks kept after).
  if (s.sharded_params) {
    gather_parameters();
    std::lock_guard<std::mutex> lock(s.mutex);
    s.adopt_written_parameters();  // the caller's writes before this call (a model's weights loaded) first
  }
  auto fp32 = at::TensorOptions().dtype(at::kFloat).device(s.device);
  for (size_t b = 0; b < s.layout.buckets.size(); ++b) {
    const auto& bucket = s.layout.buckets[b];
    // field null: every value from the parameters.
    auto scatter = [&](const at::Tensor& chunk, at::Tensor ZeroParamState::*field, bool from_params) {
      at::Tensor whole = at::zeros({bucket.numel}, fp32);
      for (int64_t index : bucket.params) {
        at::Tensor value = field != nullptr ? state[static_cast<size_t>(index)].*field : at::Tensor();
        at::Tensor target = s.slot(whole, b, index);
        if (value.defined()) {
          target.copy_(value.view(target.sizes()));
        } else if (from_params) {
          target.copy_(s.params[static_cast<size_t>(index)]);  // no master saved (an fp32 run): the parameters
        }
      }
      at::Tensor(chunk).copy_(whole.narrow(0, s.rank * bucket.chunk_numel(s.world), bucket.chunk_numel(s.world)));
    };
    scatter(s.exp_avg_of(b), &ZeroParamState::exp_avg, false);
    scatter(s.exp_avg_sq_of(b), &ZeroParamState::exp_avg_sq, false);
    // An fp32 model offloaded keeps a host master of its parameters' values.
    at::Tensor value = s.master_of(b);
    if (value.defined()) scatter(value, s.dtype != at::kFloat ? &ZeroParamState::master : nullptr, true);
    s.steps[b].fill_(state[static_cast<size_t>(bucket.params.front())].step);
  }
  // A low-precision model takes its values from the masters (every rank has them all).
  if (s.dtype != at::kFloat) {
    for (size_t i = 0; i < s.params.size(); ++i) {
      if (state[i].master.defined()) s.params[i].copy_(state[i].master.view(s.params[i].sizes()));
    }
  }
  if (s.sharded_params) {
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      for (size_t b = 0; b < s.layout.buckets.size(); ++b) s.param_chunk(b).copy_(s.own_chunk(b));
      s.params_version = s.current_params_version();  // those writes were ours: the masters stay
    }
    release_parameters();
  }
  s.params_version = s.current_params_version();  // those writes were ours
}

int64_t ZeroAdamW::num_units() const { return static_cast<int64_t>(impl_->unit_buckets.size()); }

int64_t ZeroAdamW::unit_of(int64_t index) const {
  const Impl& s = *impl_;
  if (index < 0 || index >= static_cast<int64_t>(s.params.size())) {
    throw std::invalid_argument(fmt::format("ZeroAdamW::unit_of: parameter {} (expected 0 to {})", index, s.params.size() - 1));
  }
  return s.sharded_params ? s.units[static_cast<size_t>(index)] : -1;
}

void ZeroAdamW::gather_unit(int64_t unit, std::optional<int64_t> prefetch) {
  Impl& s = *impl_;
  if (!s.sharded_params) return;
  s.check_unit(unit, "gather_unit");
  at::NoGradGuard no_grad;
  std::lock_guard<std::mutex> lock(s.mutex);
  // Inside backward (activation checkpointing's recomputation) the next unit's backward is done.
  const bool in_backward = torch::autograd::get_current_graph_task_id() != -1;
  s.gather_unit_locked(unit, in_backward ? -1 : prefetch.value_or(unit + 1));
  ++s.unit_hold[static_cast<size_t>(unit)];
}

void ZeroAdamW::release_unit(int64_t unit) {
  Impl& s = *impl_;
  if (!s.sharded_params) return;
  s.check_unit(unit, "release_unit");
  std::lock_guard<std::mutex> lock(s.mutex);
  auto& hold = s.unit_hold[static_cast<size_t>(unit)];
  if (hold == 0) throw std::logic_error(fmt::format("ZeroAdamW::release_unit: unit {} is not gathered", unit));
  --hold;
  s.maybe_free_unit(unit);
}

void ZeroAdamW::gather_for_backward(const at::Tensor& output, int64_t unit, std::optional<int64_t> prefetch) {
  Impl& s = *impl_;
  if (!s.sharded_params || !output.defined() || !output.requires_grad()) return;
  s.check_unit(unit, "gather_for_backward");
  Impl* impl = impl_.get();
  const int64_t next = prefetch.value_or(unit - 1);
  // Runs when the gradient of `output` is computed, before the nodes that produced it run.
  output.register_hook([impl, unit, next](const at::Tensor&) {
    at::NoGradGuard no_grad;
    impl->prepare_backward(unit, next);
  });
}

void ZeroAdamW::prepare_backward(int64_t unit, std::optional<int64_t> prefetch) {
  Impl& s = *impl_;
  if (!s.sharded_params) return;
  s.check_unit(unit, "prepare_backward");
  at::NoGradGuard no_grad;
  s.prepare_backward(unit, prefetch.value_or(unit - 1));
}

at::Tensor ZeroAdamW::run_unit(int64_t unit, const std::function<at::Tensor()>& forward, std::optional<int64_t> prefetch,
                               std::optional<int64_t> backward_prefetch) {
  if (!impl_->sharded_params) return forward();
  gather_unit(unit, prefetch);
  at::Tensor output;
  try {
    output = forward();
  } catch (...) {
    release_unit(unit);
    throw;
  }
  release_unit(unit);
  gather_for_backward(output, unit, backward_prefetch);
  return output;
}

void ZeroAdamW::gather_parameters() {
  for (int64_t u = 0; u < num_units(); ++u) gather_unit(u);
}

void ZeroAdamW::release_parameters() {
  Impl& s = *impl_;
  if (!s.sharded_params) return;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    at::NoGradGuard no_grad;
    s.adopt_written_parameters();  // what the caller wrote is kept
  }
  for (int64_t u = 0; u < num_units(); ++u) release_unit(u);
}

void ZeroAdamW::save(torch::serialize::OutputArchive& archive) const {
  auto state = gather_state();
  archive.write("parameters", at::scalar_tensor(static_cast<int64_t>(state.size()), at::kLong));
  for (size_t i = 0; i < state.size(); ++i) {
    std::string key = "param_" + std::to_string(i) + "/";
    archive.write(key + "step", at::scalar_tensor(state[i].step, at::kDouble));
    archive.write(key + "exp_avg", state[i].exp_avg);
    archive.write(key + "exp_avg_sq", state[i].exp_avg_sq);
    if (state[i].master.defined()) archive.write(key + "master", state[i].master);
  }
}

void ZeroAdamW::load(torch::serialize::InputArchive& archive) {
  at::Tensor count;
  archive.read("parameters", count);
  std::vector<ZeroParamState> state(static_cast<size_t>(count.item<int64_t>()));
  for (size_t i = 0; i < state.size(); ++i) {
    std::string key = "param_" + std::to_string(i) + "/";
    at::Tensor step;
    archive.read(key + "step", step);
    state[i].step = step.item<double>();
    archive.read(key + "exp_avg", state[i].exp_avg);
    archive.read(key + "exp_avg_sq", state[i].exp_avg_sq);
    at::Tensor master;
    if (archive.try_read(key + "master", master)) state[i].master = master;
  }
  scatter_state(state);
}

}  // namespace scaletrain::optim
