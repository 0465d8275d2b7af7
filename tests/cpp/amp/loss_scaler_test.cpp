// LossScaler. References: a scale trajectory worked out by hand from the rules (growth after
// growth_interval finite steps, backoff after `hysteresis` overflows, floor and ceiling), and a
// plain fp32 AdamW run that never sees the overflowing batches (scaling by powers of two is exact
// in fp32, so the weights must match bit for bit). The trajectory against torch.amp.GradScaler
// itself is checked in tests/python/test_amp.py.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adamw.h>

#include "scaletrain/amp/loss_scaler.h"
#include "test_util.h"

namespace scaletrain::amp {
namespace {

TEST(LossScaler, HysteresisFloorAndCeilingFollowTheRules) {
  LossScaler scaler(LossScalerOptions().init_scale(8).growth_interval(2).hysteresis(2).min_scale(2).max_scale(32));
  // (overflow?, scale after update), worked out by hand.
  const std::vector<std::pair<bool, double>> steps = {
      {false, 8},  {false, 16},  // 2 good steps: grow
      {true, 16},                // first overflow absorbed by hysteresis
      {true, 8},   {true, 4},    // hysteresis spent: every overflow backs off
      {false, 4},  {false, 8},   // growth restores hysteresis
      {true, 8},   {false, 8},  {false, 16}, {false, 16}, {false, 32},
      {false, 32}, {false, 32},  // ceiling
      {true, 32},  {true, 16},  {true, 8},   {true, 4},   {true, 2}, {true, 2},  // floor
  };
  int64_t overflows = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    scaler.update(steps[i].first);
    overflows += steps[i].first;
    EXPECT_EQ(scaler.get_scale(), steps[i].second) << "after step " << i;
  }
  EXPECT_EQ(scaler.skipped_steps(), overflows);
}

// keep_on_device: the same trajectory from a flag in device memory, with no host read; reference:
// the host scaler fed the same overflows (non-power-of-two factors, hysteresis, floor, ceiling).
void check_device_trajectory(const at::TensorOptions& options) {
  const auto rules = LossScalerOptions().init_scale(1000).growth_factor(3).backoff_factor(0.7).growth_interval(2)
                         .hysteresis(2).min_scale(10).max_scale(5000);
  LossScaler host(rules), device(rules);
  device.keep_on_device(options.device());
  const auto flag = at::empty({1}, options.dtype(at::kFloat));
  const auto loss = at::full({}, 1.7, options.dtype(at::kFloat));
  for (int step = 0; step < 40; ++step) {
    const bool overflow = (step * 7) % 5 < 2 || (step > 20 && step < 28);
    EXPECT_TRUE(at::equal(device.scale(loss).cpu(), host.scale(loss.cpu()))) << "step " << step;
    EXPECT_EQ(device.inv_scale().item<float>(), static_cast<float>(1.0 / host.get_scale())) << "step " << step;
    flag.fill_(overflow ? 1.f : 0.f);
    device.update(flag);
    host.update(overflow);
    const auto a = device.state_dict(), b = host.state_dict();
    EXPECT_EQ(a.scale, b.scale) << "step " << step;
    EXPECT_EQ(a.growth_tracker, b.growth_tracker) << "step " << step;
    EXPECT_EQ(a.hysteresis_tracker, b.hysteresis_tracker) << "step " << step;
    EXPECT_EQ(a.skipped_steps, b.skipped_steps) << "step " << step;
  }
  // Host-side writes reach the device state.
  device.load_state_dict({64.0, 1, 2, 5});
  EXPECT_EQ(device.inv_scale().item<float>(), 1.f / 64);
  EXPECT_EQ(device.skipped_steps(), 5);
  device.update(true);
  EXPECT_EQ(device.skipped_steps(), 6);
  EXPECT_THROW(device.update(at::ones({2}, options.dtype(at::kFloat))), std::invalid_argument);
  EXPECT_THROW(host.inv_scale(), std::logic_error);
}

TEST(LossScaler, CpuStateKeptInTensorsFollowsTheHostTrajectory) { check_device_trajectory(at::TensorOptions()); }

TEST(LossScaler, CudaStateOnTheDeviceFollowsTheHostTrajectory) {
  SCALETRAIN_REQUIRE_CUDA();
  check_device_trajectory(at::TensorOptions().device(at::kCUDA));
}

TEST(LossScaler, StaticScaleNeverMovesButStillSkips) {
  LossScaler scaler(LossScalerOptions().init_scale(128).dynamic(false).growth_interval(1));
  for (bool overflow : {false, true, false, true, true}) scaler.update(overflow);
  EXPECT_EQ(scaler.get_scale(), 128);
  EXPECT_EQ(scaler.skipped_steps(), 3);
}

TEST(LossScaler, StateDictContinuesTheTrajectory) {
  LossScalerOptions options = LossScalerOptions().growth_interval(3).hysteresis(2);
  LossScaler a(options), b(options);
  const std::vector<bool> first = {false, true, false, false, true, true, false};
  const std::vector<bool> rest = {false, false, false, true, true, false, false, false};
  for (bool o : first) a.update(o);
  b.load_state_dict(a.state_dict());
  for (bool o : rest) {
    a.update(o);
    b.update(o);
    EXPECT_EQ(a.get_scale(), b.get_scale());
  }
  EXPECT_EQ(a.state_dict().growth_tracker, b.state_dict().growth_tracker);
  EXPECT_EQ(a.state_dict().hysteresis_tracker, b.state_dict().hysteresis_tracker);
  EXPECT_EQ(a.skipped_steps(), b.skipped_steps());
  EXPECT_THROW(b.load_state_dict(LossScalerState{-1.0, 0, 1, 0}), std::invalid_argument);
}

TEST(LossScaler, MisuseIsReported) {
  LossScaler scaler;
  EXPECT_THROW(scaler.update(), std::logic_error);
  std::vector<at::Tensor> grads{at::ones({3})};
  scaler.unscale_(grads);
  EXPECT_THROW(scaler.unscale_(grads), std::logic_error);
  EXPECT_THROW(LossScaler(LossScalerOptions().backoff_factor(1.5)), std::invalid_argument);
  EXPECT_THROW(LossScaler(LossScalerOptions().growth_interval(0)), std::invalid_argument);
}

std::vector<at::Tensor> snapshot(torch::nn::Linear& layer, torch::optim::AdamW& adamw) {
  std::vector<at::Tensor> out{layer->weight.detach().clone(), layer->bias.detach().clone()};
  for (const auto& p : {layer->weight, layer->bias}) {
    auto it = adamw.state().find(p.unsafeGetTensorImpl());
    if (it == adamw.state().end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    out.push_back(s.exp_avg().clone());
    out.push_back(s.exp_avg_sq().clone());
    out.push_back(at::scalar_tensor(static_cast<double>(s.step())));
  }
  return out;
}

bool same(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!at::equal(a[i], b[i])) return false;
  return true;
}

TEST(LossScaler, InfAndNanStormNeverReachesTheWeights) {
  // Steps 4..11 and 17 produce inf or NaN gradients (as an fp16 overflow would). The scaled run
  // must skip exactly those steps and end bit-identical to an unscaled run without them.
  const std::vector<int> storm = {4, 5, 6, 7, 8, 9, 10, 11, 17};
  auto is_storm = [&](int step) { return std::find(storm.begin(), storm.end(), step) != storm.end(); };
  at::manual_seed(0);
  torch::nn::Linear ours(6, 3), reference(6, 3);
  {
    at::NoGradGuard no_grad;
    reference->weight.copy_(ours->weight);
    reference->bias.copy_(ours->bias);
  }
  torch::optim::AdamW opt_ours(ours->parameters(), torch::optim::AdamWOptions(1e-2));
  torch::optim::AdamW opt_ref(reference->parameters(), torch::optim::AdamWOptions(1e-2));
  LossScaler scaler(LossScalerOptions().init_scale(1024).growth_interval(3));
  for (int step = 0; step < 24; ++step) {
    auto x = at::randn({16, 6}), y = at::randn({16, 3});
    auto before = snapshot(ours, opt_ours);
    opt_ours.zero_grad();
    auto loss = (ours->forward(x) - y).pow(2).mean();
    if (is_storm(step)) loss = loss * (step % 2 ? INFINITY : NAN);
    scaler.scale(loss).backward();
    const bool stepped = scaler.step(opt_ours);
    scaler.update();
    EXPECT_EQ(stepped, !is_storm(step)) << "step " << step;
    if (is_storm(step)) {
      EXPECT_TRUE(same(before, snapshot(ours, opt_ours))) << "step " << step << " changed weights or AdamW state";
      continue;
    }
    opt_ref.zero_grad();
    (reference->forward(x) - y).pow(2).mean().backward();
    opt_ref.step();
  }
  EXPECT_EQ(scaler.skipped_steps(), static_cast<int64_t>(storm.size()));
  EXPECT_TRUE(at::equal(ours->weight, reference->weight));
  EXPECT_TRUE(at::equal(ours->bias, reference->bias));
  // 1024, backed off 8 times in the storm, grown on the good steps in between: well below 1024.
  EXPECT_LT(scaler.get_scale(), 1024);
}

}  // namespace
}  // namespace scaletrain::amp
