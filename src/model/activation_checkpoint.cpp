#include "scaletrain/model/activation_checkpoint.h"

#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Generator.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/grad_mode.h>

namespace scaletrain::model {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Generators whose state a recomputation must reproduce: the CPU one and, for an input on an
// accelerator, that device's (what torch.utils.checkpoint stashes for the devices of its inputs).
std::vector<at::Generator> generators_for(const at::Device& device) {
  std::vector<at::Generator> generators{at::globalContext().defaultGenerator(at::kCPU)};
  if (!device.is_cpu() && !device.is_meta())
    generators.push_back(at::globalContext().defaultGenerator(device));
  return generators;
}

// States of a set of generators, read and written under each generator's mutex as torch does.
struct RngStates {
  std::vector<at::Generator> generators;
  std::vector<at::Tensor> states;

  static RngStates capture(std::vector<at::Generator> generators) {
    RngStates result;
    for (auto& generator : generators) {
      std::lock_guard<std::mutex> lock(generator.mutex());
      result.states.push_back(generator.get_state());
    }
    result.generators = std::move(generators);
    return result;
  }
  void restore() {
    for (size_t i = 0; i < generators.size(); ++i) {
      std::lock_guard<std::mutex> lock(generators[i].mutex());
      generators[i].set_state(states[i]);
    }
  }
};

// Saves the current generator states and puts them back at scope exit (torch.random.fork_rng).
class ForkRng {
 public:
  explicit ForkRng(std::vector<at::Generator> generators)
      : saved_(RngStates::capture(std::move(generators))) {}
  ~ForkRng() { saved_.restore(); }
  ForkRng(const ForkRng&) = delete;
  ForkRng& operator=(const ForkRng&) = delete;

 private:
  RngStates saved_;
};

// Autocast settings of the CPU and of the input's device type, as torch.utils.checkpoint records
// them.
struct AutocastState {
  struct Setting {
    c10::DeviceType device_type;
    bool enabled;
    at::ScalarType dtype;
  };
  std::vector<Setting> settings;
  bool cache_enabled = true;

  static AutocastState capture(c10::DeviceType input_device_type) {
    AutocastState state;
    std::vector<c10::DeviceType> types{c10::DeviceType::CPU};
    if (input_device_type != c10::DeviceType::CPU &&
        at::autocast::is_autocast_available(input_device_type))
      types.push_back(input_device_type);
    for (auto type : types)
      state.settings.push_back(
          {type, at::autocast::is_autocast_enabled(type), at::autocast::get_autocast_dtype(type)});
    state.cache_enabled = at::autocast::is_autocast_cache_enabled();
    return state;
  }
  void apply() const {
    for (const auto& s : settings) {
      at::autocast::set_autocast_enabled(s.device_type, s.enabled);
      at::autocast::set_autocast_dtype(s.device_type, s.dtype);
    }
    at::autocast::set_autocast_cache_enabled(cache_enabled);
  }
};

// Enters a recorded autocast state for a scope, like `with torch.autocast(...)`: the nesting count
// goes up, and on exit the cast cache is dropped when it falls to zero and the previous state
// returns.
class AutocastScope {
 public:
  AutocastScope(const AutocastState& state, c10::DeviceType input_device_type)
      : previous_(AutocastState::capture(input_device_type)) {
    state.apply();
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    previous_.apply();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  AutocastState previous_;
};

// What backward needs besides the saved input. Held in the autograd context as a capsule.
struct RecomputeState : torch::CustomClassHolder {
  CheckpointedFunction function;
  at::Device device{at::kCPU};
  RngStates rng;
  AutocastState autocast;
  bool input_requires_grad = false;
};

// Forward runs the function under no-grad (Function::apply disables grad mode) and saves only the
// input. `anchor` is a tensor that requires grad, passed when the input does not, so that the
// output still gets this node as grad_fn and parameters inside the function receive gradients.
struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const std::optional<at::Tensor>& anchor,
                            c10::intrusive_ptr<RecomputeState> state) {
    (void)anchor;
    ctx->save_for_backward({input});
    at::Tensor output = state->function(input);
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(
        torch::autograd::Engine::get_default_engine().is_checkpoint_valid(),
        "activation checkpoint: recomputation accumulates into .grad, so it cannot run under "
        "torch::autograd::grad or backward with `inputs`; call backward without `inputs`");
    auto state =
        c10::static_intrusive_pointer_cast<RecomputeState>(ctx->saved_data["state"].toCapsule());
    at::Tensor input = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    at::Tensor output;
    {
      ForkRng fork(state->rng.generators);
      state->rng.restore();
      AutocastScope autocast(state->autocast, state->device.type());
      torch::AutoGradMode enable_grad(true);
      output = state->function(input);
    }
    // Nothing inside requires grad (frozen parameters, input without grad): nothing to propagate.
    if (output.requires_grad()) torch::autograd::backward({output}, {grad_outputs[0]});
    at::Tensor grad_input = state->input_requires_grad ? input.grad() : at::Tensor();
    return {grad_input, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor checkpoint(CheckpointedFunction function, const at::Tensor& input) {
  if (!torch::GradMode::is_enabled()) return function(input);
  auto state = c10::make_intrusive<RecomputeState>();
  state->device = input.device();
  state->rng = RngStates::capture(generators_for(input.device()));
  state->autocast = AutocastState::capture(input.device().type());
  state->input_requires_grad = input.requires_grad();
  state->function = std::move(function);
  std::optional<at::Tensor> anchor;
  if (!input.requires_grad())
    anchor = at::empty({0}, input.options().dtype(at::kFloat)).requires_grad_(true);
  return CheckpointFunction::apply(input, anchor, std::move(state));
}

}  // namespace scaletrain::model
