// The fused unscale + inf/NaN check + clip pass. References: the same arithmetic in fp64 with
// plain ATen ops (norm of g / scale, torch's clip coefficient min(1, max_norm / (norm + 1e-6))),
// and torch's own _amp_foreach_non_finite_check_and_unscale_ followed by clip_grad_norm_.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/nn/utils/clip_grad.h>

#include "scaletrain/amp/grad_check.h"
#include "test_util.h"

namespace scaletrain::amp {
namespace {

// Gradient-like tensors: many sizes (empty, odd, several chunks), optionally one unaligned view.
std::vector<at::Tensor> make_grads(const at::TensorOptions& options, int64_t count, bool unaligned, double scale) {
  at::manual_seed(7);
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < count; ++i) {
    // 70001 + i: a last chunk of 4465 + i elements; 74561: of 9025 (fp32: 2256 vectors, bf16 /
    // fp16: 1128, so both dtypes take the four-vector loop, the one-vector remainder and the scalar tail).
    const int64_t n = (i % 11 == 3) ? 74561 : (i % 7 == 0) ? 70001 + i : (i % 5 == 0 ? 0 : 1 + (i * 977) % 4099);
    grads.push_back(at::randn({n}, options.dtype(at::kFloat)).mul_(scale).to(options.dtype()));
  }
  if (unaligned) {  // contiguous, but 4 bytes past an aligned address: exercises the scalar path
    auto base = at::randn({33001}, options.dtype(at::kFloat)).mul_(scale).to(options.dtype());
    grads.push_back(base.narrow(0, 1, 33000));
  }
  return grads;
}

struct Expected {
  double norm;
  double factor;
};

Expected reference(const std::vector<at::Tensor>& grads, double inv_scale, double max_norm) {
  double squares = 0;
  for (const auto& g : grads) squares += g.to(at::kDouble).mul(inv_scale).pow(2).sum().item<double>();
  const double norm = std::sqrt(squares);
  const double coef = max_norm > 0 ? std::min(1.0, max_norm / (norm + 1e-6)) : 1.0;
  return {norm, inv_scale * coef};
}

void expect_scaled(const std::vector<at::Tensor>& before, const std::vector<at::Tensor>& after, double factor,
                   double rtol) {
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) {
    auto want = before[i].to(at::kDouble).mul(factor);
    auto got = after[i].cpu().to(at::kDouble);
    const double atol = rtol * (want.numel() ? want.abs().max().item<double>() : 0.0);
    EXPECT_TRUE(at::allclose(got, want, rtol, atol + 1e-30)) << "tensor " << i << " of " << before.size() << " dtype " << after[i].scalar_type() << " factor " << factor << " got " << got.flatten().slice(0, 0, 3) << " want " << want.flatten().slice(0, 0, 3);
  }
}

void check_against_fp64(const at::TensorOptions& options, at::ScalarType dtype, double max_norm, double rtol) {
  const double scale = 1024.0, inv = 1.0 / scale;
  auto grads = make_grads(options.dtype(dtype), 300, true, scale);  // > 256 tensors: two launches on CUDA
  std::vector<at::Tensor> before;
  for (const auto& g : grads) before.push_back(g.cpu().clone());
  const Expected want = reference(before, inv, max_norm);
  GradCheckResult result = unscale_check_clip_(grads, inv, max_norm);
  EXPECT_FALSE(result.found_inf());
  EXPECT_NEAR(result.norm(), want.norm, 1e-5 * want.norm);
  // Low-precision gradients round once when written back.
  expect_scaled(before, grads, want.factor, rtol);
}

TEST(GradCheck, CpuMatchesFp64ReferenceWithAndWithoutClipping) {
  const auto cpu = at::TensorOptions().device(at::kCPU);
  check_against_fp64(cpu, at::kFloat, 0.0, 1e-6);    // unscale only
  check_against_fp64(cpu, at::kFloat, 1.0, 1e-6);    // norm ~ 200: clipped to 1
  check_against_fp64(cpu, at::kFloat, 1e9, 1e-6);    // clip coefficient 1: unscale only
  check_against_fp64(cpu, at::kBFloat16, 1.0, 8e-3);
  check_against_fp64(cpu, at::kHalf, 1.0, 1e-3);
}

TEST(GradCheck, MatchesTorchUnscaleThenClipGradNorm) {
  const double scale = 4096.0;
  auto ours = make_grads(at::TensorOptions(), 20, false, scale);
  std::vector<at::Tensor> params;
  for (const auto& g : ours) {
    auto p = at::zeros_like(g).requires_grad_(true);
    p.mutable_grad() = g.clone();
    params.push_back(p);
  }
  auto theirs = gradients_of(params);
  auto found = at::zeros({1}), inv = at::full({1}, 1.0 / scale);
  at::_amp_foreach_non_finite_check_and_unscale_(theirs, found, inv);
  const double torch_norm = torch::nn::utils::clip_grad_norm_(params, 0.5);
  GradCheckResult result = unscale_check_clip_(ours, 1.0 / scale, 0.5);
  EXPECT_EQ(found.item<float>(), 0.f);
  EXPECT_FALSE(result.found_inf());
  EXPECT_NEAR(result.norm(), torch_norm, 1e-5 * torch_norm);
  for (size_t i = 0; i < ours.size(); ++i) EXPECT_TRUE(at::allclose(ours[i], theirs[i], 1e-5, 1e-9)) << i;
}

void check_inf_and_nan(const at::TensorOptions& options) {
  for (float poison : {INFINITY, -INFINITY, NAN}) {
    auto grads = make_grads(options, 12, false, 1.0);
    grads[7].view(-1)[grads[7].numel() - 1] = poison;  // the last element of a multi-chunk tensor
    std::vector<at::Tensor> before;
    for (const auto& g : grads) before.push_back(g.clone());
    GradCheckResult clipped = unscale_check_clip_(grads, 0.25, 1.0);
    EXPECT_TRUE(clipped.found_inf()) << poison;
    EXPECT_FALSE(std::isfinite(clipped.norm())) << poison;
    for (size_t i = 0; i < grads.size(); ++i)  // left as they were: the step is skipped
      EXPECT_TRUE(at::equal(grads[i].isnan(), before[i].isnan()) && at::equal(grads[i].nan_to_num(), before[i].nan_to_num()))
          << "tensor " << i << " changed although an inf/NaN was found";
    GradCheckResult unscaled = unscale_check_clip_(grads, 0.25, 0.0);
    EXPECT_TRUE(unscaled.found_inf()) << poison;
  }
}

TEST(GradCheck, CpuDetectsInfAndNanAndLeavesGradientsAlone) { check_inf_and_nan(at::TensorOptions()); }

TEST(GradCheck, OverflowOnlyAfterUnscalingCounts) {
  // 1e30 * 1e10 overflows fp32 although the stored value is finite: the check is on g * inv_scale.
  std::vector<at::Tensor> grads{at::full({10}, 1e30f)};
  EXPECT_TRUE(unscale_check_clip_(grads, 1e10, 0.0).found_inf());
}

TEST(GradCheck, RejectsBadInputsByName) {
  std::vector<at::Tensor> ints{at::ones({3}, at::kInt)};
  EXPECT_THROW(
      {
        try {
          unscale_check_clip_(ints, 1.0, 0.0);
        } catch (const std::invalid_argument& e) {
          EXPECT_NE(std::string(e.what()).find("grads[0]: dtype Int"), std::string::npos) << e.what();
          throw;
        }
      },
      std::invalid_argument);
  std::vector<at::Tensor> strided{at::ones({4, 4}).t()};
  EXPECT_THROW(unscale_check_clip_(strided, 1.0, 0.0), std::invalid_argument);
  std::vector<at::Tensor> ok{at::ones({4})};
  EXPECT_THROW(unscale_check_clip_(ok, 0.0, 0.0), std::invalid_argument);
  EXPECT_THROW(unscale_check_clip_(ok, NAN, 0.0), std::invalid_argument);
}

TEST(GradCheck, CudaMatchesFp64Reference) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  check_against_fp64(cuda, at::kFloat, 0.0, 1e-6);
  check_against_fp64(cuda, at::kFloat, 1.0, 1e-6);
  check_against_fp64(cuda, at::kFloat, 1e9, 1e-6);
  check_against_fp64(cuda, at::kBFloat16, 1.0, 8e-3);
  check_against_fp64(cuda, at::kHalf, 1.0, 1e-3);
}

TEST(GradCheck, CudaMixedDtypesInOneCall) {
  SCALETRAIN_REQUIRE_CUDA();
  auto grads = make_grads(at::TensorOptions().device(at::kCUDA), 10, false, 100.0);
  auto halves = make_grads(at::TensorOptions().device(at::kCUDA).dtype(at::kHalf), 10, true, 100.0);
  grads.insert(grads.end(), halves.begin(), halves.end());
  std::vector<at::Tensor> before;
  for (const auto& g : grads) before.push_back(g.cpu().clone());
  const Expected want = reference(before, 0.01, 2.0);
  GradCheckResult result = unscale_check_clip_(grads, 0.01, 2.0);
  EXPECT_NEAR(result.norm(), want.norm, 1e-5 * want.norm);
  expect_scaled(before, grads, want.factor, 1e-3);
}

TEST(GradCheck, CudaDetectsInfAndNanAndLeavesGradientsAlone) {
  SCALETRAIN_REQUIRE_CUDA();
  check_inf_and_nan(at::TensorOptions().device(at::kCUDA));
}

TEST(GradCheck, CudaNormIsDeterministic) {
  SCALETRAIN_REQUIRE_CUDA();
  auto grads = make_grads(at::TensorOptions().device(at::kCUDA), 40, false, 3.0);
  const float first = unscale_check_clip_(grads, 1.0, 0.0).values[1].item<float>();
  for (int i = 0; i < 5; ++i) EXPECT_EQ(unscale_check_clip_(grads, 1.0, 0.0).values[1].item<float>(), first);
}

// gradient_factor: the same flag, norm and factor as unscale_check_clip_, the gradients untouched;
// g * factor is what unscale_check_clip_ writes.
void check_gradient_factor(const at::TensorOptions& options) {
  for (const double max_norm : {0.0, 1.0}) {
    auto grads = make_grads(options, 60, true, 1024.0);
    std::vector<at::Tensor> before, applied;
    for (const auto& g : grads) before.push_back(g.clone()), applied.push_back(g.clone());
    GradCheckResult deferred = gradient_factor(grads, 1.0 / 1024, max_norm);
    GradCheckResult direct = unscale_check_clip_(applied, 1.0 / 1024, max_norm);
    EXPECT_FALSE(deferred.found_inf());
    EXPECT_EQ(deferred.norm(), direct.norm());
    const Expected want = reference(before, 1.0 / 1024, max_norm);
    EXPECT_NEAR(deferred.factor.item<double>(), want.factor, 1e-6 * want.factor);
    for (size_t i = 0; i < grads.size(); ++i) {
      EXPECT_TRUE(at::equal(grads[i], before[i])) << "gradient " << i << " was written";
      EXPECT_TRUE(at::equal(grads[i] * deferred.factor, applied[i])) << "gradient " << i << ", max_norm " << max_norm;
    }
  }
  // 1 / scale read from a tensor on the gradients' device: the same bits as the host number.
  for (const double inv : {1.0 / 1024, 1.0 / 3.0}) {
    auto grads = make_grads(options, 60, true, 1024.0);
    const auto on_device = gradient_factor(grads, at::full({1}, static_cast<float>(inv), options.dtype(at::kFloat)), 1.0);
    const auto on_host = gradient_factor(grads, inv, 1.0);
    EXPECT_TRUE(at::equal(on_device.values.cpu(), on_host.values.cpu())) << inv;
    EXPECT_TRUE(at::equal(on_device.factor.cpu(), on_host.factor.cpu())) << inv;
  }
  try {
    gradient_factor(make_grads(options, 2, false, 1.0), at::ones({2}, options.dtype(at::kFloat)), 1.0);
    ADD_FAILURE() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("inv_scale: expected one float32 element"), std::string::npos) << e.what();
  }
  auto grads = make_grads(options, 5, false, 1.0);
  grads[2].view(-1)[0] = INFINITY;
  GradCheckResult result = gradient_factor(grads, 1.0, 1.0);
  EXPECT_TRUE(result.found_inf());
  EXPECT_EQ(result.found_inf_flag().item<float>(), 1.f);
}

TEST(GradCheck, CpuGradientFactorWritesNothingAndMatchesUnscale) { check_gradient_factor(at::TensorOptions()); }

TEST(GradCheck, CudaGradientFactorWritesNothingAndMatchesUnscale) {
  SCALETRAIN_REQUIRE_CUDA();
  check_gradient_factor(at::TensorOptions().device(at::kCUDA));
}

}  // namespace
}  // namespace scaletrain::amp
