// model::linear (fused_ops.h): the output and the input and weight gradients are ATen's linear's;
// the bias gradient is the fp32 sum of d y's rows, checked against fp64 sums of the same d y, at
// least as close as ATen's, and the same bits run to run; on the CPU here and on CUDA where present.
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

struct LinearRun {
  at::Tensor y, dx, dw, db, dy;  // dy: the gradient that reached y, in y's dtype
};

template <typename Op>
LinearRun run_linear(Op op, const at::Tensor& x0, const at::Tensor& w0, const at::Tensor& b0, const at::Tensor& up,
                     bool autocast) {
  auto x = x0.detach().clone().requires_grad_(true), w = w0.detach().clone().requires_grad_(true);
  auto b = b0.detach().clone().requires_grad_(true);
  at::Tensor y;
  {
    std::optional<amp::AutocastGuard> guard;
    if (autocast) guard.emplace(amp::Precision::bf16, x0.device().type());
    y = op(x, w, b);
  }
  const auto grads = torch::autograd::grad({(y.to(at::kDouble) * up).sum()}, {x, w, b});
  return {y.detach(), grads[0], grads[1], grads[2], up.to(y.scalar_type())};
}

void check_linear(at::Device device, int64_t rows, int64_t in, int64_t out, bool autocast) {
  const auto on = at::TensorOptions().device(device);
  const auto x = at::randn({2, rows / 2, in}, on), w = at::randn({out, in}, on) * 0.1, b = at::randn({out}, on);
  const auto up = at::randn({2, rows / 2, out}, on.dtype(at::kDouble)) + 0.5;  // a mean: sums that grow with rows
  const auto ours = run_linear([](auto& x, auto& w, auto& b) { return model::linear(x, w, b); }, x, w, b, up, autocast);
  const auto aten = run_linear([](auto& x, auto& w, auto& b) { return at::linear(x, w, b); }, x, w, b, up, autocast);
  EXPECT_EQ(ours.y.sizes(), aten.y.sizes());
  EXPECT_EQ(ours.y.scalar_type(), aten.y.scalar_type());
  EXPECT_EQ(ours.db.scalar_type(), at::kFloat);
  // The same GEMMs: output, d x and d w as ATen's (to the rounding of the compute type).
  const double tol = autocast ? 1.0 / 128 : 1e-5;
  EXPECT_LE(max_diff(ours.y, aten.y), tol * max_abs(aten.y));
  EXPECT_LE(max_diff(ours.dx, aten.dx), tol * max_abs(aten.dx));
  EXPECT_LE(max_diff(ours.dw, aten.dw), tol * max_abs(aten.dw));
  // d b against the fp64 sum of the same d y.
  const auto exact = ours.dy.to(at::kDouble).reshape({-1, out}).sum(0);
  EXPECT_LE(max_diff(ours.db, exact), 1e-5 * max_abs(exact));
  EXPECT_LE(max_diff(ours.db, exact), max_diff(aten.db, exact) + 1e-6 * max_abs(exact));
  // Deterministic.
  const auto again = run_linear([](auto& x, auto& w, auto& b) { return model::linear(x, w, b); }, x, w, b, up, autocast);
  EXPECT_TRUE(at::equal(ours.db, again.db));
}

TEST(Linear, CpuIsATensLinearWithAnFp32BiasGradient) {
  check_linear(at::kCPU, 74, 64, 48, false);
  check_linear(at::kCPU, 74, 64, 48, true);
}

TEST(Linear, WithoutBiasOrInFp64IsATensLinear) {
  const auto x = at::randn({3, 8}, at::kDouble), w = at::randn({5, 8}, at::kDouble), b = at::randn({5}, at::kDouble);
  EXPECT_TRUE(at::allclose(model::linear(x, w, b), at::linear(x, w, b)));
  EXPECT_TRUE(at::allclose(model::linear(x.to(at::kFloat), w.to(at::kFloat), at::Tensor()), at::linear(x, w).to(at::kFloat), 1e-5, 1e-5));
}

TEST(Linear, CudaIsATensLinearWithAnFp32BiasGradient) {
  SCALETRAIN_REQUIRE_CUDA();
  check_linear(at::kCUDA, 8198, 768, 2304, true);   // rows over many slabs, a short last one
  check_linear(at::kCUDA, 300, 96, 772, true);      // a column tile that is not full
  check_linear(at::kCUDA, 300, 96, 40, false);      // fp32
}

}  // namespace
}  // namespace scaletrain::model
