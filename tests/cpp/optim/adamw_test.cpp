// The fused AdamW. Reference: LibTorch's own torch::optim::AdamW (separate ATen ops per
// parameter), stepped on the same parameters and gradients; fp32 agreement within 1e-6 of each
// tensor's largest magnitude after 10 steps.
#include <sstream>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>
#include <torch/serialize/archive.h>

#include "scaletrain/optim/adamw.h"
#include "test_util.h"

namespace scaletrain::optim {
namespace {

using torch::optim::AdamWOptions;
using torch::optim::OptimizerParamGroup;

// Parameter shapes: odd sizes, one above the CPU grain and the CUDA chunk, and (with `many`) more
// than one CUDA launch holds.
std::vector<at::Tensor> make_params(const at::TensorOptions& options, bool many) {
  at::manual_seed(11);
  std::vector<int64_t> sizes = {1, 7, 1000, 70001, 4096, 3};
  if (many)
    for (int i = 0; i < 260; ++i) sizes.push_back(1 + (i * 997) % 5003);  // > 256 tensors: two launches
  std::vector<at::Tensor> params;
  for (const int64_t n : sizes) params.push_back(at::randn({n}, options).requires_grad_(true));
  return params;
}

std::vector<at::Tensor> clones(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> out;
  for (const auto& p : params) out.push_back(p.detach().clone().requires_grad_(true));
  return out;
}

// Two groups with their own lr, betas, eps and weight decay.
std::vector<OptimizerParamGroup> two_groups(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> first(params.begin(), params.begin() + 3), second(params.begin() + 3, params.end());
  std::vector<OptimizerParamGroup> groups;
  groups.emplace_back(first, std::make_unique<AdamWOptions>(AdamWOptions(3e-3).betas({0.9, 0.95}).weight_decay(0.1)));
  groups.emplace_back(second, std::make_unique<AdamWOptions>(AdamWOptions(1e-3).betas({0.8, 0.999}).eps(1e-6).weight_decay(0.0)));
  return groups;
}

// max |got - want| <= rtol * the largest magnitude of that kind of tensor (values, exp_avg,
// exp_avg_sq) over all parameters: relative at the model's scale. Per tensor it would fail on
// rounding alone where a moment of one element cancels to far below its terms.
double max_error(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  const auto g = got.detach().cpu().to(at::kDouble), w = want.detach().cpu().to(at::kDouble);
  EXPECT_EQ(g.sizes(), w.sizes()) << what;
  return (g - w).abs().max().item<double>();
}

double max_abs(const at::Tensor& t) { return t.detach().abs().max().item<double>(); }

void expect_state_close(AdamW& ours, torch::optim::AdamW& reference, const std::vector<at::Tensor>& a,
                        const std::vector<at::Tensor>& b, double rtol) {
  const char* kinds[3] = {"value", "exp_avg", "exp_avg_sq"};
  double scale[3] = {0, 0, 0}, err[3] = {0, 0, 0};
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string what = "parameter " + std::to_string(i);
    auto& s = dynamic_cast<AdamWParamState&>(*ours.state().at(a[i].unsafeGetTensorImpl()));
    auto& r = dynamic_cast<torch::optim::AdamWParamState&>(*reference.state().at(b[i].unsafeGetTensorImpl()));
    const at::Tensor got[3] = {a[i], s.exp_avg(), s.exp_avg_sq()}, want[3] = {b[i], r.exp_avg(), r.exp_avg_sq()};
    for (int k = 0; k < 3; ++k) {
      scale[k] = std::max(scale[k], max_abs(want[k]));
      err[k] = std::max(err[k], max_error(got[k], want[k], what + " " + kinds[k]));
    }
    EXPECT_EQ(s.step().item<double>(), static_cast<double>(r.step())) << what;
  }
  for (int k = 0; k < 3; ++k)
    EXPECT_LE(err[k], rtol * scale[k]) << kinds[k] << ": max error " << err[k] << " against max magnitude " << scale[k];
}

void set_grads(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, double scale) {
  for (size_t i = 0; i < a.size(); ++i) {
    auto g = at::randn_like(a[i]).mul_(scale);
    a[i].mutable_grad() = g.clone();
    b[i].mutable_grad() = g.clone();
  }
}

void check_matches_torch(const at::TensorOptions& options, bool many) {
  auto ours_params = make_params(options, many);
  auto ref_params = clones(ours_params);
  AdamW ours(two_groups(ours_params));
  torch::optim::AdamW reference(two_groups(ref_params));
  for (int step = 0; step < 10; ++step) {
    if (step == 5)  // a schedule changes lr between steps
      for (auto* opt : std::initializer_list<torch::optim::Optimizer*>{&ours, &reference})
        for (auto& group : opt->param_groups()) group.options().set_lr(group.options().get_lr() * 0.5);
    set_grads(ours_params, ref_params, 0.1 * (step + 1));
    ours.step();
    reference.step();
  }
  expect_state_close(ours, reference, ours_params, ref_params, 1e-6);
}

TEST(AdamW, CpuMatchesTorchAdamWOverTenStepsAndTwoGroups) { check_matches_torch(at::TensorOptions(), false); }

// StepScale: a factor multiplies each gradient; a found-inf flag leaves everything unchanged.
void check_step_scale(const at::TensorOptions& options) {
  auto ours_params = make_params(options, true);
  auto ref_params = clones(ours_params);
  AdamW ours(two_groups(ours_params));
  torch::optim::AdamW reference(two_groups(ref_params));
  const auto flag = [&](float v) { return at::full({1}, v, options.dtype(at::kFloat)); };
  for (int step = 0; step < 6; ++step) {
    set_grads(ours_params, ref_params, 1000.0);
    const double factor = 1.0 / (1000.0 * (step + 1));
    for (auto& p : ref_params) p.mutable_grad().mul_(factor);
    if (step == 2) {  // an overflow step: nothing moves, step counts included
      std::vector<at::Tensor> before, m_before;
      for (const auto& p : ours_params) {
        before.push_back(p.detach().clone());
        m_before.push_back(dynamic_cast<AdamWParamState&>(*ours.state().at(p.unsafeGetTensorImpl())).exp_avg().clone());
      }
      ours.step(StepScale{flag(static_cast<float>(factor)), flag(1.f)});
      for (size_t i = 0; i < ours_params.size(); ++i) {
        auto& s = dynamic_cast<AdamWParamState&>(*ours.state().at(ours_params[i].unsafeGetTensorImpl()));
        EXPECT_TRUE(at::equal(ours_params[i].detach(), before[i])) << "parameter " << i << " moved on a skipped step";
        EXPECT_TRUE(at::equal(s.exp_avg(), m_before[i])) << "parameter " << i;
        EXPECT_EQ(s.step().item<float>(), 2.f) << "parameter " << i;
      }
      continue;
    }
    ours.step(StepScale{flag(static_cast<float>(factor)), flag(0.f)});
    reference.step();
  }
  // The factor is applied as one float32 multiply; torch's gradients got a double one.
  expect_state_close(ours, reference, ours_params, ref_params, 2e-6);
}

TEST(AdamW, CpuStepScaleFactorAndFoundInf) { check_step_scale(at::TensorOptions()); }


// bf16 model weights with fp32 masters: the gradient is read from the copy, the copy written.
void check_model_copies(const at::TensorOptions& options, at::ScalarType low) {
  auto master = make_params(options, false);
  auto ref_params = clones(master);
  std::vector<at::Tensor> copies;
  for (const auto& p : master) copies.push_back(p.detach().to(low).requires_grad_(true));
  AdamW ours(two_groups(master));
  ours.set_model_copies(copies);
  torch::optim::AdamW reference(two_groups(ref_params));
  for (int step = 0; step < 10; ++step) {
    for (size_t i = 0; i < master.size(); ++i) {
      auto g = at::randn_like(master[i]).to(low);
      copies[i].mutable_grad() = g;
      ref_params[i].mutable_grad() = g.to(at::kFloat);
    }
    ours.step();
    reference.step();
    for (size_t i = 0; i < master.size(); ++i)
      ASSERT_TRUE(at::equal(copies[i].detach(), master[i].detach().to(low))) << "copy " << i << " step " << step;
  }
  expect_state_close(ours, reference, master, ref_params, 1e-6);
}

TEST(AdamW, CpuBf16GradientsFromModelCopiesAndCopiesWritten) {
  check_model_copies(at::TensorOptions(), at::kBFloat16);
}

// A checkpoint continues the run exactly; one of torch::optim::AdamW loads too.
TEST(AdamW, SaveLoadContinuesBitForBitAndLoadsTorchAdamWState) {
  auto params = make_params(at::TensorOptions(), false);
  auto resumed_params = clones(params);
  AdamW run(two_groups(params));
  for (int step = 0; step < 3; ++step) {
    set_grads(params, resumed_params, 1.0);
    run.step();
  }
  std::ostringstream saved;
  {
    torch::serialize::OutputArchive archive;
    run.save(archive);
    archive.save_to(saved);
  }
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) resumed_params[i].copy_(params[i]);
  }
  AdamW resumed(two_groups(resumed_params));
  torch::serialize::InputArchive in;
  std::istringstream stream(saved.str());
  in.load_from(stream);
  resumed.load(in);
  for (int step = 0; step < 3; ++step) {
    set_grads(params, resumed_params, 1.0);
    run.step();
    resumed.step();
  }
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_TRUE(at::equal(params[i].detach(), resumed_params[i].detach())) << "parameter " << i;

  // torch's state (integer step counts) into ours.
  auto torch_params = make_params(at::TensorOptions(), false);
  auto ours_params = clones(torch_params);
  torch::optim::AdamW reference(two_groups(torch_params));
  set_grads(torch_params, ours_params, 1.0);
  reference.step();
  std::ostringstream torch_saved;
  torch::serialize::OutputArchive torch_archive;
  reference.save(torch_archive);
  torch_archive.save_to(torch_saved);
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < ours_params.size(); ++i) ours_params[i].copy_(torch_params[i]);
  }
  AdamW ours(two_groups(ours_params));
  torch::serialize::InputArchive torch_in;
  std::istringstream torch_stream(torch_saved.str());
  torch_in.load_from(torch_stream);
  ours.load(torch_in);
  set_grads(torch_params, ours_params, 1.0);
  reference.step();
  ours.step();
  expect_state_close(ours, reference, ours_params, torch_params, 1e-6);
}

template <typename F>
void expect_invalid(F f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected std::invalid_argument mentioning '" << needle << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(AdamW, RejectsBadOptionsAndTensorsByName) {
  auto p = at::randn({4}).requires_grad_(true);
  expect_invalid([&] { AdamW({p}, AdamWOptions(-1.0)); }, "lr");
  expect_invalid([&] { AdamW({p}, AdamWOptions(1e-3).betas({0.9, 1.0})); }, "betas[1]");
  expect_invalid([&] { AdamW({p}, AdamWOptions(1e-3).eps(-1)); }, "eps");
  expect_invalid([&] { AdamW({p}, AdamWOptions(1e-3).weight_decay(NAN)); }, "weight_decay");
  expect_invalid([&] { AdamW({p}, AdamWOptions(1e-3).amsgrad(true)); }, "amsgrad");
  {
    auto half = at::randn({4}).to(at::kBFloat16).requires_grad_(true);
    half.mutable_grad() = at::ones_like(half);
    AdamW opt({half});
    expect_invalid([&] { opt.step(); }, "expected a contiguous float32 tensor, got BFloat16");
  }
  {
    p.mutable_grad() = at::ones({4}, at::kDouble);
    AdamW opt({p});
    expect_invalid([&] { opt.step(); }, "grads[0]: dtype Double");
    p.mutable_grad() = at::ones({4});
    expect_invalid([&] { opt.step(StepScale{at::ones({2}), {}}); }, "StepScale.factor: expected one float32 element");
    expect_invalid([&] { opt.step(StepScale{{}, at::ones({1}, at::kDouble)}); }, "StepScale.found_inf");
    expect_invalid([&] { opt.set_model_copies({at::ones({5}, at::kBFloat16)}); }, "copies[0]: expected a tensor of the parameter's shape");
    expect_invalid([&] { opt.set_model_copies({at::ones({4}, at::kBFloat16), at::ones({4}, at::kBFloat16)}); },
                   "copies: got 2 tensors, expected 1");
    auto strided = at::ones({8}, at::kBFloat16).slice(0, 0, 8, 2);
    expect_invalid([&] { opt.set_model_copies({strided}); }, "copies[0]: expected a contiguous tensor");
  }
}

// StepScale.lr: the learning rate read from device memory (one per group, or one for all) in
// place of the group options', as a CUDA-graph replay needs. Reference: torch's AdamW with the
// same schedule in its options; and bit for bit our own step with the lr in the options.
void check_lr_on_device(const at::TensorOptions& options) {
  auto ours_params = make_params(options, true);
  auto host_params = clones(ours_params), ref_params = clones(ours_params);
  AdamW ours(two_groups(ours_params)), host(two_groups(host_params));
  torch::optim::AdamW reference(two_groups(ref_params));
  for (auto& group : ours.param_groups()) group.options().set_lr(0.5);  // ignored: the device lr wins
  at::Tensor lr = at::empty({2}, options.dtype(at::kDouble));
  for (int step = 0; step < 8; ++step) {
    const double first = 3e-3 / (step + 1), second = step < 4 ? 1e-3 : first;  // step 4 on: one for all
    for (auto* opt : std::initializer_list<torch::optim::Optimizer*>{&host, &reference}) {
      opt->param_groups()[0].options().set_lr(first);
      opt->param_groups()[1].options().set_lr(second);
    }
    set_grads(ours_params, ref_params, 0.1);
    for (size_t i = 0; i < ours_params.size(); ++i) host_params[i].mutable_grad() = ours_params[i].grad().clone();
    if (step < 4) {
      lr[0].fill_(first), lr[1].fill_(second);
      ours.step(StepScale{{}, {}, lr});
    } else {
      ours.step(StepScale{{}, {}, at::full({1}, first, options.dtype(at::kDouble))});
    }
    host.step();
    reference.step();
  }
  expect_state_close(ours, reference, ours_params, ref_params, 1e-6);
  for (size_t i = 0; i < ours_params.size(); ++i) {
    auto& a = dynamic_cast<AdamWParamState&>(*ours.state().at(ours_params[i].unsafeGetTensorImpl()));
    auto& b = dynamic_cast<AdamWParamState&>(*host.state().at(host_params[i].unsafeGetTensorImpl()));
    EXPECT_TRUE(at::equal(ours_params[i].detach(), host_params[i].detach())) << "parameter " << i;
    EXPECT_TRUE(at::equal(a.exp_avg(), b.exp_avg()) && at::equal(a.exp_avg_sq(), b.exp_avg_sq())) << "parameter " << i;
  }
  expect_invalid([&] { ours.step(StepScale{{}, {}, at::ones({3}, options.dtype(at::kDouble))}); },
                 "StepScale.lr: 3 elements for 2 param groups");
  expect_invalid([&] { ours.step(StepScale{{}, {}, at::ones({1}, options.dtype(at::kFloat))}); },
                 "StepScale.lr: expected one float64 element");
}

TEST(AdamW, CpuLearningRateFromATensor) { check_lr_on_device(at::TensorOptions()); }

TEST(AdamW, CudaMatchesTorchAdamWOverTenStepsAndTwoGroups) {
  SCALETRAIN_REQUIRE_CUDA();
  check_matches_torch(at::TensorOptions().device(at::kCUDA), true);
}

TEST(AdamW, CudaStepScaleFactorAndFoundInfWithoutHostRead) {
  SCALETRAIN_REQUIRE_CUDA();
  check_step_scale(at::TensorOptions().device(at::kCUDA));
}

TEST(AdamW, CudaLearningRateFromDeviceMemory) {
  SCALETRAIN_REQUIRE_CUDA();
  check_lr_on_device(at::TensorOptions().device(at::kCUDA));
}

TEST(AdamW, CudaBf16AndFp16ModelCopies) {
  SCALETRAIN_REQUIRE_CUDA();
  check_model_copies(at::TensorOptions().device(at::kCUDA), at::kBFloat16);
  check_model_copies(at::TensorOptions().device(at::kCUDA), at::kHalf);
}

// Views that start 4 bytes past an aligned address take the kernel's scalar path.
TEST(AdamW, CudaUnalignedParametersMatchTorch) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto options = at::TensorOptions().device(at::kCUDA);
  auto base = at::randn({70003}, options);
  std::vector<at::Tensor> ours_params = {at::from_blob(base.data_ptr<float>() + 1, {70001}, options).requires_grad_(true)};
  auto ref_params = clones(ours_params);
  AdamW ours(ours_params, AdamWOptions(1e-3));
  torch::optim::AdamW reference(ref_params, AdamWOptions(1e-3));
  for (int step = 0; step < 10; ++step) {
    set_grads(ours_params, ref_params, 1.0);
    ours.step();
    reference.step();
  }
  expect_state_close(ours, reference, ours_params, ref_params, 1e-6);
}

}  // namespace
}  // namespace scaletrain::optim
