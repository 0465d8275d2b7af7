#include "scaletrain/train/train_state.h"

#include <mutex>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/cuda.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>
#include <nlohmann/json.hpp>

#include "scaletrain/core/config.h"
#include "scaletrain/core/error.h"
#include "scaletrain/core/logging.h"
#include "scaletrain/optim/adamw.h"
#include "scaletrain/train/trainer.h"

namespace scaletrain::train {
namespace {

using Json = nlohmann::ordered_json;

constexpr const char* kModel = "model.pt";
constexpr const char* kOptimizer = "optimizer.pt";
constexpr const char* kTrainer = "trainer.json";
constexpr const char* kTensors = "tensors.pt";
constexpr const char* kConfig = "config.yaml";
constexpr int64_t kTrainerVersion = 1;

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// ---------------------------------------------------------------------------------------------
// RNG states: the generators' own byte strings, as hex in trainer.json.

std::string to_hex(const at::Tensor& bytes) {
  static const char* digits = "0123456789abcdef";
  const auto contiguous = bytes.contiguous();
  const auto* data = contiguous.data_ptr<uint8_t>();
  std::string out;
  out.reserve(static_cast<size_t>(contiguous.numel()) * 2);
  for (int64_t i = 0; i < contiguous.numel(); ++i) {
    out += digits[data[i] >> 4];
    out += digits[data[i] & 15];
  }
  return out;
}

// nullopt when `hex` is not an even-length string of hex digits.
std::optional<at::Tensor> from_hex(const std::string& hex) {
  if (hex.size() % 2 != 0) return std::nullopt;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  at::Tensor bytes = at::empty({static_cast<int64_t>(hex.size() / 2)}, at::kByte);
  auto* data = bytes.data_ptr<uint8_t>();
  for (size_t i = 0; i < hex.size(); i += 2) {
    const int high = nibble(hex[i]), low = nibble(hex[i + 1]);
    if (high < 0 || low < 0) return std::nullopt;
    data[i / 2] = static_cast<uint8_t>(high * 16 + low);
  }
  return bytes;
}

std::string generator_state(c10::Device device) {
  auto generator = at::globalContext().defaultGenerator(device);
  std::lock_guard<std::mutex> lock(generator.mutex());
  return to_hex(generator.get_state());
}

bool uses_cuda(model::GPT& model) { return model->wte->weight.device().is_cuda(); }

Json rng_json(model::GPT& model) {
  Json rng{{"cpu", generator_state(c10::Device(c10::kCPU))}};
  if (uses_cuda(model)) {
    rng["cuda"] = Json::array();
    for (int i = 0; i < static_cast<int>(torch::cuda::device_count()); ++i)
      rng["cuda"].push_back(generator_state(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(i))));
  }
  return rng;
}

// Keys that must match for a resumed run to continue the same training: the model, the data and
// what decides which batches each step sees.
bool must_match(const std::string& key) {
  return key.rfind("model.", 0) == 0 || key.rfind("data.", 0) == 0 || key == "train.batch_size" ||
         key == "train.grad_accum_steps" || key == "train.seed";
}

}  // namespace

TrainState::TrainState(model::GPT model, torch::optim::Optimizer& optimizer)
    : model_(std::move(model)), optimizer_(&optimizer) {}

void TrainState::add_json(std::string name, std::function<std::string()> save,
                          std::function<void(const std::string&)> restore) {
  json_components_.push_back({std::move(name), std::move(save), std::move(restore)});
}

void TrainState::add_tensors(std::string name, std::function<NamedTensors()> tensors) {
  tensor_components_.push_back({std::move(name), std::move(tensors)});
}

std::vector<std::pair<std::string, std::string>> TrainState::files(const TrainProgress& progress,
                                                                   const std::string& config_yaml) const {
  model::GPT model = model_;  // a handle: the same module
  std::vector<std::pair<std::string, std::string>> out;
  out.emplace_back(kModel, model_archive(model));
  {
    torch::serialize::OutputArchive archive;
    optimizer_->save(archive);
    std::ostringstream bytes;
    archive.save_to(bytes);
    out.emplace_back(kOptimizer, bytes.str());
  }
  if (!tensor_components_.empty()) {
    torch::serialize::OutputArchive archive;
    for (const auto& component : tensor_components_)
      for (const auto& [name, tensor] : component.tensors())
        archive.write(component.name + "/" + name, tensor.detach().cpu(), /*is_buffer=*/true);
    std::ostringstream bytes;
    archive.save_to(bytes);
    out.emplace_back(kTensors, bytes.str());
  }

  auto number = [](double v) { return std::isfinite(v) ? Json(v) : Json(nullptr); };
  Json trainer{{"version", kTrainerVersion},
               {"step", progress.step},
               {"micro_step", progress.micro_step},
               {"grad_accum_steps", progress.grad_accum_steps},
               {"batch_size", progress.batch_size},
               {"next_batch", progress.next_batch},
               {"tokens", progress.tokens},
               {"log_interval",
                {{"loss_sum", number(progress.interval_loss_sum)},
                 {"steps", progress.interval_steps},
                 {"tokens", progress.interval_tokens}}},
               {"last_loss", number(progress.last_loss)}};
  trainer["components"] = Json::object();
  for (const auto& component : json_components_) {
    const std::string text = component.save();
    try {
      trainer["components"][component.name] = Json::parse(text);
    } catch (const Json::exception& e) {
      throw std::logic_error("checkpoint component '" + component.name + "' saved invalid JSON: " + e.what());
    }
  }
  trainer["rng"] = rng_json(model);
  out.emplace_back(kTrainer, trainer.dump(2) + "\n");
  out.emplace_back(kConfig, config_yaml);
  return out;
}

TrainProgress TrainState::restore(const Checkpoint& checkpoint) const {
  auto fail = [&](const std::string& file, const std::string& what) {
    throw core::IOError(fmt::format("checkpoint '{}': {}: {}", checkpoint.path, file, what));
  };
  Json trainer;
  try {
    trainer = Json::parse(checkpoint.file(kTrainer));
  } catch (const Json::exception& e) {
    fail(kTrainer, std::string("not valid JSON (") + e.what() + ")");
  }
  auto integer = [&](const Json& object, const char* key) {
    auto found = object.find(key);
    if (found == object.end() || !found->is_number_integer()) fail(kTrainer, fmt::format("no integer '{}'", key));
    return found->get<int64_t>();
  };
  auto real = [&](const Json& object, const char* key) {
    auto found = object.find(key);
    if (found == object.end() || !(found->is_number() || found->is_null()))
      fail(kTrainer, fmt::format("no number '{}'", key));
    return found->is_null() ? NAN : found->get<double>();
  };
  if (!trainer.is_object() || integer(trainer, "version") != kTrainerVersion)
    fail(kTrainer, fmt::format("expected an object with \"version\": {}", kTrainerVersion));
  TrainProgress progress;
  progress.step = integer(trainer, "step");
  progress.micro_step = integer(trainer, "micro_step");
  progress.grad_accum_steps = integer(trainer, "grad_accum_steps");
  progress.batch_size = integer(trainer, "batch_size");
  progress.next_batch = integer(trainer, "next_batch");
  progress.tokens = integer(trainer, "tokens");
  if (!trainer.contains("log_interval") || !trainer["log_interval"].is_object())
    fail(kTrainer, "no object 'log_interval'");
  progress.interval_loss_sum = real(trainer["log_interval"], "loss_sum");
  progress.interval_steps = integer(trainer["log_interval"], "steps");
  progress.interval_tokens = integer(trainer["log_interval"], "tokens");
  progress.last_loss = real(trainer, "last_loss");
  if (progress.step != checkpoint.step)
    fail(kTrainer, fmt::format("step {}, the manifest says {}", progress.step, checkpoint.step));
  if (progress.micro_step != 0)
    fail(kTrainer,
         fmt::format("micro_step {}: resuming inside an optimizer step is not supported", progress.micro_step));
  if (progress.next_batch != progress.step * progress.grad_accum_steps + progress.micro_step) {
    fail(kTrainer, fmt::format("next_batch {} does not follow from step {} and grad_accum_steps {}",
                               progress.next_batch, progress.step, progress.grad_accum_steps));
  }

  model::GPT model = model_;  // a handle: the same module
  load_model_archive(model, checkpoint.file(kModel), fmt::format("checkpoint '{}': {}", checkpoint.path, kModel));
  try {
    torch::serialize::InputArchive archive;
    std::istringstream stream(checkpoint.file(kOptimizer));
    archive.load_from(stream, model->wte->weight.device());
    optimizer_->load(archive);
  } catch (const c10::Error& e) {
    fail(kOptimizer, "cannot be restored into this optimizer (" + first_line(e.what_without_backtrace()) + ")");
  }
  // torch's Optimizer::load maps states to parameters by position without looking at shapes.
  for (const auto& group : optimizer_->param_groups()) {
    for (const auto& param : group.params()) {
      auto state = optimizer_->state().find(param.unsafeGetTensorImpl());
      if (state == optimizer_->state().end()) continue;
      at::Tensor moment;
      if (auto* adamw = dynamic_cast<torch::optim::AdamWParamState*>(state->second.get())) moment = adamw->exp_avg();
      if (auto* fused = dynamic_cast<optim::AdamWParamState*>(state->second.get())) moment = fused->exp_avg();
      if (moment.defined() && moment.sizes() != param.sizes())
        fail(kOptimizer, "moments of another shape than the parameters (saved from another model?)");
    }
  }

  if (!tensor_components_.empty()) {
    torch::serialize::InputArchive archive;
    try {
      std::istringstream stream(checkpoint.file(kTensors));
      archive.load_from(stream, model->wte->weight.device());
    } catch (const c10::Error& e) {
      fail(kTensors, "not a tensor archive (" + first_line(e.what_without_backtrace()) + ")");
    }
    torch::NoGradGuard no_grad;
    for (const auto& component : tensor_components_) {
      for (auto& [name, target] : component.tensors()) {
        const std::string key = component.name + "/" + name;
        at::Tensor saved;
        try {
          archive.read(key, saved, /*is_buffer=*/true);
        } catch (const c10::Error&) {
          fail(kTensors, "no tensor '" + key + "' (saved without this component?)");
        }
        if (saved.sizes() != target.sizes() || saved.scalar_type() != target.scalar_type())
          fail(kTensors, fmt::format("'{}' has another shape or dtype than this run's", key));
        target.copy_(saved);
      }
    }
  }
  const Json components = trainer.value("components", Json::object());
  for (const auto& component : json_components_) {
    if (!components.contains(component.name))
      fail(kTrainer, "no component '" + component.name + "' (saved without it?)");
    component.restore(components[component.name].dump());
  }

  // The RNG states last: nothing between here and the next step may draw random numbers.
  if (!trainer.contains("rng") || !trainer["rng"].is_object()) fail(kTrainer, "no object 'rng'");
  const Json& rng = trainer["rng"];
  auto set_state = [&](c10::Device device, const Json& hex) {
    std::optional<at::Tensor> bytes = hex.is_string() ? from_hex(hex.get<std::string>()) : std::nullopt;
    if (!bytes) fail(kTrainer, "rng state of " + device.str() + " is not a hex string");
    auto generator = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(generator.mutex());
    try {
      generator.set_state(*bytes);
    } catch (const c10::Error& e) {
      fail(kTrainer, "rng state of " + device.str() + " rejected (" + first_line(e.what_without_backtrace()) + ")");
    }
  };
  set_state(c10::Device(c10::kCPU), rng.value("cpu", Json()));
  if (uses_cuda(model)) {
    const Json cuda = rng.value("cuda", Json::array());
    const auto devices = static_cast<size_t>(torch::cuda::device_count());
    if (cuda.size() != devices) {
      core::log_warn(
          "checkpoint '{}' holds CUDA RNG states of {} devices, this machine has {}: dropout after the "
          "resume differs from an uninterrupted run",
          checkpoint.path, cuda.size(), devices);
    }
    for (size_t i = 0; i < std::min(cuda.size(), devices); ++i)
      set_state(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(i)), cuda[i]);
  }
  return progress;
}

void check_resumable(const Checkpoint& checkpoint, const RunConfig& config) {
  RunConfig saved;
  core::apply_yaml(core::root_of(saved), checkpoint.file(kConfig), checkpoint.path + "/" + kConfig);
  RunConfig current = config;  // root_of visits through a mutable reference
  const auto before = core::key_values(core::root_of(saved)), now = core::key_values(core::root_of(current));
  std::vector<std::string> changed;
  for (size_t i = 0; i < before.size() && i < now.size(); ++i) {
    const auto& [key, old_value] = before[i];
    const std::string& new_value = now[i].second;
    if (old_value == new_value) continue;
    if (must_match(key)) {
      throw core::ConfigError(key,
                              fmt::format("{}: checkpoint '{}' was trained with {}={}, the config says {} (resuming "
                                          "needs the same model, data, batch size, accumulation and seed)",
                                          key, checkpoint.path, key, old_value, new_value));
    }
    changed.push_back(fmt::format("{} {} -> {}", key, old_value, new_value));
  }
  if (config.train.max_steps() < checkpoint.step) {
    throw core::ConfigError("train.max_steps", fmt::format("train.max_steps: got {}, expected at least {} to resume "
                                                           "checkpoint '{}'",
                                                           config.train.max_steps(), checkpoint.step, checkpoint.path));
  }
  if (!changed.empty()) core::log_info("resuming with changed settings: {}", fmt::join(changed, ", "));
}

std::optional<Checkpoint> find_resume_checkpoint(const RunConfig& config, const std::string& what) {
  if (what == "none") return std::nullopt;
  if (what != "auto") return CheckpointStore::read(what);
  const std::string dir = config.checkpoint_dir();
  if (dir.empty()) {
    throw core::UsageError(
        "--resume auto: no checkpoint folder to look in (checkpoint.dir and train.out_dir are both "
        "empty)");
  }
  auto found = CheckpointStore(dir).latest_valid();
  if (!found) core::log_info("no checkpoint in {}, starting from step 0", dir);
  return found;
}

}  // namespace scaletrain::train
