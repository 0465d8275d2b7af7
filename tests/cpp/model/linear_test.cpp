// model::linear (fused_ops.h): the output and the input and weight gradients are ATen's linear's;
// the bias gradient is the fp32 sum of d y's rows, checked against fp64 sums of the same d y, at
// least as close as ATen's, and the same bits run to run; on the CPU here and on CUDA where present.
// model::gelu_mlp: output and all five gradients within twice the error of ATen's unfused MLP
// against fp64 math; deterministic; on CUDA it holds one (rows, hidden) tensor less after forward.
// Both run only the GEMMs of the gradients autograd asks for (frozen weights, an input without one).
#include <atomic>
#include <cmath>
#include <string>
#include <string_view>

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "scaletrain/amp/precision.h"
#include "scaletrain/model/fused_ops.h"
#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA
#include "test_util.h"

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

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
  check_linear(at::kCUDA, 300, 96, 776, true);      // 16-byte rows, a column tile that is not full
  check_linear(at::kCUDA, 300, 96, 772, true);      // 8-byte rows, a column tile that is not full
  check_linear(at::kCUDA, 300, 96, 40, false);      // fp32
}

// ---- gelu_mlp ----

struct MlpCase {
  at::Tensor x, fc_w, fc_b, proj_w, proj_b, up;  // biases undefined: none; up: fp64 upstream gradient
};

// x (batch, rows / batch, in).
MlpCase mlp_case(at::Device device, int64_t rows, int64_t in, int64_t hidden, bool bias, int64_t batch = 2) {
  const auto on = at::TensorOptions().device(device);
  MlpCase c{at::randn({batch, rows / batch, in}, on), at::randn({hidden, in}, on) / std::sqrt(double(in)), {},
            at::randn({in, hidden}, on) / std::sqrt(double(hidden)), {},
            at::randn({batch, rows / batch, in}, on.dtype(at::kDouble))};
  if (bias) c.fc_b = at::randn({hidden}, on) * 0.5, c.proj_b = at::randn({in}, on) * 0.1;
  return c;
}

struct MlpRun {
  at::Tensor y;
  std::vector<at::Tensor> grads;  // x, fc_w, proj_w, then fc_b, proj_b when present
  std::string grad_fn;
};

template <typename Op>
MlpRun run_mlp(Op op, const MlpCase& c, bool autocast, at::ScalarType type = at::kFloat) {
  const auto leaf = [type](const at::Tensor& t) {
    return t.defined() ? t.to(type).detach().clone().requires_grad_(true) : t;
  };
  auto x = leaf(c.x), fc_w = leaf(c.fc_w), fc_b = leaf(c.fc_b), proj_w = leaf(c.proj_w), proj_b = leaf(c.proj_b);
  at::Tensor y;
  {
    std::optional<amp::AutocastGuard> guard;
    if (autocast) guard.emplace(amp::Precision::bf16, c.x.device().type());
    y = op(x, fc_w, fc_b, proj_w, proj_b);
  }
  std::vector<at::Tensor> inputs{x, fc_w, proj_w};
  if (fc_b.defined()) inputs.push_back(fc_b), inputs.push_back(proj_b);
  MlpRun run{y.detach(), torch::autograd::grad({(y.to(at::kDouble) * c.up).sum()}, inputs), {}};
  auto node = y.grad_fn();
  while (node && node->name() == "ViewBackward0") node = node->next_edges()[0].function;
  if (node) run.grad_fn = node->name();
  return run;
}

const auto fused_mlp = [](auto& x, auto& fw, auto& fb, auto& pw, auto& pb) { return gelu_mlp(x, fw, fb, pw, pb); };
const auto unfused_mlp = [](auto& x, auto& fw, auto& fb, auto& pw, auto& pb) {
  return gelu_mlp_reference(x, fw, fb, pw, pb);
};

// Output and gradients within twice the unfused error against fp64 math on the same inputs.
void check_mlp(const MlpCase& c, bool autocast) {
  const auto ours = run_mlp(fused_mlp, c, autocast), aten = run_mlp(unfused_mlp, c, autocast);
  const auto exact = run_mlp(unfused_mlp, c, false, at::kDouble);
  EXPECT_NE(ours.grad_fn.find("GeluMlp"), std::string::npos) << ours.grad_fn;
  EXPECT_EQ(ours.y.scalar_type(), aten.y.scalar_type());
  const double floor = autocast ? 1e-3 : 1e-6;
  EXPECT_LE(max_diff(ours.y, exact.y), 2 * max_diff(aten.y, exact.y) + floor * max_abs(exact.y));
  ASSERT_EQ(ours.grads.size(), exact.grads.size());
  for (size_t i = 0; i < ours.grads.size(); ++i) {
    EXPECT_EQ(ours.grads[i].scalar_type(), aten.grads[i].scalar_type()) << "gradient " << i;
    EXPECT_LE(max_diff(ours.grads[i], exact.grads[i]),
              2 * max_diff(aten.grads[i], exact.grads[i]) + floor * max_abs(exact.grads[i]))
        << "gradient " << i << (autocast ? " (autocast)" : "");
  }
  // Deterministic: the same bits again.
  const auto again = run_mlp(fused_mlp, c, autocast);
  EXPECT_TRUE(at::equal(ours.y, again.y));
  for (size_t i = 0; i < ours.grads.size(); ++i) EXPECT_TRUE(at::equal(ours.grads[i], again.grads[i])) << i;
}

TEST(GeluMlp, CpuWithinTwiceTheUnfusedErrorOfFp64) {
  for (const bool bias : {true, false}) {
    check_mlp(mlp_case(at::kCPU, 74, 24, 96, bias), false);
    check_mlp(mlp_case(at::kCPU, 74, 24, 96, bias), true);
  }
  check_mlp(mlp_case(at::kCPU, 10, 6, 18, true), false);  // hidden not a multiple of 4
}

TEST(GeluMlp, Fp64AndMismatchedShapesTakeTheReference) {
  const auto c = mlp_case(at::kCPU, 6, 8, 16, true);
  const auto fp64 = run_mlp(fused_mlp, c, false, at::kDouble);
  EXPECT_EQ(fp64.grad_fn.find("GeluMlp"), std::string::npos) << fp64.grad_fn;
  EXPECT_TRUE(at::allclose(fp64.y, run_mlp(unfused_mlp, c, false, at::kDouble).y));
  // ATen's linear names the mismatch.
  const auto message = testing::error_message([&] { gelu_mlp(c.x, c.fc_w, c.fc_b, c.fc_w, c.proj_b); });
  EXPECT_NE(message.find("shapes cannot be multiplied"), std::string::npos) << message;
}

TEST(GeluMlp, BackwardRefusesToBeDifferentiatedAgain) {
  const auto c = mlp_case(at::kCPU, 6, 8, 16, true);
  auto x = c.x.clone().requires_grad_(true);
  const auto y = gelu_mlp(x, c.fc_w, c.fc_b, c.proj_w, c.proj_b);
  const auto message = testing::error_message(
      [&] { torch::autograd::grad({y.sum()}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true); });
  EXPECT_NE(message.find("gelu_mlp: its backward is differentiable once only"), std::string::npos) << message;
  // Once is fine.
  EXPECT_EQ(torch::autograd::grad({y.sum()}, {x})[0].sizes(), x.sizes());
}

TEST(GeluMlp, CudaWithinTwiceTheUnfusedErrorOfFp64) {
  SCALETRAIN_REQUIRE_CUDA();
  check_mlp(mlp_case(at::kCUDA, 8198, 128, 512, true), true);  // many slabs, a short last one
  check_mlp(mlp_case(at::kCUDA, 300, 40, 164, true), true);    // a column tile that is not full
  check_mlp(mlp_case(at::kCUDA, 75, 40, 164, true, 1), true);  // 75 x 164 values: the GELU forward's scalar tail
  check_mlp(mlp_case(at::kCUDA, 300, 40, 164, false), true);   // no biases
  check_mlp(mlp_case(at::kCUDA, 300, 40, 164, true), false);   // fp32
  check_mlp(mlp_case(at::kCUDA, 30, 6, 18, true), true);       // hidden not a multiple of 4: ATen's GELU
}

TEST(GeluMlp, CudaFp16WithinTwiceTheUnfusedErrorOfFp64) {
  SCALETRAIN_REQUIRE_CUDA();
  for (const int64_t hidden : {160, 164}) {  // the GELU forward with and without a scalar tail per row pair
    const auto c = mlp_case(at::kCUDA, 300, 40, hidden, true);
    const auto ours = run_mlp(fused_mlp, c, false, at::kHalf), aten = run_mlp(unfused_mlp, c, false, at::kHalf);
    const auto exact = run_mlp(unfused_mlp, c, false, at::kDouble);
    EXPECT_NE(ours.grad_fn.find("GeluMlp"), std::string::npos) << ours.grad_fn;
    EXPECT_LE(max_diff(ours.y, exact.y), 2 * max_diff(aten.y, exact.y) + 1e-3 * max_abs(exact.y));
    for (size_t i = 0; i < ours.grads.size(); ++i)
      EXPECT_LE(max_diff(ours.grads[i], exact.grads[i]),
                2 * max_diff(aten.grads[i], exact.grads[i]) + 1e-3 * max_abs(exact.grads[i]))
          << "gradient " << i << ", hidden " << hidden;
  }
}

// ---- frozen inputs: only the gradients autograd asks for ----

// aten::mm calls seen by the dispatcher while `fn` runs (a global RecordFunction callback).
std::atomic<int> mm_calls{0};

template <typename Fn>
int count_mm(const Fn& fn) {
  mm_calls = 0;
  const auto handle = at::addGlobalCallback(at::RecordFunctionCallback([](const at::RecordFunction& f)
                                                                           -> std::unique_ptr<at::ObserverContext> {
    if (std::string_view(f.name()) == "aten::mm") ++mm_calls;
    return nullptr;
  }));
  fn();
  at::removeCallback(handle);
  return mm_calls.load();
}

// With `trainable` naming which of (x, fc_w, fc_b, proj_w, proj_b) require a gradient: the GEMMs
// of gelu_mlp's backward, and its gradients against ATen's unfused MLP and fp64 math.
int check_frozen_mlp(const std::string& trainable, int expected_gemms, bool bias = true) {
  const auto c = mlp_case(at::kCPU, 74, 24, 96, bias);
  const std::vector<at::Tensor> values{c.x, c.fc_w, c.fc_b, c.proj_w, c.proj_b};
  const auto run = [&](auto op, at::ScalarType type, int* gemms) {
    std::vector<at::Tensor> in, wanted;
    for (size_t i = 0; i < values.size(); ++i) {
      in.push_back(values[i].defined() ? values[i].to(type).detach().clone().requires_grad_(trainable[i] == '1')
                                       : at::Tensor());
      if (trainable[i] == '1') wanted.push_back(in.back());
    }
    const auto y = op(in[0], in[1], in[2], in[3], in[4]);
    const auto loss = (y.to(at::kDouble) * c.up).sum();
    std::vector<at::Tensor> grads;
    const int n = count_mm([&] { grads = torch::autograd::grad({loss}, wanted); });
    if (gemms) *gemms = n;
    return grads;
  };
  int ours_gemms = -1;
  const auto ours = run(fused_mlp, at::kFloat, &ours_gemms), aten = run(unfused_mlp, at::kFloat, nullptr);
  const auto exact = run(unfused_mlp, at::kDouble, nullptr);
  EXPECT_EQ(ours_gemms, expected_gemms) << "trainable " << trainable;
  for (size_t i = 0; i < ours.size(); ++i)
    EXPECT_LE(max_diff(ours[i], exact[i]), 2 * max_diff(aten[i], exact[i]) + 1e-6 * max_abs(exact[i]))
        << "trainable " << trainable << ", gradient " << i;
  return ours_gemms;
}

TEST(GeluMlp, FrozenInputsCostNoGemms) {
  check_frozen_mlp("11111", 4);  // d act, d proj_w, d x, d fc_w
  check_frozen_mlp("00010", 1);  // proj_w alone: gelu(pre) and one GEMM, no GELU backward
  check_frozen_mlp("00011", 1);
  check_frozen_mlp("10000", 2);  // x alone (the weights frozen): d act and d x
  check_frozen_mlp("01100", 2);  // fc alone: d act and d fc_w
  check_frozen_mlp("00100", 1);  // fc's bias alone: d act, the bias sum in the GELU backward pass
  check_frozen_mlp("00010", 1, /*bias=*/false);  // without biases the inputs' indices shift
  check_frozen_mlp("10000", 2, false);
  check_frozen_mlp("11010", 4, false);
}

TEST(Linear, FrozenInputsCostNoGemms) {
  const auto x0 = at::randn({37, 16}), w0 = at::randn({24, 16}), b0 = at::randn({24});
  for (const bool x_grad : {true, false}) {
    for (const bool w_grad : {true, false}) {
      auto x = x0.clone().requires_grad_(x_grad), w = w0.clone().requires_grad_(w_grad), b = b0.clone().requires_grad_(true);
      auto xr = x0.clone().requires_grad_(x_grad), wr = w0.clone().requires_grad_(w_grad), br = b0.clone().requires_grad_(true);
      std::vector<at::Tensor> wanted{b}, wanted_ref{br};
      if (x_grad) wanted.push_back(x), wanted_ref.push_back(xr);
      if (w_grad) wanted.push_back(w), wanted_ref.push_back(wr);
      const auto y = model::linear(x, w, b);
      std::vector<at::Tensor> grads;
      EXPECT_EQ(count_mm([&] { grads = torch::autograd::grad({y.square().sum()}, wanted); }), int(x_grad) + int(w_grad));
      const auto ref = torch::autograd::grad({at::linear(xr, wr, br).square().sum()}, wanted_ref);
      for (size_t i = 0; i < grads.size(); ++i) EXPECT_TRUE(at::allclose(grads[i], ref[i], 1e-5, 1e-5)) << i;
    }
  }
}

#ifdef SCALETRAIN_WITH_CUDA
// Bytes the CUDA allocator holds for tensors now.
int64_t cuda_allocated() {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
}
#endif

TEST(GeluMlp, CudaHoldsOneHiddenTensorLessAfterForward) {
  SCALETRAIN_REQUIRE_CUDA();
#ifdef SCALETRAIN_WITH_CUDA
  const int64_t rows = 16384, in = 256, hidden = 1024;  // the weights' casts small beside (rows, hidden)
  const auto c = mlp_case(at::kCUDA, rows, in, hidden, true);
  const auto held = [&](auto op) {
    auto x = c.x.to(at::kBFloat16).requires_grad_(true), fw = c.fc_w.clone().requires_grad_(true);
    auto fb = c.fc_b.clone().requires_grad_(true), pw = c.proj_w.clone().requires_grad_(true);
    auto pb = c.proj_b.clone().requires_grad_(true);
    const auto forward = [&] {
      amp::AutocastGuard guard(amp::Precision::bf16, at::kCUDA);
      return op(x, fw, fb, pw, pb);
    };
    forward().sum().backward();  // one-time allocations (cuBLAS's workspace) before counting
    const int64_t before = cuda_allocated();
    const auto y = forward();
    return cuda_allocated() - before;  // y and what autograd keeps for backward
  };
  const int64_t aten = held(unfused_mlp), ours = held(fused_mlp);
  const int64_t hidden_tensor = rows * hidden * 2;  // bf16
  // 9/10: room for the casts of weights and biases, which autocast may cache on one side only.
  EXPECT_LE(ours, aten - hidden_tensor * 9 / 10) << "ours " << ours << " ATen " << aten;
#endif
}

}  // namespace
}  // namespace scaletrain::model
