#include "scaletrain/train/trainer.h"

#include <chrono>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/StreamGuard.h>
#include <c10/util/ScopeExit.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/serialize.h>
#include <torch/utils.h>

#include "scaletrain/accum/gradient_accumulation.h"
#include "scaletrain/attention/flash_attention.h"
#include "scaletrain/core/fs.h"
#include "scaletrain/core/version.h"
#include "scaletrain/core/logging.h"
#include "scaletrain/data/dsl.h"
#include "scaletrain/optim/adamw.h"
#include "scaletrain/optim/zero_adamw.h"
#include "scaletrain/plan/memory.h"
#include "scaletrain/train/lr_schedule.h"
#include "scaletrain/train/metrics.h"
#include "scaletrain/train/run_folders.h"
#include "scaletrain/train/train_state.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace scaletrain::train {
namespace {

using Clock = std::chrono::steady_clock;

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The AdamW options of optim.* (lr, betas, eps, weight decay).
torch::optim::AdamWOptions adamw_options(const OptimizerOptions& optim) {
  return torch::optim::AdamWOptions(optim.lr())
      .betas({optim.beta1(), optim.beta2()})
      .eps(optim.eps())
      .weight_decay(optim.weight_decay());
}

// GPT-2 practice: decay matrices and embeddings, not biases and LayerNorm parameters. LibTorch
// gives each group its own complete options (the optimizer's defaults do not fill them in), so
// both groups start from all of optim.* and differ only in weight decay.
std::vector<torch::optim::OptimizerParamGroup> parameter_groups(const std::vector<at::Tensor>& params,
                                                                const OptimizerOptions& optim) {
  std::vector<at::Tensor> decay, no_decay;
  for (const auto& p : params) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(adamw_options(optim)));
  groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(adamw_options(optim).weight_decay(0.0)));
  return groups;
}

MetricsRecord eval_record(int64_t step, const EvalResult& r) {
  MetricsRecord record{{"kind", std::string("eval")}, {"step", step}, {"val_loss", r.loss}};
  if (r.examples > 0) {
    record.insert(record.end(), {{"examples", r.examples},
                                 {"exact_match", r.exact_match},
                                 {"bleu4", r.bleu4},
                                 {"rouge_l", r.rouge_l},
                                 {"valid_programs", r.valid_programs}});
  }
  record.emplace_back("seconds", r.seconds);
  return record;
}

std::string percent(double fraction) { return std::isnan(fraction) ? "n/a" : fmt::format("{:.1f}%", 100 * fraction); }

nlohmann::ordered_json eval_json(const EvalResult& r) {
  auto number = [](double v) { return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr); };
  nlohmann::ordered_json j{{"val_loss", number(r.loss)},         {"examples", r.examples},
                           {"exact_match", number(r.exact_match)}, {"bleu4", number(r.bleu4)},
                           {"rouge_l", number(r.rouge_l)},       {"valid_programs", number(r.valid_programs)},
                           {"seconds", r.seconds}};
  j["samples"] = nlohmann::ordered_json::array();
  for (const auto& s : r.samples)
    j["samples"].push_back({{"request", s.request}, {"reference", s.reference}, {"output", s.output}});
  return j;
}

// Peak CUDA memory since the last reset, in bytes (0 on the CPU).
void reset_peak_memory(const c10::Device& device) {
#ifdef SCALETRAIN_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#else
  (void)device;
#endif
}

int64_t peak_memory(const c10::Device& device) {
#ifdef SCALETRAIN_WITH_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  }
#else
  (void)device;
#endif
  return 0;
}

}  // namespace

c10::Device resolve_device(DeviceChoice choice) {
  const bool cuda = torch::cuda::is_available();
  if (choice == DeviceChoice::cuda && !cuda)
    throw core::ConfigError("train.device", "train.device: got 'cuda', but torch sees no CUDA device "
                                            "(expected auto or cpu on this machine)");
  if (choice == DeviceChoice::cpu || !cuda) return c10::Device(c10::kCPU);
  return c10::Device(c10::kCUDA, 0);
}

Trainer::Trainer(RunConfig config) : config_(std::move(config)), device_(resolve_device(config_.train.device())) {
  config_.validate();
  // Several ranks (torchrun, Slurm): one process per device, ZeroAdamW over their group.
  const dist::EnvRendezvous env = dist::read_env_rendezvous();
  if (env.world_size > 1) {
    if (config_.optim.zero_stage() == 0)
      throw core::ConfigError("optim.zero_stage", "optim.zero_stage: got 0, but this process is rank " +
                                                      std::to_string(env.rank) + " of " +
                                                      std::to_string(env.world_size) + " (" + env.source +
                                                      "): expected 1, 2 or 3, which shard AdamW over the ranks");
    if (device_.is_cuda()) device_ = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
    dist::GroupOptions options;
    options.device = device_.str();
    group_ = dist::ProcessGroup::from_env(options);
  }
  if (config_.model.attention() == model::AttentionBackend::flash && device_.is_cuda()) {
    // The CUDA kernels: bf16 or fp16 tensors, head_dim 64 or 128.
    if (config_.amp.precision() == amp::Precision::fp32)
      throw core::ConfigError("amp.precision", "amp.precision: got fp32, but model.attention flash on " +
                                                   device_.str() + " takes bf16 or fp16 (or use attention sdpa)");
    if (!attention::cuda_supports_head_dim(config_.model.head_dim()))
      throw core::ConfigError("model.attention", "model.attention: flash on " + device_.str() + " takes head_dim 64 or "
                                                 "128 (n_embd / n_head), got " + std::to_string(config_.model.head_dim()) +
                                                 " (or use attention sdpa)");
  }
  if (config_.train.threads() > 0) at::set_num_threads(static_cast<int>(config_.train.threads()));
  plan::ZeroPlan zero_plan{config_.optim.zero_stage(), group_.size(), config_.optim.cpu_offload(),
                          config_.optim.offload_fraction()};
  plan::check_model_fits(config_.model, config_.amp, device_, zero_plan);  // before anything is allocated
  dataset_ = data::load_dataset(config_.data, config_.model.block_size(), config_.model.vocab_size());
  if (dataset_->vocab_size() > config_.model.vocab_size()) {
    throw core::ConfigError("model.vocab_size", fmt::format("model.vocab_size: got {}, expected at least {} for this data",
                                                            config_.model.vocab_size(), dataset_->vocab_size()));
  }
  torch::manual_seed(static_cast<uint64_t>(config_.train.seed()));
  model_ = model::GPT(config_.model);
  model_->to(device_);
  amp::check_supported(config_.amp, device_.type());
  if (auto scaler_options = config_.amp.scaler_options()) scaler_.emplace(*scaler_options);
  if (config_.amp.low_precision_params()) {
    // Parameters only: buffers (the rotary tables) stay fp32.
    torch::NoGradGuard no_grad;
    for (auto& p : model_->parameters()) p.set_data(p.data().to(amp::compute_dtype(config_.amp.precision())));
    // ZeroAdamW keeps the fp32 master of its own shard.
    if (config_.optim.zero_stage() == 0) master_ = std::make_unique<amp::MasterWeights>(model_->parameters());
  }
  if (config_.train.cuda_graph() == GraphChoice::on) {
    if (const std::string blocker = cuda_graph_blocker(); !blocker.empty())
      throw core::ConfigError("train.cuda_graph", "train.cuda_graph: got 'on', but " + blocker +
                                                      " (expected auto or off for this run)");
  }
}

std::string Trainer::cuda_graph_blocker() const {
  const auto& c = config_;
  if (!device_.is_cuda()) return "the run is on the CPU";
  if (c.optim.zero_stage() > 0)
    return "optim.zero_stage is " + std::to_string(c.optim.zero_stage()) + " (ZeroAdamW's collectives run from the host)";
  if (!uses_fused_adamw(c.optim.fused(), device_))
    return "optim.fused is off (the captured step needs the fused AdamW, which reads the learning rate on the device)";
  if (c.model.dropout() > 0)
    return "model.dropout is " + core::format_number(c.model.dropout()) +
           " (replayed steps do not draw the dropout masks of uncaptured ones)";
  if (c.model.activation_checkpointing())
    return "model.activation_checkpointing is on (its recomputation sets the CUDA generator's state)";
  if (!dataset_->fixed_batch_shape())
    return std::string("data.source ") + core::enum_name(c.data.source()) + " gives batches of varying length";
  return "";
}

std::vector<at::Tensor> Trainer::trainable_parameters() {
  return master_ ? master_->master() : model_->parameters();
}

void Trainer::backward(const at::Tensor& loss) {
  (scaler_ ? scaler_->scale(loss) : loss).backward();
  if (master_ && config_.amp.fp32_grad_accum()) master_->accumulate_gradients();
}

void Trainer::clear_gradients(torch::optim::Optimizer& optimizer) {
  if (zero_) return zero_->zero_grad();
  optimizer.zero_grad();
  if (master_) model_->zero_grad();  // the fused step reads the model's gradients
}

at::Tensor Trainer::clip_and_step(torch::optim::Optimizer& optimizer) {
  const double clip = config_.optim.grad_clip();
  if (zero_) {
    // ZeroAdamW: unscale, the global norm over the ranks, the skip on an inf anywhere, clipping
    // (max_grad_norm) and the step, the flag and the norm left on the device.
    const optim::ZeroStepResult result = zero_->step_scaled(scaler_ ? scaler_->inv_scale() : at::Tensor());
    if (scaler_) scaler_->update(result.found_inf);
    skipped_on_device_.add_(result.found_inf.reshape({}));
    return result.norm;
  }
  if (!scaler_ && config_.amp.precision() == amp::Precision::fp32 && !fused_) {
    // fp32: torch's clip_grad_norm_, so that the loop is bit for bit a plain PyTorch loop.
    at::Tensor norm;
    if (clip > 0) norm = at::scalar_tensor(torch::nn::utils::clip_grad_norm_(model_->parameters(), clip));
    optimizer.step();
    return norm;
  }
  if (fused_) {
    // One read-only pass (inf/NaN flag, norm, unscale x clip factor), then the fused AdamW reads
    // the factor and the flag on the device, and the loss scaler (kept on the device) adapts from
    // the flag there: no host read.
    auto& adamw = dynamic_cast<optim::AdamW&>(optimizer);
    // The gradients the optimizer reads: fp32 master gradients, or the model's own (its copies').
    std::vector<at::Tensor> params = trainable_parameters();
    if (master_ && !config_.amp.fp32_grad_accum()) params = master_->model_params();
    const auto grads = amp::gradients_of(params);
    const amp::GradCheckResult check =
        scaler_ ? amp::gradient_factor(grads, scaler_->inv_scale(), clip) : amp::gradient_factor(grads, 1.0, clip);
    adamw.step(optim::StepScale{check.factor, check.found_inf_flag(), lr_on_device_});
    if (scaler_) scaler_->update(check.found_inf_flag());
    skipped_on_device_.add_(check.found_inf_flag().reshape({}));
    return check.values[1];
  }
  if (master_ && !config_.amp.fp32_grad_accum()) master_->accumulate_gradients();
  // One fused pass: unscale, inf/NaN check, norm, clip; then one small device-to-host read.
  const auto grads = amp::gradients_of(trainable_parameters());
  const amp::GradCheckResult check =
      scaler_ ? scaler_->unscale_(grads, clip) : amp::unscale_check_clip_(grads, 1.0, clip);
  const at::Tensor host = check.values.to(at::kCPU);
  const bool found_inf = host[0].item<float>() != 0.f;
  if (found_inf) {
    ++skipped_steps_;  // an inf/NaN gradient never reaches the weights or the optimizer state
  } else {
    optimizer.step();
    if (master_) master_->copy_to_model();
  }
  if (scaler_) scaler_->update(found_inf);
  return host[1];
}

std::unique_ptr<torch::optim::Optimizer> Trainer::make_optimizer() {
  const auto& optim = config_.optim;
  zero_ = nullptr;
  if (optim.zero_stage() > 0) {
    fused_ = false;
    const auto defaults = optim::ZeroAdamWOptions(optim.lr())
                              .betas({optim.beta1(), optim.beta2()})
                              .eps(optim.eps())
                              .weight_decay(optim.weight_decay())
                              .stage(optim.zero_stage())
                              .cpu_offload(optim.cpu_offload())
                              .offload_fraction(optim.offload_fraction())
                              .overlap_forward(optim.cpu_offload() && optim.offload_overlap())
                              .bucket_mb(optim.bucket_mb())
                              .max_grad_norm(optim.grad_clip());
    std::vector<torch::optim::OptimizerParamGroup> groups;
    for (auto& group : parameter_groups(model_->parameters(), optim)) {
      auto options = std::make_unique<optim::ZeroAdamWOptions>(defaults);
      options->weight_decay(static_cast<const torch::optim::AdamWOptions&>(group.options()).weight_decay());
      groups.emplace_back(group.params(), std::move(options));
    }
    // Each parameter's unit (the model's parts: embedding and head, each block), in the groups'
    // order. Stage 3: the model's forward runs each part with its unit gathered.
    std::vector<int64_t> units;
    {
      std::unordered_map<const void*, int64_t> unit_of;
      const auto params = model_->parameters();
      const auto model_units = model_->parameter_units();
      for (size_t i = 0; i < params.size(); ++i) unit_of[params[i].unsafeGetTensorImpl()] = model_units[i];
      for (const auto& group : groups)
        for (const auto& p : group.params()) units.push_back(unit_of.at(p.unsafeGetTensorImpl()));
    }
    const bool overlap = defaults.overlap_forward() && optim.zero_stage() < 3;
    auto zero = std::make_unique<optim::ZeroAdamW>(groups, defaults, group_,
                                                   optim.zero_stage() == 3 ? units : std::vector<int64_t>{});
    zero_ = zero.get();
    if (overlap) {
      // Stages 1-2 with the CPU step behind the next forward: each part of the model waits for
      // its own parameters' buckets (the embedding for its table only; the head, the last part,
      // for the rest of unit 0). Stage 3's gathers wait by themselves.
      std::vector<std::vector<int64_t>> unit_params;
      std::vector<int64_t> embedding_params;
      std::unordered_set<const void*> embedding;
      for (const auto& p : model_->wte->parameters()) embedding.insert(p.unsafeGetTensorImpl());
      int64_t index = 0;
      for (const auto& group : groups) {
        for (const auto& p : group.params()) {
          const auto unit = static_cast<size_t>(units[static_cast<size_t>(index)]);
          if (unit_params.size() <= unit) unit_params.resize(unit + 1);
          unit_params[unit].push_back(index);
          if (embedding.count(p.unsafeGetTensorImpl())) embedding_params.push_back(index);
          ++index;
        }
      }
      optim::ZeroAdamW* sharded = zero_;
      model_->set_unit_runner([sharded, unit_params, embedding_params](const model::GPTImpl::UnitCall& call,
                                                                         const std::function<at::Tensor()>& part) {
        const bool is_embedding = call.unit == 0 && call.next_forward >= 0;
        for (int64_t i : is_embedding ? embedding_params : unit_params.at(static_cast<size_t>(call.unit)))
          sharded->wait_parameter(i);
        return part();
      });
    }
    if (optim.zero_stage() == 3) {
      optim::ZeroAdamW* sharded = zero_;
      model_->set_unit_runner([sharded](const model::GPTImpl::UnitCall& call, const std::function<at::Tensor()>& part) {
        return sharded->run_unit(call.unit, part, call.next_forward, call.next_backward);
      });
    }
    skipped_on_device_ = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device_));
    if (scaler_) scaler_->keep_on_device(device_);
    return zero;
  }
  fused_ = uses_fused_adamw(optim.fused(), device_);
  auto groups = parameter_groups(trainable_parameters(), optim);
  if (!fused_) return std::make_unique<torch::optim::AdamW>(groups, adamw_options(optim));
  auto adamw = std::make_unique<optim::AdamW>(groups, adamw_options(optim));
  if (master_) {
    // The model's bf16/fp16 weights, in the optimizer's parameter order (the groups reorder).
    std::unordered_map<const void*, size_t> index;
    for (size_t i = 0; i < master_->master().size(); ++i) index[master_->master()[i].unsafeGetTensorImpl()] = i;
    std::vector<at::Tensor> copies;
    for (const auto& group : adamw->param_groups())
      for (const auto& p : group.params()) copies.push_back(master_->model_params().at(index.at(p.unsafeGetTensorImpl())));
    adamw->set_model_copies(copies);
  }
  skipped_on_device_ = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device_));
  if (scaler_) scaler_->keep_on_device(device_);
  return adamw;
}

bool uses_fused_adamw(FusedChoice choice, const c10::Device& device) {
  return choice == FusedChoice::on || (choice == FusedChoice::automatic && device.is_cuda());
}

std::pair<double, int64_t> Trainer::across_ranks(double loss_sum, int64_t tokens) const {
  if (group_.size() == 1) return {loss_sum, tokens};
  // The CPU step behind the last one (optim.offload_overlap) all-gathers on the group: it ends
  // first, so that the ranks' collectives keep one order.
  if (zero_) zero_->synchronize();
  at::Tensor both = at::tensor(std::vector<double>{loss_sum, static_cast<double>(tokens)}).to(group_.device());
  group_.all_reduce(both).wait();
  const at::Tensor host = both.cpu();
  return {host[0].item<double>() / group_.size(), static_cast<int64_t>(host[1].item<double>())};
}

int64_t Trainer::skipped_steps() const {
  return skipped_steps_ + (skipped_on_device_.defined() ? static_cast<int64_t>(skipped_on_device_.item<float>()) : 0);
}

void Trainer::report(const std::string& line) {
  if (group_.rank() != 0) return;  // rank 0 speaks for the run
  if (progress_ && progress_->interactive()) progress_->print_line(line);
  else core::log_info("{}", line);
}

EvalResult Trainer::evaluate(bool generate) {
  if (zero_) zero_->synchronize();  // the CPU step behind the last one (optim.offload_overlap)
  data::DataSource source = config_.data.source();
  OutputChecker checker;
  if (source == data::DataSource::dsl) checker = [](const std::string& p) { return data::check_program(p); };
  return train::evaluate(model_, *dataset_, config_.eval, device_, generate, checker);
}

at::Tensor Trainer::forward_backward(const at::Tensor& inputs, const at::Tensor& targets) {
  const amp::AutocastGuard autocast(config_.amp.precision(), device_.type());
  auto loss = model_->forward_loss(inputs, targets);
  backward(loss);
  return loss.detach();
}

std::vector<data::Batch> Trainer::step_batches(int64_t step, int64_t micro_steps, int64_t& tokens) const {
  // Micro-batch i of step s is batch s * k + i of the dataset: a pure function of the step, and
  // with k = 1 the same batches as without accumulation.
  // With several ranks, rank r takes batch (s * k + i) * ranks + r: the run's batches are those of
  // one process accumulating k * ranks micro-batches.
  const int64_t ranks = group_.size(), rank = group_.rank();
  std::vector<data::Batch> micro;
  for (int64_t i = 0; i < micro_steps; ++i) {
    micro.push_back(dataset_->train_batch((step * micro_steps + i) * ranks + rank, config_.train.batch_size()));
    tokens += micro.back().tokens;
  }
  return micro;
}

at::Tensor Trainer::accumulate_gradients(int64_t step, accum::GradientAccumulator& accumulator, int64_t& tokens) {
  const std::vector<data::Batch> micro = step_batches(step, accumulator.micro_steps(), tokens);
  // Through pinned memory, so that the copy is asynchronous: from pageable memory the host would
  // wait for the copy, and with it for the previous step's kernels, every micro-batch.
  const auto to_device = [this](const at::Tensor& t) {
    return device_.is_cuda() ? t.pin_memory().to(device_, /*non_blocking=*/true) : t;
  };
  std::vector<at::Tensor> inputs, targets;
  std::vector<int64_t> target_tokens;
  for (const auto& batch : micro) {
    inputs.push_back(to_device(batch.inputs));
    targets.push_back(to_device(batch.targets));
    target_tokens.push_back(batch.target_tokens);
  }
  if (accumulator.micro_steps() > 1) accumulator.begin_step(target_tokens);
  return micro_steps(inputs, targets, accumulator);
}

at::Tensor Trainer::micro_steps(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& targets,
                                const accum::GradientAccumulator& accumulator) {
  // The mean loss directly: bit-identical to a plain training loop.
  const int64_t k = accumulator.micro_steps();
  if (zero_) zero_->set_gradient_sync(k == 1);  // ZeroAdamW reduces on the last micro-step only
  if (k == 1) return forward_backward(inputs[0], targets[0]);
  const amp::AutocastGuard autocast(config_.amp.precision(), device_.type());
  at::Tensor total = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device_));
  for (int64_t i = 0; i < k; ++i) {
    const auto u = static_cast<size_t>(i);
    auto summed = model_->forward_loss(inputs[u], targets[u], model::LossReduction::sum);
    auto part = accumulator.normalize(summed, i);
    if (zero_ && i + 1 == k) zero_->set_gradient_sync(true);
    backward(part);
    total += part.detach();
  }
  return total;
}

at::Tensor Trainer::graphed_step(int64_t step, int64_t done, double lr, StepGraph& graph,
                                 torch::optim::Optimizer& optimizer, accum::GradientAccumulator& accumulator,
                                 int64_t& tokens, at::Tensor& grad_norm) {
  // Eager steps first: the optimizer creates its state, cuBLAS and the autograd engine their
  // per-stream workspaces, outside the capture.
  constexpr int64_t kGraphWarmupSteps = 3;
  const int64_t k = accumulator.micro_steps();
  const std::vector<data::Batch> micro = step_batches(step, k, tokens);
  std::vector<at::Tensor> inputs, targets;
  std::vector<int64_t> target_tokens;
  for (const auto& batch : micro) {
    inputs.push_back(batch.inputs);
    targets.push_back(batch.targets);
    target_tokens.push_back(batch.target_tokens);
  }
  // The step's micro-batches side by side, (k, batch, seq): one copy to the device per step.
  const at::Tensor host_inputs = at::stack(inputs), host_targets = at::stack(targets);
  if (!graph_inputs_.defined()) {
    graph_inputs_ = at::empty(host_inputs.sizes(), host_inputs.options().device(device_));
    graph_targets_ = at::empty(host_targets.sizes(), host_targets.options().device(device_));
  }
  if (host_inputs.sizes() != graph_inputs_.sizes() || host_targets.sizes() != graph_targets_.sizes())
    throw std::logic_error("cuda graph: the batch of step " + std::to_string(step + 1) +
                           " has another shape than the captured one");
  // The loss is normalised by the step's target tokens, a constant of the capture: the datasets
  // that allow one count every target (Dataset::fixed_batch_shape).
  if (k > 1) {
    const int64_t before = accumulator.step_tokens();
    accumulator.begin_step(target_tokens);
    if (graph.captured() && accumulator.step_tokens() != before)
      throw std::logic_error("cuda graph: step " + std::to_string(step + 1) + " has another number of target tokens (" +
                             std::to_string(accumulator.step_tokens()) + ") than the captured one (" +
                             std::to_string(before) + ")");
  }
  graph_inputs_.copy_(host_inputs.pin_memory(), /*non_blocking=*/true);
  graph_targets_.copy_(host_targets.pin_memory(), /*non_blocking=*/true);
  lr_on_device_.fill_(lr);
  if (!graph.captured()) {
    clear_gradients(optimizer);  // created by the step (in the graph's pool once captured)
    const auto eager = [&] {
      std::vector<at::Tensor> device_inputs, device_targets;  // views at fixed addresses
      for (int64_t i = 0; i < k; ++i) {
        device_inputs.push_back(graph_inputs_[i]);
        device_targets.push_back(graph_targets_[i]);
      }
      graph_loss_ = micro_steps(device_inputs, device_targets, accumulator);
      graph_norm_ = clip_and_step(optimizer);
    };
    if (done < kGraphWarmupSteps) {
      eager();
    } else {
      try {
        graph.capture(eager);
      } catch (const std::exception& e) {
        // torch's allocator and generator may be left mid-capture: no eager fallback in this process.
        throw std::runtime_error(fmt::format("cuda graph: capturing step {} failed ({}); train with "
                                             "--set train.cuda_graph=off", step + 1, e.what()));
      }
      report(fmt::format("step {}: the training step is captured in a CUDA graph and replayed from here on", step + 1));
    }
  }
  if (graph.captured()) graph.replay();
  grad_norm = graph_norm_;
  return graph_loss_;
}

std::string Trainer::amp_state_json() const {
  nlohmann::ordered_json j{{"skipped_steps", skipped_steps()}};
  if (scaler_) {
    const auto st = scaler_->state_dict();
    j["loss_scaler"] = {{"scale", st.scale},
                        {"growth_tracker", st.growth_tracker},
                        {"hysteresis_tracker", st.hysteresis_tracker},
                        {"skipped_steps", st.skipped_steps}};
  }
  return j.dump();
}

void Trainer::restore_amp_state(const std::string& json) {
  try {
    const auto j = nlohmann::json::parse(json);
    skipped_steps_ = j.at("skipped_steps").get<int64_t>();
    if (skipped_on_device_.defined()) skipped_on_device_.zero_();
    // A run that switches precision (fp16 -> bf16, say) starts without the scaler, or a fresh one.
    if (scaler_ && j.contains("loss_scaler")) {
      const auto& s = j["loss_scaler"];
      scaler_->load_state_dict({s.at("scale").get<double>(), s.at("growth_tracker").get<int64_t>(),
                                s.at("hysteresis_tracker").get<int64_t>(), s.at("skipped_steps").get<int64_t>()});
    }
  } catch (const nlohmann::json::exception& e) {
    throw core::IOError(std::string("trainer.json: component 'amp' is malformed (") + e.what() + ")");
  } catch (const std::invalid_argument& e) {
    throw core::IOError(std::string("trainer.json: component 'amp': ") + e.what());
  }
}

double Trainer::save_checkpoint(const TrainState& state, const TrainProgress& progress) {
  const auto begin = Clock::now();
  // Every rank takes part in gathering the optimizer state (ZeroAdamW; at stage 3 the model's
  // parameters too); rank 0 writes. The CPU step behind the last one (optim.offload_overlap)
  // finishes first: the model's values are read.
  if (zero_) zero_->synchronize();
  if (zero_) zero_->gather_parameters();
  const auto files = state.files(progress, config_.to_yaml());
  if (zero_) zero_->release_parameters();
  std::string path;
  if (group_.rank() == 0) {
    CheckpointStore store(config_.checkpoint_dir());
    path = store.save(progress.step, files);
    store.prune(config_.checkpoint.keep(), progress.step);
  }
  group_.barrier();  // no rank runs ahead of a checkpoint it could resume from
  const double spent = seconds_since(begin);
  report(fmt::format("step {} checkpoint {} ({:.2f}s)", progress.step, path, spent));
  return spent;
}

TrainSummary Trainer::fit(const std::optional<Checkpoint>& resume) {
  const auto& options = config_.train;
  const auto& optim = config_.optim;
  if (resume) check_resumable(*resume, config_);
  const bool leader = group_.rank() == 0;  // with several ranks, rank 0 writes the run folder
  if (leader) prepare_run_folders(config_, resume ? resume->step : 0);  // a blocked path fails now, not at the first save
  group_.barrier();
  if (profiler_) {
    try {
      profiler_->check(resume ? resume->step : 0, config_.train.max_steps());
    } catch (const std::invalid_argument& e) {
      throw core::UsageError(e.what());
    }
  }
  TrainSummary summary;
  summary.parameters = model_->num_parameters();
  summary.device = device_.str();
  summary.precision = core::enum_name(config_.amp.precision());
  reset_peak_memory(device_);

  const std::string out_dir = leader ? options.out_dir() : std::string();
  MetricsLog metrics;
  if (!out_dir.empty()) {
    core::write_file_atomic(out_dir + "/config.yaml", config_.to_yaml());
    metrics = MetricsLog(out_dir + "/metrics.jsonl", /*append=*/resume.has_value());
  }
  report(fmt::format("model: GPT {} layers, {} heads, width {}, {:.2f}M parameters, attention {}, device {}",
                     config_.model.n_layer(), config_.model.n_head(), config_.model.n_embd(),
                     static_cast<double>(summary.parameters) / 1e6, core::enum_name(config_.model.attention()),
                     summary.device));
  report("data: " + dataset_->describe());

  const bool generate = config_.eval.examples() > 0;
  if (config_.eval.before_training() && !resume) {
    summary.before = evaluate(generate);
    report("before training: " + format_eval(*summary.before));
    metrics.write(eval_record(0, *summary.before));
  }

  const std::unique_ptr<torch::optim::Optimizer> owned_optimizer = make_optimizer();
  torch::optim::Optimizer& optimizer = *owned_optimizer;
  // The model's unit runner (stage 3, offload overlap) and zero_ point at the optimizer: they go
  // with it, however fit ends.
  const auto forget_optimizer = c10::make_scope_exit([this] {
    model_->set_unit_runner({});
    zero_ = nullptr;
  });
  // What a checkpoint holds. More parts of the training state (loss scaler, master weights)
  // register here, one line each: state.add_json(...) / state.add_tensors(...), see train_state.h.
  TrainState state(model_, optimizer);
  state.add_json("amp", [this] { return amp_state_json(); }, [this](const std::string& json) { restore_amp_state(json); });
  if (master_) {
    state.add_tensors("master_weights", [this] {
      NamedTensors named;
      const auto names = model_->named_parameters();
      for (size_t i = 0; i < master_->master().size(); ++i) named.emplace_back(names[i].key(), master_->master()[i]);
      return named;
    });
  }
  TrainProgress from;  // step 0, or where the checkpoint left off
  if (resume) {
    if (zero_) zero_->gather_parameters();  // stage 3: loaded whole, each rank keeps its chunks
    from = state.restore(*resume);
    if (zero_) zero_->release_parameters();
    // The checkpoint restores each group's options as they were saved; the config decides them.
    auto groups = parameter_groups({}, optim);
    for (size_t i = 0; i < groups.size() && i < optimizer.param_groups().size(); ++i)
      optimizer.param_groups()[i].set_options(groups[i].options().clone());
    report(fmt::format("resumed from checkpoint '{}' at step {}", resume->path, from.step));
    metrics.write({{"kind", std::string("resume")}, {"step", from.step}});
  }
  WarmupCosineSchedule schedule(optim.lr(), optim.min_lr(), optim.warmup_steps(), options.max_steps());
  accum::GradientAccumulator accumulator(options.grad_accum_steps());
  ProgressBar progress(options.max_steps(), leader && ProgressBar::stderr_is_terminal());
  progress.start_at(from.step, from.tokens);
  progress_ = &progress;
  struct ResetProgress {
    ProgressBar*& target;
    ~ResetProgress() { target = nullptr; }
  } reset_progress{progress_};
  model_->train();

  const auto start = Clock::now();
  auto interval_start = start;
  at::Tensor interval_loss =
      at::full({}, from.interval_loss_sum, at::TensorOptions().dtype(at::kDouble).device(device_));
  int64_t interval_steps = from.interval_steps, interval_tokens = from.interval_tokens;
  double last_loss = from.last_loss, grad_norm = NAN;
  at::Tensor step_grad_norm;  // on the device until a log line reads it
  summary.tokens = from.tokens;
  // Where the run stands after `done` steps, for a checkpoint.
  auto progress_after = [&](int64_t done) {
    TrainProgress p;
    p.step = done;
    p.grad_accum_steps = options.grad_accum_steps();
    p.batch_size = options.batch_size();
    p.next_batch = done * options.grad_accum_steps();
    p.tokens = summary.tokens;
    p.interval_loss_sum = interval_loss.item<double>();
    p.interval_steps = interval_steps;
    p.interval_tokens = interval_tokens;
    p.last_loss = last_loss;
    return p;
  };
  // A CUDA graph replays the step when the run allows it (train.cuda_graph); warm-up steps, the
  // capture and the replays run on the graph's own stream.
  std::unique_ptr<StepGraph> graph;
  // Leaves the graph's stream, after waiting for it, however the loop ends (an error included):
  // what follows runs on the default stream.
  struct GraphStreamScope {
    std::unique_ptr<StepGraph>& graph;
    std::optional<c10::StreamGuard> guard;
    ~GraphStreamScope() {
      try {
        if (graph) graph->synchronize();
      } catch (...) {
      }
      guard.reset();
    }
  } on_graph_stream{graph, std::nullopt};
  lr_on_device_ = at::Tensor();
  if (device_.is_cuda() && config_.train.cuda_graph() != GraphChoice::off) {
    if (const std::string blocker = cuda_graph_blocker(); blocker.empty()) {
      graph = std::make_unique<StepGraph>(device_);
      on_graph_stream.guard.emplace(graph->stream());
      lr_on_device_ = at::empty({1}, at::TensorOptions().dtype(at::kDouble).device(device_));
    } else {
      report("cuda graph: off, " + blocker);
    }
  }
  // Periodic evaluations and checkpoints are left out of the training time and of tokens/s.
  double eval_seconds = 0, interval_eval_seconds = 0;
  for (int64_t step = from.step; step < options.max_steps(); ++step) {
    const double lr = schedule.apply(optimizer, step);
    if (profiler_) profiler_->before_step(step);
    int64_t step_input_tokens = 0;
    at::Tensor loss;
    if (graph) {
      loss = graphed_step(step, step - from.step, lr, *graph, optimizer, accumulator, step_input_tokens, step_grad_norm);
    } else {
      clear_gradients(optimizer);
      loss = accumulate_gradients(step, accumulator, step_input_tokens);
      step_grad_norm = clip_and_step(optimizer);
    }
    if (profiler_) profiler_->after_step(step);

    interval_loss += loss.to(at::kDouble);
    ++interval_steps;
    interval_tokens += step_input_tokens;
    summary.tokens += step_input_tokens;
    const bool last = step + 1 == options.max_steps();
    if ((step + 1) % options.log_every() == 0 || last) {
      // With several ranks: the mean loss over the ranks and their tokens together.
      const auto [loss_sum, run_tokens] = across_ranks(interval_loss.item<double>(), interval_tokens);
      last_loss = loss_sum / static_cast<double>(interval_steps);
      grad_norm = step_grad_norm.defined() ? step_grad_norm.item<double>() : NAN;
      const double rate = static_cast<double>(run_tokens) /
                          std::max(1e-9, seconds_since(interval_start) - interval_eval_seconds);
      MetricsRecord record{{"kind", std::string("train")}, {"step", step + 1}, {"loss", last_loss}, {"lr", lr},
                           {"grad_norm", grad_norm}, {"tokens_per_second", rate}, {"elapsed_s", seconds_since(start)}};
      if (scaler_ || config_.amp.precision() != amp::Precision::fp32) {
        record.emplace_back("skipped_steps", skipped_steps());
        if (scaler_) record.emplace_back("loss_scale", scaler_->get_scale());
      }
      metrics.write(record);
      report(fmt::format("step {}/{} loss {:.4f} lr {:.2e} {} tok/s", step + 1, options.max_steps(), last_loss, lr,
                         ProgressBar::format_rate(rate)));
      interval_loss.zero_();
      interval_steps = 0, interval_tokens = 0;
      interval_eval_seconds = 0;
      interval_start = Clock::now();
    }
    progress.update(step + 1, last_loss, lr, summary.tokens);
    if (config_.eval.every() > 0 && (step + 1) % config_.eval.every() == 0 && !last) {
      const auto eval_start = Clock::now();
      EvalResult periodic = evaluate(false);
      report(fmt::format("step {} validation loss {:.4f}", step + 1, periodic.loss));
      metrics.write(eval_record(step + 1, periodic));
      const double spent = seconds_since(eval_start);
      eval_seconds += spent;
      interval_eval_seconds += spent;
    }
    if (config_.checkpoint.every() > 0 && ((step + 1) % config_.checkpoint.every() == 0 || last)) {
      const double spent = save_checkpoint(state, progress_after(step + 1));
      eval_seconds += spent;
      interval_eval_seconds += spent;
    }
  }
  if (graph) {
    graph->synchronize();  // the default stream, on which what follows runs, sees the last step
    summary.cuda_graph = graph->captured();
    // Give the graph's memory pool (one step's activations, the gradients) back before evaluating.
    clear_gradients(optimizer);
    graph_inputs_ = graph_targets_ = graph_loss_ = graph_norm_ = step_grad_norm = at::Tensor();
    graph.reset();
  }
  on_graph_stream.guard.reset();
  summary.seconds = seconds_since(start) - eval_seconds;
  progress.finish();
  summary.steps = options.max_steps();
  summary.final_loss = last_loss;
  summary.tokens = from.tokens + across_ranks(0.0, summary.tokens - from.tokens).second;  // this run's, all ranks
  summary.tokens_per_second = static_cast<double>(summary.tokens - from.tokens) / std::max(1e-9, summary.seconds);
  summary.skipped_steps = skipped_steps();
  if (scaler_) summary.loss_scale = scaler_->get_scale();
  summary.peak_memory_bytes = peak_memory(device_);
  if (zero_) {
    zero_->synchronize();  // the CPU step still behind the last one (optim.offload_overlap)
    model_->set_unit_runner({});
    // Stage 3: the model whole again for what follows (evaluation, saving) and after fit (a collective).
    if (config_.optim.zero_stage() == 3) zero_->gather_parameters();
  }

  summary.after = evaluate(generate);
  report("after training: " + format_eval(summary.after));
  metrics.write(eval_record(summary.steps, summary.after));
  if (!out_dir.empty()) {
    if (options.save_model()) save_model(model_, out_dir + "/model.pt");
    core::write_file_atomic(out_dir + "/summary.json", summary_json(summary));
  }
  return summary;
}

std::string model_archive(model::GPT& model) {
  // One flat archive: "blocks.0.attn.qkv.weight" -> tensor, parameters then buffers.
  torch::serialize::OutputArchive archive;
  for (const auto& item : model->named_parameters()) archive.write(item.key(), item.value().detach().cpu());
  for (const auto& item : model->named_buffers()) archive.write(item.key(), item.value().cpu(), /*is_buffer=*/true);
  std::ostringstream bytes;
  archive.save_to(bytes);
  return bytes.str();
}

void save_model(model::GPT& model, const std::string& path) { core::write_file_atomic(path, model_archive(model)); }

void load_model(model::GPT& model, const std::string& path) {
  load_model_archive(model, core::read_file(path), "'" + path + "'");
}

void load_model_archive(model::GPT& model, const std::string& bytes, const std::string& origin) {
  torch::serialize::InputArchive archive;
  try {
    std::istringstream stream(bytes);
    archive.load_from(stream, model->wte->weight.device());
  } catch (const c10::Error& e) {
    throw core::IOError(origin + ": not a saved model (" + first_line(e.what_without_backtrace()) + ")");
  }
  // Read every tensor into a scratch tensor and check it before copying: torch's own
  // Module::load would silently resize parameters to whatever the file holds.
  torch::NoGradGuard no_grad;
  auto restore = [&](const std::string& name, at::Tensor& target, bool is_buffer) {
    at::Tensor saved;
    try {
      archive.read(name, saved, is_buffer);
    } catch (const c10::Error&) {
      throw core::IOError(origin + ": no tensor '" + name + "' (saved from another model?)");
    }
    if (saved.sizes() != target.sizes() || saved.scalar_type() != target.scalar_type()) {
      // Saved before the vocabulary was padded: its rows are exactly vocab_size.
      const auto& options = model->options();
      const bool unpadded = (name == "wte.weight" || name == "lm_head.weight") && saved.dim() == 2 &&
                            saved.size(0) == options.vocab_size() && target.size(0) == options.padded_vocab_size();
      throw core::IOError(fmt::format("{}: '{}' is {} {}, the model expects {} {} ({})", origin, name,
                                      fmt::join(saved.sizes(), "x"), c10::toString(saved.scalar_type()),
                                      fmt::join(target.sizes(), "x"), c10::toString(target.scalar_type()),
                                      unpadded ? "saved without vocabulary padding: load it with --set "
                                                 "model.pad_vocab_to=1"
                                               : "trained with other model options?"));
    }
    target.copy_(saved);
  };
  for (auto& item : model->named_parameters()) restore(item.key(), item.value(), false);
  for (auto& item : model->named_buffers()) restore(item.key(), item.value(), true);
}

std::string format_eval(const EvalResult& r) {
  std::string line = fmt::format("val loss {:.4f}", r.loss);
  if (r.examples > 0) {
    line += fmt::format(" | exact match {} of {} ({}) | BLEU-4 {:.3f} | ROUGE-L {:.3f}",
                        static_cast<int64_t>(std::llround(r.exact_match * static_cast<double>(r.examples))),
                        r.examples, percent(r.exact_match), r.bleu4, r.rouge_l);
    if (!std::isnan(r.valid_programs)) line += " | valid programs " + percent(r.valid_programs);
  }
  return line;
}

std::string format_summary(const TrainSummary& s) {
  std::ostringstream out;
  out << fmt::format("\n== summary: {} steps on {} in {}, {} tok/s, final train loss {:.4f}\n", s.steps, s.device,
                     ProgressBar::format_duration(s.seconds), ProgressBar::format_rate(s.tokens_per_second), s.final_loss);
  if (!s.precision.empty() && s.precision != "fp32") {
    out << fmt::format("precision {}, {} skipped steps", s.precision, s.skipped_steps);
    if (std::isfinite(s.loss_scale)) out << fmt::format(", final loss scale {}", s.loss_scale);
    out << "\n";
  }
  if (s.peak_memory_bytes > 0)
    out << fmt::format("peak GPU memory {:.2f} GiB\n", static_cast<double>(s.peak_memory_bytes) / (1 << 30));
  out << fmt::format("{:<16}{:>10}{:>14}{:>10}{:>10}{:>16}\n", "", "val loss", "exact match", "BLEU-4", "ROUGE-L",
                     "valid programs");
  auto row = [&](const char* name, const EvalResult& r) {
    out << fmt::format("{:<16}{:>10.4f}{:>14}{:>10.3f}{:>10.3f}{:>16}\n", name, r.loss, percent(r.exact_match),
                       r.bleu4, r.rouge_l, percent(r.valid_programs));
  };
  if (s.before) row("before training", *s.before);
  row("after training", s.after);
  if (!s.after.samples.empty()) {
    out << "\nsamples (held-out requests, greedy decoding):\n";
    for (const auto& sample : s.after.samples) {
      out << "  request:  " << sample.request << "\n  expected: " << sample.reference << "\n  model:    " << sample.output
          << (sample.output == sample.reference ? "   [exact]" : "   [differs]") << "\n";
    }
  }
  return out.str();
}

std::string summary_json(const TrainSummary& s) {
  nlohmann::ordered_json j{{"steps", s.steps},
                           {"parameters", s.parameters},
                           {"device", s.device},
                           {"precision", s.precision},
                           {"skipped_steps", s.skipped_steps},
                           {"loss_scale", std::isfinite(s.loss_scale) ? nlohmann::ordered_json(s.loss_scale)
                                                                      : nlohmann::ordered_json(nullptr)},
                           {"peak_memory_bytes", s.peak_memory_bytes},
                           {"cuda_graph", s.cuda_graph},
                           {"tokens", s.tokens},
                           {"seconds", s.seconds},
                           {"tokens_per_second", s.tokens_per_second},
                           {"final_train_loss", std::isfinite(s.final_loss) ? nlohmann::ordered_json(s.final_loss)
                                                                            : nlohmann::ordered_json(nullptr)}};
  if (s.before) j["before"] = eval_json(*s.before);
  j["after"] = eval_json(s.after);
  return j.dump(2) + "\n";
}

}  // namespace scaletrain::train
