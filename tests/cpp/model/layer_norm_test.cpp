// The fused residual-add + LayerNorm (model/fused_ops.h, add_layer_norm) against fp64 math: its
// output, sum and every gradient within twice the error of the unfused ATen expression (add,
// layer_norm, cast) on the same inputs, on the CPU here and on CUDA where present; deterministic
// weight and bias gradients; which shapes take the kernels; bad inputs rejected by name.
#include <functional>
#include <string>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "scaletrain/amp/precision.h"
#include "scaletrain/model/fused_ops.h"
#include "test_util.h"

namespace scaletrain::model {
namespace {

double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }
double max_diff(const at::Tensor& a, const at::Tensor& b) { return max_abs(a.to(at::kDouble) - b.to(at::kDouble)); }

struct NormCase {
  at::Tensor x, residual, weight, bias;  // residual or bias undefined: none
  at::Tensor up_sum, up_out;             // fp64 upstream gradients of the sum and the output
};

// x in x_type, residual in residual_type (kUndefined: none), weight and bias in param_type.
NormCase norm_case(at::Device device, at::IntArrayRef shape, at::ScalarType x_type, at::ScalarType residual_type,
                   at::ScalarType param_type, bool bias) {
  const auto on = at::TensorOptions().device(device);
  const int64_t cols = shape.back();
  NormCase c;
  // An offset: the variance must come from the deviations, not from E[x^2] - E[x]^2.
  c.x = (at::randn(shape, on) * 2 + 3).to(x_type);
  if (residual_type != at::ScalarType::Undefined) c.residual = at::randn(shape, on).to(residual_type);
  c.weight = (1 + 0.5 * at::randn({cols}, on)).to(param_type);
  if (bias) c.bias = (0.1 * at::randn({cols}, on)).to(param_type);
  c.up_sum = at::randn(shape, on.dtype(at::kDouble));
  c.up_out = at::randn(shape, on.dtype(at::kDouble));
  return c;
}

struct NormResult {
  at::Tensor sum, out, dx, dr, dw, db;
  std::string grad_fn;  // the output's autograd node
};

template <typename Op>
NormResult run_norm(Op op, const NormCase& c, at::ScalarType compute = at::ScalarType::Undefined) {
  const auto leaf = [&](const at::Tensor& t) {
    if (!t.defined()) return t;
    return (compute == at::ScalarType::Undefined ? t : t.to(compute)).detach().clone().requires_grad_(true);
  };
  auto x = leaf(c.x), r = leaf(c.residual), w = leaf(c.weight), b = leaf(c.bias);
  const AddNorm out = op(x, r, w, b);
  auto loss = (out.normed.to(at::kDouble) * c.up_out).sum();
  if (r.defined()) loss = loss + (out.sum.to(at::kDouble) * c.up_sum).sum();
  std::vector<at::Tensor> inputs{x, w};
  if (r.defined()) inputs.push_back(r);
  if (b.defined()) inputs.push_back(b);
  const auto grads = torch::autograd::grad({loss}, inputs);
  NormResult result{out.sum.detach(), out.normed.detach(), grads[0], {}, grads[1], {}, {}};
  size_t next = 2;
  if (r.defined()) result.dr = grads[next++];
  if (b.defined()) result.db = grads[next++];
  // The node that made the output, under the view that gives it x's shape.
  auto node = out.normed.grad_fn();
  while (node && node->name() == "ViewBackward0") node = node->next_edges()[0].function;
  if (node) result.grad_fn = node->name();
  return result;
}

// error(fused) <= 2 error(unfused) + floor, each against fp64, for the output, the sum and every
// gradient; the fused path must have run (its autograd node).
void check_against_fp64(const NormCase& c, std::optional<at::ScalarType> out_type, double floor = 1e-6) {
  const double eps = 1e-5;
  const auto fused = run_norm(
      [&](auto& x, auto& r, auto& w, auto& b) { return add_layer_norm(x, r, w, b, eps, out_type); }, c);
  const auto unfused = run_norm(
      [&](auto& x, auto& r, auto& w, auto& b) { return add_layer_norm_reference(x, r, w, b, eps, out_type); }, c);
  const auto exact = run_norm(
      [&](auto& x, auto& r, auto& w, auto& b) { return add_layer_norm_reference(x, r, w, b, eps, std::nullopt); }, c,
      at::kDouble);
  EXPECT_NE(fused.grad_fn.find("AddLayerNorm"), std::string::npos) << fused.grad_fn;
  EXPECT_EQ(fused.out.scalar_type(), unfused.out.scalar_type());
  const auto check = [&](const at::Tensor& f, const at::Tensor& u, const at::Tensor& e, const char* what) {
    if (!e.defined()) return;
    ASSERT_TRUE(f.defined() && u.defined()) << what;
    EXPECT_EQ(f.scalar_type(), u.scalar_type()) << what;
    const double limit = 2 * max_diff(u, e) + floor * max_abs(e);
    EXPECT_LE(max_diff(f, e), limit) << what << ": unfused error " << max_diff(u, e);
  };
  check(fused.out, unfused.out, exact.out, "output");
  if (c.residual.defined()) check(fused.sum, unfused.sum, exact.sum, "sum");
  check(fused.dx, unfused.dx, exact.dx, "d x");
  check(fused.dr, unfused.dr, exact.dr, "d residual");
  check(fused.dw, unfused.dw, exact.dw, "d weight");
  check(fused.db, unfused.db, exact.db, "d bias");
}

void check_grid(at::Device device) {
  const auto none = at::ScalarType::Undefined;
  // The trainer's cases: fp32 residual stream + bf16 branch -> bf16 (autocast), all fp32, all bf16 (bf16 model).
  for (bool bias : {true, false}) {
    SCOPED_TRACE(bias ? "bias" : "no bias");
    check_against_fp64(norm_case(device, {37, 768}, at::kFloat, at::kBFloat16, at::kFloat, bias), at::kBFloat16);
    check_against_fp64(norm_case(device, {37, 768}, at::kFloat, none, at::kFloat, bias), at::kBFloat16);
    check_against_fp64(norm_case(device, {2, 9, 96}, at::kFloat, at::kFloat, at::kFloat, bias), std::nullopt);
    check_against_fp64(norm_case(device, {5, 1024}, at::kBFloat16, at::kBFloat16, at::kBFloat16, bias), std::nullopt);
    check_against_fp64(norm_case(device, {5, 256}, at::kHalf, at::kHalf, at::kHalf, bias), std::nullopt);
  }
  // Widths that leave lanes of a chunk idle, one row, a single 4-column group.
  check_against_fp64(norm_case(device, {1, 100}, at::kFloat, at::kBFloat16, at::kFloat, true), at::kBFloat16);
  check_against_fp64(norm_case(device, {300, 4}, at::kFloat, at::kFloat, at::kFloat, true), std::nullopt);
  check_against_fp64(norm_case(device, {3, 900}, at::kFloat, none, at::kFloat, true), at::kFloat);
}

TEST(LayerNorm, FusedCpuWithinTwiceTheUnfusedErrorOfFp64) { check_grid(at::kCPU); }

TEST(LayerNorm, FusedCpuTakesAnyWidth) {
  check_against_fp64(norm_case(at::kCPU, {7, 37}, at::kFloat, at::kBFloat16, at::kFloat, true), at::kBFloat16);
  check_against_fp64(norm_case(at::kCPU, {3, 2000}, at::kFloat, at::kFloat, at::kFloat, false), std::nullopt);
}

TEST(LayerNorm, UnderAutocastWritesTheLinearLayersType) {
  const auto x = at::randn({4, 16});
  {
    const amp::AutocastGuard autocast(amp::Precision::bf16, at::kCPU);
    EXPECT_EQ(linear_input_type(x), at::kBFloat16);
    EXPECT_EQ(linear_input_type(x.to(at::kDouble)), at::kDouble);
  }
  EXPECT_EQ(linear_input_type(x), at::kFloat);
}

// The same inputs twice give the same bits (fixed summation order in the weight and bias gradients).
void check_deterministic(at::Device device) {
  const auto c = norm_case(device, {4099, 768}, at::kFloat, at::kBFloat16, at::kFloat, true);
  const auto op = [](auto& x, auto& r, auto& w, auto& b) { return add_layer_norm(x, r, w, b, 1e-5, at::kBFloat16); };
  const auto a = run_norm(op, c), b = run_norm(op, c);
  EXPECT_TRUE(at::equal(a.dw, b.dw));
  EXPECT_TRUE(at::equal(a.db, b.db));
  EXPECT_TRUE(at::equal(a.dx, b.dx));
}

TEST(LayerNorm, FusedCpuGradientsAreDeterministic) { check_deterministic(at::kCPU); }

TEST(LayerNorm, Fp64TakesTheReference) {
  const auto c = norm_case(at::kCPU, {3, 8}, at::kDouble, at::kDouble, at::kDouble, true);
  const auto r = run_norm([](auto& x, auto& res, auto& w, auto& b) { return add_layer_norm(x, res, w, b, 1e-5); }, c);
  EXPECT_EQ(r.grad_fn.find("AddLayerNorm"), std::string::npos) << r.grad_fn;
  EXPECT_EQ(r.out.scalar_type(), at::kDouble);
}

// The error of `f` mentions `needle`.
void expect_error(const std::function<void()>& f, const std::string& needle) {
  const auto message = testing::error_message(f);
  EXPECT_NE(message.find(needle), std::string::npos) << message;
}

TEST(LayerNorm, RejectsBadInputsByName) {
  const auto x = at::randn({2, 8}), w = at::ones({8}), b = at::zeros({8});
  expect_error([&] { add_layer_norm(x, at::randn({2, 7}), w, b, 1e-5); }, "residual");
  expect_error([&] { add_layer_norm(x, {}, at::ones({7}), b, 1e-5); }, "weight must be (8)");
  expect_error([&] { add_layer_norm(x, {}, {}, b, 1e-5); }, "weight");
  expect_error([&] { add_layer_norm(x, {}, w, at::zeros({3}), 1e-5); }, "bias must be (8)");
  expect_error([&] { add_layer_norm(x, {}, w, b, 0.0); }, "eps");
  expect_error([&] { add_layer_norm(at::Tensor(), {}, w, b, 1e-5); }, "x must have");
}

// ---- CUDA ----

TEST(LayerNorm, CudaFusedWithinTwiceTheUnfusedErrorOfFp64) {
  SCALETRAIN_REQUIRE_CUDA();
  check_grid(at::kCUDA);
}

TEST(LayerNorm, CudaGradientsAreDeterministic) {
  SCALETRAIN_REQUIRE_CUDA();
  check_deterministic(at::kCUDA);
}

TEST(LayerNorm, CudaTakesTheKernelsOnlyWhereTheyFit) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto op = [](auto& x, auto& r, auto& w, auto& b) { return add_layer_norm(x, r, w, b, 1e-5); };
  // Wider than 1024 or not a multiple of 4: the reference, with the same result type.
  for (int64_t cols : {1028, 30}) {
    const auto c = norm_case(at::kCUDA, {3, cols}, at::kFloat, at::kFloat, at::kFloat, true);
    const auto r = run_norm(op, c);
    EXPECT_EQ(r.grad_fn.find("AddLayerNorm"), std::string::npos) << cols << " " << r.grad_fn;
  }
  // A view that starts off a 16-byte boundary is copied, then taken.
  auto c = norm_case(at::kCUDA, {5, 68}, at::kFloat, at::kFloat, at::kFloat, true);
  c.x = at::randn({5 * 68 + 1}, at::TensorOptions().device(at::kCUDA)).narrow(0, 1, 5 * 68).view({5, 68});
  check_against_fp64(c, std::nullopt);
}

}  // namespace
}  // namespace scaletrain::model
