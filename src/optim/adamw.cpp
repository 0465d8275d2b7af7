#include "scaletrain/optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/serialize/archive.h>

#include "scaletrain/core/version.h"
#include "adamw_cpu.h"
#include "core/tensor_dtype.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "adamw_cuda.h"
#endif

namespace scaletrain::optim {
namespace {

void check_options(const torch::optim::AdamWOptions& o, const std::string& where) {
  auto fail = [&](const std::string& name, double got, const std::string& expected) {
    throw std::invalid_argument(where + name + ": got " + std::to_string(got) + ", expected " + expected);
  };
  if (!(o.lr() >= 0) || !std::isfinite(o.lr())) fail("lr", o.lr(), "a finite number >= 0");
  const auto [beta1, beta2] = o.betas();
  if (!(beta1 >= 0 && beta1 < 1)) fail("betas[0]", beta1, "a number in [0, 1)");
  if (!(beta2 >= 0 && beta2 < 1)) fail("betas[1]", beta2, "a number in [0, 1)");
  if (!(o.eps() >= 0) || !std::isfinite(o.eps())) fail("eps", o.eps(), "a finite number >= 0");
  if (!(o.weight_decay() >= 0) || !std::isfinite(o.weight_decay()))
    fail("weight_decay", o.weight_decay(), "a finite number >= 0");
  if (o.amsgrad()) throw std::invalid_argument(where + "amsgrad: true is not supported by scaletrain::optim::AdamW");
}

const torch::optim::AdamWOptions& options_of(const torch::optim::OptimizerParamGroup& group) {
  return static_cast<const torch::optim::AdamWOptions&>(group.options());
}

// A device scalar of StepScale: one element of `type` on `device`, or undefined.
void check_scale_tensor(const at::Tensor& t, const char* name, const c10::Device& device,
                        at::ScalarType type = at::kFloat) {
  if (!t.defined()) return;
  if (t.numel() != 1 || t.scalar_type() != type)
    throw std::invalid_argument(std::string("StepScale.") + name + ": expected one " +
                                (type == at::kDouble ? "float64" : "float32") + " element, got " + std::to_string(t.numel()) + " of " +
                                std::string(c10::toString(t.scalar_type())));
  if (t.device() != device)
    throw std::invalid_argument(std::string("StepScale.") + name + ": on " + t.device().str() +
                                ", the parameters are on " + device.str());
}

// One parameter's tensors for the update (copy may be undefined).
struct Work {
  at::Tensor param, grad, exp_avg, exp_avg_sq, step, copy;
};

// torch.optim.AdamW's per-parameter constants, in the order of operations of the CUDA kernel.
cpu::Coeffs coefficients(const torch::optim::AdamWOptions& o, double step, float factor) {
  const auto [beta1, beta2] = o.betas();
  cpu::Coeffs c;
  c.factor = factor;
  c.decay = static_cast<float>(1.0 - o.lr() * o.weight_decay());
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.step_size = static_cast<float>(o.lr() / (1.0 - std::pow(beta1, step)));
  c.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  c.eps = static_cast<float>(o.eps());
  return c;
}

// Elements per task of ATen's thread pool: large enough that a task streams for tens of
// microseconds, small enough to balance a few large tensors over the threads.
constexpr int64_t kCpuGrain = 1 << 16;

void step_cpu(const std::vector<Work>& work, const torch::optim::AdamWOptions& o, float factor) {
  // One parallel_for over the group's elements (parameters laid end to end), not one per parameter:
  // a model's many small tensors share tasks, and the pool is joined once per group.
  struct Span {
    cpu::Coeffs c;
    float *p, *m, *v;
    const char* g;
    char* copy;
    core::DType grad_type, copy_type;
    size_t grad_size, copy_size;
    int64_t start;  // offset of the parameter's first element in the group
  };
  std::vector<Span> spans;
  spans.reserve(work.size());
  int64_t total = 0;
  for (const auto& w : work) {
    w.step.add_(1);
    spans.push_back({coefficients(o, w.step.item<float>(), factor), w.param.data_ptr<float>(),
                     w.exp_avg.data_ptr<float>(), w.exp_avg_sq.data_ptr<float>(),
                     static_cast<const char*>(w.grad.const_data_ptr()),
                     w.copy.defined() ? static_cast<char*>(w.copy.data_ptr()) : nullptr, core::dtype_of(w.grad),
                     core::dtype_of(w.copy), static_cast<size_t>(w.grad.element_size()),
                     w.copy.defined() ? static_cast<size_t>(w.copy.element_size()) : 0, total});
    total += w.param.numel();
  }
  at::parallel_for(0, total, kCpuGrain, [&](int64_t begin, int64_t end) {
    // The last span starting at or before `begin`, then forward through the spans the range covers.
    auto it = std::upper_bound(spans.begin(), spans.end(), begin,
                               [](int64_t x, const Span& s) { return x < s.start; }) - 1;
    for (; it != spans.end() && it->start < end; ++it) {
      const int64_t size = (it + 1 == spans.end() ? total : (it + 1)->start) - it->start;
      const int64_t lo = std::max(begin, it->start) - it->start, hi = std::min(end, it->start + size) - it->start;
      if (lo >= hi) continue;
      cpu::adamw_span(it->c, it->p + lo, it->m + lo, it->v + lo, it->g + lo * it->grad_size, it->grad_type,
                      it->copy ? it->copy + lo * it->copy_size : nullptr, it->copy_type, hi - lo);
    }
  });
}

#ifdef SCALETRAIN_WITH_CUDA
void step_cuda(const std::vector<Work>& work, const torch::optim::AdamWOptions& o, const StepScale& scale) {
  const c10::cuda::CUDAGuard guard(work.front().param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto [beta1, beta2] = o.betas();
  const cuda::Hyper hyper{o.lr(), beta1, beta2, o.eps(), o.weight_decay()};
  const float* factor = scale.factor.defined() ? scale.factor.data_ptr<float>() : nullptr;
  const double* lr = scale.lr.defined() ? scale.lr.const_data_ptr<double>() : nullptr;
  const float* found_inf = scale.found_inf.defined() ? scale.found_inf.data_ptr<float>() : nullptr;
  // One launch sequence per (gradient dtype, copy dtype) present, in first-seen order.
  std::vector<std::tuple<cuda::DType, cuda::DType, std::vector<cuda::ParamSpan>>> sets;
  for (const auto& w : work) {
    const auto grad_type = core::dtype_of(w.grad), copy_type = core::dtype_of(w.copy);
    auto it = sets.begin();
    while (it != sets.end() && !(std::get<0>(*it) == grad_type && std::get<1>(*it) == copy_type)) ++it;
    if (it == sets.end()) it = sets.insert(sets.end(), {grad_type, copy_type, {}});
    std::get<2>(*it).push_back({w.param.data_ptr<float>(), w.grad.const_data_ptr(), w.exp_avg.data_ptr<float>(),
                                w.exp_avg_sq.data_ptr<float>(), w.copy.defined() ? w.copy.data_ptr() : nullptr,
                                w.step.data_ptr<float>(), w.param.numel()});
  }
  for (const auto& [grad_type, copy_type, spans] : sets) {
    const cudaError_t status = cuda::launch_adamw(spans.data(), static_cast<int64_t>(spans.size()), grad_type,
                                                  copy_type, hyper, lr, factor, found_inf, stream);
    if (status != cudaSuccess)
      throw std::runtime_error(std::string("scaletrain::optim::AdamW::step: ") + cudaGetErrorString(status));
  }
}
#endif

}  // namespace

void AdamWParamState::serialize(torch::serialize::OutputArchive& archive) const {
  archive.write("step", step());
  archive.write("exp_avg", exp_avg());
  archive.write("exp_avg_sq", exp_avg_sq());
}

void AdamWParamState::serialize(torch::serialize::InputArchive& archive) {
  at::Tensor m, v;  // separate handles: reading into a defined tensor would set_ it in place
  archive.read("exp_avg", m);
  archive.read("exp_avg_sq", v);
  exp_avg(m);
  exp_avg_sq(v);
  c10::IValue saved;
  archive.read("step", saved);
  // torch::optim::AdamW stores the count as an integer; ours as a float32 tensor.
  at::Tensor count = saved.isTensor() ? saved.toTensor() : at::scalar_tensor(static_cast<double>(saved.toInt()));
  step(count.to(exp_avg().device(), at::kFloat).reshape({}).clone());
}

AdamW::AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, torch::optim::AdamWOptions defaults)
    : Optimizer(param_groups, std::make_unique<torch::optim::AdamWOptions>(defaults)) {
  check_options(defaults, "");
  for (size_t i = 0; i < this->param_groups().size(); ++i)
    check_options(options_of(this->param_groups()[i]), "param_groups[" + std::to_string(i) + "].");
}

AdamW::AdamW(std::vector<at::Tensor> params, torch::optim::AdamWOptions defaults)
    : AdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

void AdamW::set_model_copies(std::vector<at::Tensor> copies) {
  if (!copies.empty()) {
    size_t index = 0;
    for (const auto& group : param_groups()) {
      for (const auto& p : group.params()) {
        const std::string name = "copies[" + std::to_string(index) + "]";
        if (index >= copies.size())
          throw std::invalid_argument("copies: got " + std::to_string(copies.size()) + " tensors, expected one per parameter");
        const auto& c = copies[index++];
        if (!c.defined() || c.sizes() != p.sizes())
          throw std::invalid_argument(name + ": expected a tensor of the parameter's shape");
        if (c.scalar_type() != at::kBFloat16 && c.scalar_type() != at::kHalf && c.scalar_type() != at::kFloat)
          throw std::invalid_argument(name + ": dtype " + std::string(c10::toString(c.scalar_type())) +
                                      ", expected bfloat16, float16 or float32");
        if (!c.is_contiguous() || c.device() != p.device())
          throw std::invalid_argument(name + ": expected a contiguous tensor on " + p.device().str());
      }
    }
    if (index != copies.size())
      throw std::invalid_argument("copies: got " + std::to_string(copies.size()) + " tensors, expected " +
                                  std::to_string(index) + " (one per parameter)");
  }
  copies_ = std::move(copies);
}

at::Tensor AdamW::step(LossClosure closure) {
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  step(StepScale{});
  return loss;
}

void AdamW::step(const StepScale& scale) {
  at::NoGradGuard no_grad;
  size_t total = 0;
  for (const auto& group : param_groups()) total += group.params().size();
  if (!copies_.empty() && copies_.size() != total)
    throw std::invalid_argument("model copies: " + std::to_string(copies_.size()) + " for " + std::to_string(total) +
                                " parameters (param groups changed after set_model_copies)");
  const auto groups = static_cast<int64_t>(param_groups().size());
  if (scale.lr.defined() && scale.lr.numel() != 1 && scale.lr.numel() != groups)
    throw std::invalid_argument("StepScale.lr: " + std::to_string(scale.lr.numel()) + " elements for " +
                                std::to_string(groups) + " param groups (expected one per group, or one)");
  size_t index = 0;
  for (size_t gi = 0; gi < param_groups().size(); ++gi) {
    auto& group = param_groups()[gi];
    StepScale group_scale = scale;
    if (scale.lr.defined()) group_scale.lr = scale.lr.reshape({-1}).narrow(0, scale.lr.numel() == 1 ? 0 : gi, 1);
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps, copies;
    for (auto& p : group.params()) {
      at::Tensor copy = copies_.empty() ? at::Tensor() : copies_[index];
      ++index;
      at::Tensor grad = p.grad().defined() ? p.grad() : (copy.defined() ? copy.grad() : at::Tensor());
      if (!grad.defined()) continue;
      auto& slot = state()[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto fresh = std::make_unique<AdamWParamState>();
        fresh->step(at::zeros({}, p.options().dtype(at::kFloat)));
        fresh->exp_avg(at::zeros_like(p, at::MemoryFormat::Contiguous));
        fresh->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Contiguous));
        slot = std::move(fresh);
      }
      auto* st = dynamic_cast<AdamWParamState*>(slot.get());
      if (st == nullptr)
        throw std::logic_error("param_groups[" + std::to_string(gi) + "]: optimizer state of another type");
      params.push_back(p), grads.push_back(grad), exp_avgs.push_back(st->exp_avg());
      exp_avg_sqs.push_back(st->exp_avg_sq()), steps.push_back(st->step()), copies.push_back(copy);
    }
    if (params.empty()) continue;
    try {
      adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, copies, options_of(group), group_scale);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("param_groups[" + std::to_string(gi) + "]: " + e.what());
    }
  }
}

void adamw_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<at::Tensor>& steps, const std::vector<at::Tensor>& copies,
                 const torch::optim::AdamWOptions& options, const StepScale& scale) {
  check_options(options, "");
  const size_t n = params.size();
  auto same_count = [n](const std::vector<at::Tensor>& list, const char* name) {
    if (list.size() != n)
      throw std::invalid_argument(std::string(name) + ": " + std::to_string(list.size()) + " tensors for " +
                                  std::to_string(n) + " params");
  };
  same_count(grads, "grads"), same_count(exp_avgs, "exp_avgs"), same_count(exp_avg_sqs, "exp_avg_sqs");
  same_count(steps, "steps");
  if (!copies.empty()) same_count(copies, "copies");
  if (n == 0) return;
  at::NoGradGuard no_grad;
  const auto tensor_type = [](const at::Tensor& t) { return std::string(c10::toString(t.scalar_type())); };
  const c10::Device device = params.front().device();
  std::vector<Work> work;
  for (size_t i = 0; i < n; ++i) {
    // Built only for an error message: this loop runs for every parameter of every step.
    const auto at_index = [i] { return "[" + std::to_string(i) + "]"; };
    const at::Tensor& p = params[i];
    if (!p.defined() || p.scalar_type() != at::kFloat || !p.is_contiguous())
      throw std::invalid_argument("params" + at_index() + ": expected a contiguous float32 tensor" +
                                  (p.defined() ? ", got " + tensor_type(p) + (p.is_contiguous() ? "" : " (not contiguous)")
                                               : ""));
    if (p.device() != device)
      throw std::invalid_argument("params" + at_index() + ": on " + p.device().str() + ", params[0] is on " +
                                  device.str() + " (expected one device)");
    const at::Tensor& g = grads[i];
    if (!g.defined() || g.is_sparse() || g.sizes() != p.sizes() || !g.is_contiguous() || g.device() != device)
      throw std::invalid_argument("grads" + at_index() + ": expected a dense contiguous tensor of the parameter's shape on " +
                                  device.str());
    if (g.scalar_type() != at::kFloat && g.scalar_type() != at::kHalf && g.scalar_type() != at::kBFloat16)
      throw std::invalid_argument("grads" + at_index() + ": dtype " + tensor_type(g) +
                                  ", expected float32, bfloat16 or float16");
    for (const auto& [list, name] : {std::pair{&exp_avgs, "exp_avgs"}, std::pair{&exp_avg_sqs, "exp_avg_sqs"}}) {
      const at::Tensor& t = (*list)[i];
      if (!t.defined() || t.sizes() != p.sizes() || !t.is_contiguous() || t.device() != device ||
          t.scalar_type() != at::kFloat)
        throw std::invalid_argument(std::string(name) + at_index() +
                                    ": expected a contiguous float32 tensor of the parameter's shape on " +
                                    device.str() + " (a saved state from another model?)");
    }
    const at::Tensor& s = steps[i];
    if (!s.defined() || s.numel() != 1 || s.scalar_type() != at::kFloat || s.device() != device)
      throw std::invalid_argument("steps" + at_index() + ": expected one float32 element on " + device.str());
    at::Tensor copy = copies.empty() ? at::Tensor() : copies[i];
    if (copy.defined()) {
      if (copy.sizes() != p.sizes() || !copy.is_contiguous() || copy.device() != device ||
          (copy.scalar_type() != at::kBFloat16 && copy.scalar_type() != at::kHalf && copy.scalar_type() != at::kFloat))
        throw std::invalid_argument("copies" + at_index() +
                                    ": expected a contiguous bfloat16, float16 or float32 tensor of the parameter's "
                                    "shape on " + device.str());
      if (copy.data_ptr() == p.data_ptr()) copy = at::Tensor();  // the parameter itself
    }
    work.push_back({p, g, exp_avgs[i], exp_avg_sqs[i], s, copy});
  }
  check_scale_tensor(scale.factor, "factor", device);
  check_scale_tensor(scale.found_inf, "found_inf", device);
  check_scale_tensor(scale.lr, "lr", device, at::kDouble);
  if (device.is_cpu()) {
    if (scale.found_inf.defined() && scale.found_inf.item<float>() != 0.f) return;
    torch::optim::AdamWOptions o = options;
    if (scale.lr.defined()) {
      o.lr(scale.lr.item<double>());
      check_options(o, "StepScale.");  // "StepScale.lr: got ..."
    }
    step_cpu(work, o, scale.factor.defined() ? scale.factor.item<float>() : 1.f);
    return;
  }
#ifdef SCALETRAIN_WITH_CUDA
  if (device.is_cuda()) {
    step_cuda(work, options, scale);
    return;
  }
#endif
  throw std::invalid_argument("params: on " + device.str() + ", expected CPU or CUDA");
}

void AdamW::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<AdamWParamState, torch::optim::AdamWOptions>(archive, *this);
}

void AdamW::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<AdamWParamState, torch::optim::AdamWOptions>(archive, *this);
}

}  // namespace scaletrain::optim
