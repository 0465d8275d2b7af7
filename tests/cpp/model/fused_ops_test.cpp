// Fused GPT kernels (model/fused_ops.h) against their unfused ATen expressions (bit for bit where
// the arithmetic is the same) and against fp64 references, on the CPU here and on CUDA where
// present; bad inputs are rejected by name.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "scaletrain/amp/precision.h"
#include "scaletrain/model/fused_ops.h"
#include "scaletrain/model/gpt.h"
#include "test_util.h"

namespace scaletrain::model {
namespace {

double max_abs(const at::Tensor& t) { return t.abs().max().item<double>(); }
double max_diff(const at::Tensor& a, const at::Tensor& b) { return max_abs(a.to(at::kDouble) - b.to(at::kDouble)); }

template <typename F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

struct RopeResult {
  at::Tensor q, k, v, grad;  // outputs and the gradient of qkv
};

// Runs `op` on qkv and back-propagates fixed upstream gradients of q, k and v.
template <typename Op>
RopeResult run_rope(Op op, const at::Tensor& qkv_in, const at::Tensor& cos, const at::Tensor& sin, int64_t heads,
                    const std::array<at::Tensor, 3>& upstream) {
  auto qkv = qkv_in.detach().clone().requires_grad_(true);
  const QKV out = op(qkv, cos, sin, heads);
  auto loss = (out.q.to(at::kDouble) * upstream[0]).sum() + (out.k.to(at::kDouble) * upstream[1]).sum() +
              (out.v.to(at::kDouble) * upstream[2]).sum();
  const auto grad = torch::autograd::grad({loss}, {qkv})[0];
  return {out.q.detach(), out.k.detach(), out.v.detach(), grad};
}

struct RopeCase {
  at::Tensor qkv, cos, sin;
  std::array<at::Tensor, 3> upstream;  // fp64, (batch, heads, seq, head_dim)
};

RopeCase rope_case(at::TensorOptions options, int64_t batch, int64_t seq, int64_t heads, int64_t dim,
                   bool per_sequence_tables) {
  RopeCase c;
  c.qkv = at::randn({batch, seq, 3 * heads * dim}, options.dtype(at::kFloat)).to(options.dtype());
  const auto angles = at::rand({per_sequence_tables ? batch : 1, seq, dim / 2}, options.dtype(at::kFloat)) * 20;
  c.cos = angles.cos(), c.sin = angles.sin();
  if (!per_sequence_tables) c.cos = c.cos.squeeze(0), c.sin = c.sin.squeeze(0);  // (seq, half)
  for (auto& u : c.upstream) u = at::randn({batch, heads, seq, dim}, options.dtype(at::kDouble));
  return c;
}

// Fused against the unfused expression in the same dtype (expected bit for bit: same rounding
// of every product and sum), and both against fp64.
void check_rope(at::TensorOptions options, int64_t dim, bool per_sequence_tables, double fp64_tolerance) {
  SCOPED_TRACE(std::string(c10::toString(options.dtype().toScalarType())) + " head_dim " + std::to_string(dim) +
               (per_sequence_tables ? " per-sequence tables" : " shared tables"));
  const int64_t batch = 2, seq = 7, heads = 3;
  const auto c = rope_case(options, batch, seq, heads, dim, per_sequence_tables);
  const auto fused = run_rope(rope_qkv, c.qkv, c.cos, c.sin, heads, c.upstream);
  const auto unfused = run_rope(rope_qkv_reference, c.qkv, c.cos, c.sin, heads, c.upstream);
  const auto exact = run_rope(rope_qkv_reference, c.qkv.to(at::kDouble), c.cos.to(at::kDouble),
                              c.sin.to(at::kDouble), heads, c.upstream);
  ASSERT_EQ(fused.q.sizes(), (at::IntArrayRef{batch, heads, seq, dim}));
  EXPECT_EQ(fused.q.scalar_type(), c.qkv.scalar_type());
  EXPECT_TRUE(at::equal(fused.q, unfused.q)) << max_diff(fused.q, unfused.q);
  EXPECT_TRUE(at::equal(fused.k, unfused.k)) << max_diff(fused.k, unfused.k);
  EXPECT_TRUE(at::equal(fused.v, unfused.v));
  EXPECT_TRUE(at::equal(fused.grad, unfused.grad)) << max_diff(fused.grad, unfused.grad);
  // Upstream gradients with odd strides (views into wider buffers): the backward's strided path.
  {
    auto qkv = c.qkv.detach().clone().requires_grad_(true);
    auto ref_qkv = c.qkv.detach().clone().requires_grad_(true);
    const QKV a = rope_qkv(qkv, c.cos, c.sin, heads), b = rope_qkv_reference(ref_qkv, c.cos, c.sin, heads);
    std::vector<at::Tensor> upstream;
    for (const auto& u : c.upstream) {
      auto wide = at::zeros({batch, heads, seq, dim + 3}, c.qkv.options());
      wide.narrow(-1, 0, dim).copy_(u);
      upstream.push_back(wide.narrow(-1, 0, dim));
    }
    const auto ga = torch::autograd::grad({a.q, a.k, a.v}, {qkv}, upstream)[0];
    const auto gb = torch::autograd::grad({b.q, b.k, b.v}, {ref_qkv}, upstream)[0];
    EXPECT_TRUE(at::equal(ga, gb)) << max_diff(ga, gb);
  }
  EXPECT_LE(max_diff(fused.q, exact.q), fp64_tolerance * max_abs(exact.q));
  EXPECT_LE(max_diff(fused.k, exact.k), fp64_tolerance * max_abs(exact.k));
  EXPECT_LE(max_diff(fused.grad, exact.grad), fp64_tolerance * max_abs(exact.grad));
}

TEST(FusedOps, RopeQkvCpuIsTheUnfusedExpressionBitForBitAndNearFp64) {
  for (bool per_sequence : {false, true}) {
    check_rope(at::TensorOptions().dtype(at::kFloat), 8, per_sequence, 1e-6);
    check_rope(at::TensorOptions().dtype(at::kBFloat16), 8, per_sequence, 1.0 / 128);
  }
  check_rope(at::TensorOptions().dtype(at::kHalf), 6, false, 1.0 / 1024);
}

TEST(FusedOps, RopeQkvFp64TakesTheReference) {
  const auto c = rope_case(at::TensorOptions().dtype(at::kDouble), 1, 5, 2, 4, false);
  const auto fused = run_rope(rope_qkv, c.qkv, c.cos, c.sin, 2, c.upstream);
  const auto exact = run_rope(rope_qkv_reference, c.qkv, c.cos.to(at::kDouble), c.sin.to(at::kDouble), 2, c.upstream);
  EXPECT_TRUE(at::equal(fused.q, exact.q));
  EXPECT_TRUE(at::equal(fused.grad, exact.grad));
}

TEST(FusedOps, RopeQkvRejectsBadShapesByName) {
  const auto qkv = at::randn({2, 5, 24});  // 2 heads x head_dim 4
  const auto table = at::randn({5, 2});
  expect_error([&] { rope_qkv(at::randn({10, 24}), table, table, 2); }, "qkv must be (batch, seq, 3 * heads * head_dim)");
  expect_error([&] { rope_qkv(qkv, table, table, 5); }, "not 3 x heads (5)");
  expect_error([&] { rope_qkv(qkv, at::randn({4, 2}), table, 2); }, "cos");
  expect_error([&] { rope_qkv(qkv, table, at::randn({3, 5, 2}), 2); }, "sin");
  expect_error([&] { rope_qkv(qkv.to(at::kInt), table, table, 2); }, "floating point");
}

// ---- cross-entropy ----

struct LossResult {
  at::Tensor loss, grad;
};

template <typename Op>
LossResult run_loss(Op op, const at::Tensor& logits_in, const at::Tensor& targets, int64_t classes,
                    LossReduction reduction) {
  auto logits = logits_in.detach().clone().requires_grad_(true);
  const auto loss = op(logits, targets, classes, -100, reduction);
  // An upstream gradient other than 1 checks that backward scales by it.
  const auto grad = torch::autograd::grad({loss * 3.0}, {logits})[0];
  return {loss.detach(), grad};
}

// Targets in [0, classes), every fifth ignored.
at::Tensor loss_targets(int64_t rows, int64_t classes, at::TensorOptions options) {
  auto t = at::randint(classes, {rows}, options.dtype(at::kLong));
  t.index_put_({at::arange(0, rows, 5, options.dtype(at::kLong))}, -100);
  return t;
}

void check_cross_entropy(at::TensorOptions options, int64_t rows, int64_t columns, int64_t classes,
                         double loss_tolerance, double grad_tolerance) {
  for (auto reduction : {LossReduction::mean, LossReduction::sum}) {
    SCOPED_TRACE(std::string(c10::toString(options.dtype().toScalarType())) + " rows " + std::to_string(rows) +
                 " columns " + std::to_string(columns) + " classes " + std::to_string(classes) +
                 (reduction == LossReduction::mean ? " mean" : " sum"));
    const auto logits = (at::randn({rows, columns}, options.dtype(at::kFloat)) * 4).to(options.dtype());
    const auto targets = loss_targets(rows, classes, options);
    const auto fused = run_loss(cross_entropy, logits, targets, classes, reduction);
    const auto exact = run_loss(cross_entropy_reference, logits.to(at::kDouble), targets, classes, reduction);
    EXPECT_EQ(fused.loss.scalar_type(), at::kFloat);
    EXPECT_EQ(fused.grad.scalar_type(), logits.scalar_type());
    EXPECT_LE(std::abs(fused.loss.item<double>() - exact.loss.item<double>()),
              loss_tolerance * std::abs(exact.loss.item<double>()));
    EXPECT_LE(max_diff(fused.grad, exact.grad), grad_tolerance * max_abs(exact.grad));
    if (classes < columns) {
      EXPECT_EQ(max_abs(fused.grad.narrow(1, classes, columns - classes)), 0.0);
    }
    // ignored rows get no gradient
    EXPECT_EQ(max_abs(fused.grad.index({targets == -100})), 0.0);
  }
}

TEST(FusedOps, CrossEntropyCpuMatchesFp64OverTheFirstClassesColumns) {
  // fp32 gradients: exp(x - lse) carries the fp32 error of the row's sum over ~classes terms
  // (a few 1e-6 relative), so 1e-5 of the largest gradient; the loss averages it out (1e-6).
  check_cross_entropy(at::TensorOptions().dtype(at::kFloat), 37, 70, 61, 1e-6, 1e-5);
  check_cross_entropy(at::TensorOptions().dtype(at::kFloat), 9, 40, 40, 1e-6, 1e-5);
  // bf16 logits: the loss is fp32 arithmetic on the same values; the gradient is rounded to bf16.
  check_cross_entropy(at::TensorOptions().dtype(at::kBFloat16), 37, 70, 61, 1e-6, 1.0 / 128);
}

// A narrowed view (rows strided past the classes) gives what the whole padded tensor gives, with
// 64 or 258 classes (aligned and unaligned rows: vector and scalar loads on CUDA).
void check_strided_rows(at::TensorOptions options) {
  for (int64_t classes : {64, 258}) {
    SCOPED_TRACE("classes " + std::to_string(classes));
    const auto padded = at::randn({2, 6, 320}, options.dtype(at::kFloat)).to(options.dtype());
    const auto targets = at::randint(classes, {2, 6}, options.dtype(at::kLong));
    const auto view = run_loss(cross_entropy, padded.narrow(-1, 0, classes), targets, classes, LossReduction::mean);
    const auto whole = run_loss(cross_entropy, padded, targets, classes, LossReduction::mean);
    const auto exact =
        run_loss(cross_entropy_reference, padded.to(at::kDouble), targets, classes, LossReduction::mean);
    EXPECT_TRUE(at::equal(view.loss, whole.loss));
    EXPECT_TRUE(at::equal(view.grad, whole.grad.narrow(-1, 0, classes)));
    EXPECT_NEAR(whole.loss.item<double>(), exact.loss.item<double>(), 1e-5 * exact.loss.item<double>());
  }
}

void check_all_ignored(at::TensorOptions options) {
  const auto logits = at::randn({4, 10}, options);
  const auto targets = at::full({4}, -100, options.dtype(at::kLong));
  EXPECT_TRUE(std::isnan(cross_entropy(logits, targets, 10).item<double>()));
  EXPECT_EQ(cross_entropy(logits, targets, 10, -100, LossReduction::sum).item<double>(), 0.0);
  EXPECT_EQ(cross_entropy(logits.narrow(0, 0, 0), targets.narrow(0, 0, 0), 10, -100, LossReduction::sum)
                .item<double>(),
            0.0);
}

// Non-finite logits give what ATen gives: NaN anywhere in a row -> NaN loss (wherever it sits among
// the threads' elements), +inf -> NaN (inf - inf), -inf outside the target -> a finite loss.
void check_non_finite(at::TensorOptions options) {
  const int64_t classes = 300;
  for (int64_t column : {0, 1, 37, 255, 299}) {
    for (float value : {NAN, INFINITY, -INFINITY}) {
      SCOPED_TRACE("column " + std::to_string(column) + " value " + std::to_string(value));
      auto logits = at::randn({3, classes}, options.dtype(at::kFloat));
      logits.index_put_({1, column}, value);
      logits = logits.to(options.dtype());
      auto targets = at::full({3}, column == 5 ? 6 : 5, options.dtype(at::kLong));
      const double ours = cross_entropy(logits, targets, classes).item<double>();
      const double ref = cross_entropy_reference(logits, targets, classes).item<double>();
      EXPECT_EQ(std::isnan(ours), std::isnan(ref)) << ours << " vs ATen " << ref;
      if (!std::isnan(ref)) {
        EXPECT_NEAR(ours, ref, 1e-5 * std::abs(ref));
      }
    }
  }
}

TEST(FusedOps, CrossEntropyTakesStridedRowsAndBatchedLogits) { check_strided_rows(at::TensorOptions()); }

TEST(FusedOps, CrossEntropyAllIgnoredIsNanForMeanAndZeroForSum) { check_all_ignored(at::TensorOptions()); }

TEST(FusedOps, CrossEntropyNonFiniteLogitsAsATen) { check_non_finite(at::TensorOptions()); }

TEST(FusedOps, CrossEntropyRejectsBadInputsByName) {
  const auto logits = at::randn({4, 10});
  const auto targets = at::randint(10, {4}, at::kLong);
  expect_error([&] { cross_entropy(logits, at::full({4}, 10, at::kLong), 10); }, "targets[0] = 10");
  expect_error([&] { cross_entropy(logits, targets, 11); }, "classes = 11");
  expect_error([&] { cross_entropy(logits, targets.to(at::kInt), 10); }, "targets must be int64");
  expect_error([&] { cross_entropy(logits, at::zeros({5}, at::kLong), 10); }, "one target per row");
  expect_error([&] { cross_entropy(logits.to(at::kInt), targets, 10); }, "floating point");
}

// ---- the model with and without the fused kernels ----

// The fused model (the output layer and loss `chunk_rows` rows at a time when > 0) against the
// unfused reference, from the same weights.
void check_model_fused_matches_unfused(at::Device device, bool autocast_bf16, double loss_tolerance,
                                       double grad_tolerance, int64_t chunk_rows = 0) {
  for (bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    GPTOptions o;
    o.n_layer(2).n_head(2).n_embd(32).block_size(32).tie_embeddings(tied);  // 258 -> 320 rows
    torch::manual_seed(11);
    GPT fused(GPTOptions(o).loss_chunk_rows(chunk_rows));
    GPT unfused(GPTOptions(o).fused_ops(false));
    {
      torch::NoGradGuard no_grad;
      const auto from = fused->parameters();
      const auto to = unfused->parameters();
      for (size_t i = 0; i < from.size(); ++i) to[i].copy_(from[i]);
    }
    fused->to(device);
    unfused->to(device);
    auto tokens = at::randint(258, {3, 32}, at::TensorOptions().dtype(at::kLong).device(device));
    auto targets = at::randint(258, {3, 32}, at::TensorOptions().dtype(at::kLong).device(device));
    targets.index_put_({0, at::indexing::Slice(0, 5)}, -100);
    std::vector<at::Tensor> losses;
    for (GPT model : {fused, unfused}) {
      at::Tensor loss;
      {
        const amp::AutocastGuard autocast(autocast_bf16 ? amp::Precision::bf16 : amp::Precision::fp32,
                                          device.type());
        loss = model->forward_loss(tokens, targets);
      }
      loss.backward();
      losses.push_back(loss.detach());
    }
    EXPECT_LE(std::abs(losses[0].item<double>() - losses[1].item<double>()),
              loss_tolerance * std::abs(losses[1].item<double>()));
    const auto a = fused->named_parameters(), b = unfused->named_parameters();
    for (const auto& item : a) {
      const auto& ga = item.value().grad();
      const auto& gb = b[item.key()].grad();
      EXPECT_LE(max_diff(ga, gb), grad_tolerance * max_abs(gb)) << item.key();
    }
    // The padding rows get no gradient from the fused loss either.
    const auto& out = tied ? fused->wte->weight : fused->lm_head->weight;
    EXPECT_EQ(max_abs(out.grad().narrow(0, 258, 320 - 258)), 0.0);
  }
}

TEST(FusedOps, GptForwardLossFusedMatchesUnfusedCpu) {
  check_model_fused_matches_unfused(at::kCPU, false, 1e-6, 1e-5);
}

// 96 rows in chunks of 7 (the last one short).
TEST(FusedOps, GptForwardLossInChunksMatchesUnfusedCpu) {
  check_model_fused_matches_unfused(at::kCPU, false, 1e-6, 1e-5, 7);
}

// ---- the output layer and the loss in chunks ----

struct LinearLoss {
  at::Tensor loss, grad_hidden, grad_weight;
};

// loss(hidden, weight) * 2.5 back-propagated (a scaled loss, as under a loss scaler).
template <typename Op>
LinearLoss run_linear_loss(Op op, const at::Tensor& hidden_in, const at::Tensor& weight_in) {
  auto hidden = hidden_in.detach().clone().requires_grad_(true);
  auto weight = weight_in.detach().clone().requires_grad_(true);
  auto loss = op(hidden, weight);
  (loss * 2.5).backward();
  return {loss.detach(), hidden.grad(), weight.grad()};
}

// hidden (3, 11, 16) = 33 rows, weight (40, 16) of which the first `classes` rows are classes.
void check_linear_cross_entropy(at::TensorOptions options, int64_t chunk_rows, double tolerance) {
  const int64_t classes = 37;
  const auto hidden = at::randn({3, 11, 16}, options.dtype(at::kFloat)).to(options.dtype());
  const auto weight = (at::randn({40, 16}, options.dtype(at::kFloat)) * 0.5).to(options.dtype());
  const auto targets = loss_targets(33, classes, options).view({3, 11});
  for (auto reduction : {LossReduction::mean, LossReduction::sum}) {
    SCOPED_TRACE(std::string(c10::toString(options.dtype().toScalarType())) + " chunk " + std::to_string(chunk_rows) +
                 (reduction == LossReduction::mean ? " mean" : " sum"));
    const auto chunked = run_linear_loss(
        [&](const at::Tensor& h, const at::Tensor& w) {
          return linear_cross_entropy(h, w, targets, classes, -100, reduction, chunk_rows);
        },
        hidden, weight);
    const auto exact = run_linear_loss(
        [&](const at::Tensor& h, const at::Tensor& w) {
          return cross_entropy_reference(at::linear(h, w), targets.view({-1}), classes, -100, reduction);
        },
        hidden.to(at::kDouble), weight.to(at::kDouble));
    EXPECT_EQ(chunked.grad_hidden.scalar_type(), hidden.scalar_type());
    EXPECT_EQ(chunked.grad_weight.scalar_type(), weight.scalar_type());
    EXPECT_LE(std::abs(chunked.loss.item<double>() - exact.loss.item<double>()),
              tolerance * std::abs(exact.loss.item<double>()));
    EXPECT_LE(max_diff(chunked.grad_hidden, exact.grad_hidden), tolerance * max_abs(exact.grad_hidden));
    EXPECT_LE(max_diff(chunked.grad_weight, exact.grad_weight), tolerance * max_abs(exact.grad_weight));
    EXPECT_EQ(max_abs(chunked.grad_weight.narrow(0, classes, 40 - classes)), 0.0);  // never in the loss
    // Without a gradient wanted (no gradient work in forward): the same loss.
    torch::NoGradGuard no_grad;
    EXPECT_EQ(linear_cross_entropy(hidden, weight, targets, classes, -100, reduction, chunk_rows).item<double>(),
              chunked.loss.item<double>());
  }
}

TEST(FusedOps, LinearCrossEntropyCpuMatchesFp64) {
  const auto cpu = at::TensorOptions();
  for (int64_t chunk : {1, 4, 33, 1000}) check_linear_cross_entropy(cpu, chunk, 1e-5);
  check_linear_cross_entropy(cpu.dtype(at::kDouble), 5, 1e-12);
  check_linear_cross_entropy(cpu.dtype(at::kBFloat16), 8, 1.0 / 32);
}

TEST(FusedOps, LinearCrossEntropyAllIgnoredIsNanForMeanWithZeroGradients) {
  const auto hidden = at::randn({6, 8}), weight = at::randn({10, 8});
  const auto targets = at::full({6}, -100, at::kLong);
  const auto mean = run_linear_loss(
      [&](const at::Tensor& h, const at::Tensor& w) {
        return linear_cross_entropy(h, w, targets, 10, -100, LossReduction::mean, 4);
      },
      hidden, weight);
  EXPECT_TRUE(std::isnan(mean.loss.item<double>()));
  EXPECT_EQ(max_abs(mean.grad_hidden), 0.0);
  EXPECT_EQ(max_abs(mean.grad_weight), 0.0);
  EXPECT_EQ(linear_cross_entropy(hidden, weight, targets, 10, -100, LossReduction::sum, 4).item<double>(), 0.0);
}

TEST(FusedOps, LinearCrossEntropyRejectsBadInputsByName) {
  const auto hidden = at::randn({6, 8}), weight = at::randn({10, 8});
  const auto targets = at::randint(10, {6}, at::kLong);
  const auto call = [&](const at::Tensor& h, const at::Tensor& w, const at::Tensor& t, int64_t classes, int64_t chunk) {
    return linear_cross_entropy(h, w, t, classes, -100, LossReduction::mean, chunk);
  };
  expect_error([&] { call(hidden, weight, targets, 10, 0); }, "linear_cross_entropy: chunk_rows = 0, expected >= 1");
  expect_error([&] { call(hidden, at::randn({10, 7}), targets, 10, 4); },
               "linear_cross_entropy: weight must be floating point (columns, 8), got (10, 7)");
  expect_error([&] { call(hidden, weight, targets.narrow(0, 0, 5), 10, 4); },
               "one target per row of hidden (6), got (5,) Long");
  expect_error([&] { call(hidden, weight, targets, 11, 4); }, "classes = 11, expected 1..10 (weight's rows)");
  expect_error([&] { call(hidden.to(at::kLong), weight, targets, 10, 4); }, "hidden must be a floating-point tensor");
}

TEST(FusedOps, GptLossOfForwardEqualsForwardLoss) {
  GPTOptions o;
  o.n_layer(1).n_head(2).n_embd(16).block_size(16);
  GPT model(o);
  const auto tokens = at::randint(258, {2, 16}, at::kLong), targets = at::randint(258, {2, 16}, at::kLong);
  const auto a = model->loss(model->forward(tokens), targets), b = model->forward_loss(tokens, targets);
  EXPECT_NEAR(a.item<double>(), b.item<double>(), 1e-6 * b.item<double>());
}

// ---- CUDA ----

TEST(FusedOps, CudaRopeQkvIsTheUnfusedExpressionBitForBit) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  for (bool per_sequence : {false, true}) {
    check_rope(cuda.dtype(at::kBFloat16), 64, per_sequence, 1.0 / 128);  // vector path
    check_rope(cuda.dtype(at::kFloat), 64, per_sequence, 1e-6);
  }
  check_rope(cuda.dtype(at::kHalf), 128, false, 1.0 / 1024);
  check_rope(cuda.dtype(at::kBFloat16), 6, true, 1.0 / 128);  // half = 3: the scalar path
}

TEST(FusedOps, CudaCrossEntropyMatchesFp64) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  // GPT-2's vocabulary padded to 50304 columns (vector loads, odd tail), and an odd row length
  // (scalar path).
  check_cross_entropy(cuda.dtype(at::kBFloat16), 64, 50304, 50257, 1e-5, 1.0 / 128);
  check_cross_entropy(cuda.dtype(at::kFloat), 33, 1001, 1000, 1e-5, 1e-5);
  check_cross_entropy(cuda.dtype(at::kHalf), 17, 328, 300, 1e-5, 1.0 / 512);
}

TEST(FusedOps, CudaCrossEntropyEdgeCases) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  for (auto dtype : {at::kBFloat16, at::kFloat}) {
    SCOPED_TRACE(c10::toString(dtype));
    check_strided_rows(cuda.dtype(dtype));
    check_all_ignored(cuda.dtype(dtype));
    check_non_finite(cuda.dtype(dtype));
  }
}

TEST(FusedOps, CudaCrossEntropyInvalidTargetIsNanWithoutError) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto logits = at::randn({4, 10}, at::TensorOptions().device(at::kCUDA));
  auto targets = at::randint(10, {4}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA));
  targets.index_put_({2}, 10);
  EXPECT_TRUE(std::isnan(cross_entropy(logits, targets, 10).item<double>()));
}

TEST(FusedOps, CudaGptForwardLossFusedMatchesUnfused) {
  SCALETRAIN_REQUIRE_CUDA();
  check_model_fused_matches_unfused(at::kCUDA, false, 1e-5, 1e-4);
  check_model_fused_matches_unfused(at::kCUDA, true, 1e-3, 2e-2);
}

TEST(FusedOps, CudaGptForwardLossInChunksMatchesUnfused) {
  SCALETRAIN_REQUIRE_CUDA();
  check_model_fused_matches_unfused(at::kCUDA, false, 1e-5, 1e-4, 7);
  check_model_fused_matches_unfused(at::kCUDA, true, 1e-3, 2e-2, 7);
}

TEST(FusedOps, CudaLinearCrossEntropyMatchesFp64) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  for (int64_t chunk : {4, 1000}) check_linear_cross_entropy(cuda, chunk, 1e-5);
  check_linear_cross_entropy(cuda.dtype(at::kBFloat16), 8, 1.0 / 32);
  check_linear_cross_entropy(cuda.dtype(at::kHalf), 8, 1.0 / 256);
  // Under bf16 autocast with fp32 inputs (the trainer's case): the GEMMs in bf16, the gradients fp32.
  const auto hidden = at::randn({64, 32}, cuda), weight = at::randn({200, 32}, cuda) * 0.2;
  const auto targets = loss_targets(64, 190, cuda);
  const auto under_autocast = run_linear_loss(
      [&](const at::Tensor& h, const at::Tensor& w) {
        const amp::AutocastGuard autocast(amp::Precision::bf16, at::kCUDA);
        return linear_cross_entropy(h, w, targets, 190, -100, LossReduction::mean, 16);
      },
      hidden, weight);
  const auto exact = run_linear_loss(
      [&](const at::Tensor& h, const at::Tensor& w) {
        return cross_entropy_reference(at::linear(h, w), targets, 190, -100, LossReduction::mean);
      },
      hidden.to(at::kBFloat16).to(at::kDouble), weight.to(at::kBFloat16).to(at::kDouble));
  EXPECT_EQ(under_autocast.grad_weight.scalar_type(), at::kFloat);
  EXPECT_LE(std::abs(under_autocast.loss.item<double>() - exact.loss.item<double>()), 1e-3 * exact.loss.item<double>());
  EXPECT_LE(max_diff(under_autocast.grad_hidden, exact.grad_hidden), 1.0 / 64 * max_abs(exact.grad_hidden));
  EXPECT_LE(max_diff(under_autocast.grad_weight, exact.grad_weight), 1.0 / 64 * max_abs(exact.grad_weight));
}

}  // namespace
}  // namespace scaletrain::model
