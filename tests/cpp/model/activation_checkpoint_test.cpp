// Activation checkpointing. Reference: the same model (same weights, same seed) without
// checkpointing; on the CPU in fp32 losses and gradients must be bit for bit the same, dropout
// included, which only holds if the recomputation replays the random stream of the forward pass.
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/modules/linear.h>
#include <torch/utils.h>

#include "scaletrain/core/config.h"
#include "scaletrain/model/activation_checkpoint.h"
#include "scaletrain/model/gpt.h"
#include "scaletrain/train/config.h"
#include "test_util.h"

namespace scaletrain::model {
namespace {

GPTOptions tiny(double dropout) {
  GPTOptions o;
  o.n_layer(3).n_head(2).n_embd(32).block_size(32).dropout(dropout);
  return o;
}

// A model with checkpointing and one without, with the same weights.
std::pair<GPT, GPT> twin_models(GPTOptions options, const at::Device& device = at::kCPU) {
  torch::manual_seed(0);
  GPT plain(options.activation_checkpointing(false));
  GPT checkpointed(options.activation_checkpointing(true));
  {
    torch::NoGradGuard no_grad;
    auto source = plain->named_parameters();
    for (auto& item : checkpointed->named_parameters()) item.value().copy_(source[item.key()]);
  }
  plain->to(device);
  checkpointed->to(device);
  return {plain, checkpointed};
}

struct StepResult {
  at::Tensor loss;
  std::vector<std::pair<std::string, at::Tensor>> grads;
  at::Tensor next_random;  // drawn after backward: where the random stream stands
};

// One forward and backward from a fixed seed.
StepResult train_step(GPT& model, const at::Tensor& tokens, uint64_t seed) {
  model->zero_grad();
  torch::manual_seed(seed);
  auto logits = model->forward(tokens.narrow(1, 0, tokens.size(1) - 1));
  auto loss = model->loss(logits, tokens.narrow(1, 1, tokens.size(1) - 1));
  loss.backward();
  StepResult result{loss.detach(), {}, at::rand({16}, tokens.options().dtype(at::kFloat))};
  for (auto& item : model->named_parameters())
    result.grads.emplace_back(item.key(), item.value().grad());
  return result;
}

// Number of checkpoint nodes in the graph behind `output`: proves the checkpointed path ran.
int count_checkpoint_nodes(const at::Tensor& output) {
  int count = 0;
  std::vector<torch::autograd::Node*> stack{output.grad_fn().get()};
  std::unordered_set<torch::autograd::Node*> seen;
  while (!stack.empty()) {
    auto* node = stack.back();
    stack.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    if (node->name().find("CheckpointFunction") != std::string::npos) ++count;
    for (const auto& edge : node->next_edges()) stack.push_back(edge.function.get());
  }
  return count;
}

void expect_bit_identical(const StepResult& a, const StepResult& b) {
  EXPECT_TRUE(at::equal(a.loss, b.loss))
      << a.loss.item<double>() << " vs " << b.loss.item<double>();
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size(); ++i) {
    ASSERT_TRUE(a.grads[i].second.defined() && b.grads[i].second.defined()) << a.grads[i].first;
    EXPECT_TRUE(at::equal(a.grads[i].second, b.grads[i].second))
        << a.grads[i].first << ": max diff "
        << (a.grads[i].second - b.grads[i].second).abs().max().item<double>();
  }
}

TEST(ActivationCheckpoint, GptGradientsBitIdenticalWithoutDropout) {
  auto [plain, checkpointed] = twin_models(tiny(0.0));
  auto tokens = at::randint(0, 258, {2, 17});
  {
    torch::manual_seed(1);
    EXPECT_EQ(count_checkpoint_nodes(checkpointed->forward(tokens)), 3);
    EXPECT_EQ(count_checkpoint_nodes(plain->forward(tokens)), 0);
  }
  expect_bit_identical(train_step(plain, tokens, 1), train_step(checkpointed, tokens, 1));
}

TEST(ActivationCheckpoint, GptGradientsBitIdenticalWithDropout) {
  // Dropout in attention, residuals and embeddings: the recomputed masks must be the forward's.
  for (auto backend : {AttentionBackend::math, AttentionBackend::sdpa}) {
    auto [plain, checkpointed] = twin_models(tiny(0.1).attention(backend));
    auto tokens = at::randint(0, 258, {2, 17});
    auto reference = train_step(plain, tokens, 7);
    auto result = train_step(checkpointed, tokens, 7);
    SCOPED_TRACE(core::enum_name(backend));
    expect_bit_identical(reference, result);
    // Dropout is really on: another seed gives another loss.
    EXPECT_FALSE(at::equal(train_step(plain, tokens, 8).loss, reference.loss));
  }
}

TEST(ActivationCheckpoint, RandomStreamAfterBackwardIsThePlainRunsStream) {
  auto [plain, checkpointed] = twin_models(tiny(0.1));
  auto tokens = at::randint(0, 258, {2, 17});
  auto reference = train_step(plain, tokens, 3);
  auto result = train_step(checkpointed, tokens, 3);
  EXPECT_TRUE(at::equal(reference.next_random, result.next_random));
}

TEST(ActivationCheckpoint, EvalNoGradAndCachedDecodingAreUnaffected) {
  auto [plain, checkpointed] = twin_models(tiny(0.1));
  auto tokens = at::randint(0, 258, {2, 12});
  {  // eval mode: no dropout, no checkpoint, same logits
    EvalModeGuard eval_plain(*plain), eval_checkpointed(*checkpointed);
    auto a = plain->forward(tokens), b = checkpointed->forward(tokens);
    EXPECT_TRUE(at::equal(a, b));
    EXPECT_EQ(count_checkpoint_nodes(b), 0);
  }
  {  // training mode under NoGradGuard: same dropout masks, no graph
    torch::NoGradGuard no_grad;
    torch::manual_seed(5);
    auto a = plain->forward(tokens);
    torch::manual_seed(5);
    auto b = checkpointed->forward(tokens);
    EXPECT_TRUE(at::equal(a, b));
    EXPECT_FALSE(b.requires_grad());
  }
  {  // training mode with grad and a KV cache: not checkpointed, the cache is filled once
    auto [plain0, checkpointed0] = twin_models(tiny(0.0));
    KVCache cache_a = plain0->make_cache(2, 12), cache_b = checkpointed0->make_cache(2, 12);
    auto a = plain0->forward(tokens, ForwardContext{{}, {}, &cache_a});
    auto b = checkpointed0->forward(tokens, ForwardContext{{}, {}, &cache_b});
    EXPECT_TRUE(at::equal(a, b));
    EXPECT_EQ(count_checkpoint_nodes(b), 0);
    EXPECT_EQ(cache_b.length, 12);
    for (size_t i = 0; i < cache_a.keys.size(); ++i)
      EXPECT_TRUE(at::equal(cache_a.keys[i], cache_b.keys[i]));
  }
}

// checkpoint() on its own: a two-layer MLP with dropout, against the same calls without it.
struct Mlp {
  torch::nn::Linear fc1{8, 16}, fc2{16, 8};
  at::Tensor operator()(const at::Tensor& x) {
    return fc2(at::dropout(at::gelu(fc1(x)), 0.2, /*train=*/true));
  }
  std::vector<at::Tensor> grads() const {
    return {fc1->weight.grad(), fc1->bias.grad(), fc2->weight.grad(), fc2->bias.grad()};
  }
};

TEST(ActivationCheckpoint, FunctionGradientsForInputAndParameters) {
  Mlp mlp;
  auto x = at::randn({4, 8}).requires_grad_(true);
  torch::manual_seed(11);
  mlp(x).square().sum().backward();
  auto reference = mlp.grads();
  auto reference_x = x.grad().clone();
  for (auto& g : reference) g = g.clone();
  for (auto& g : mlp.grads()) g.zero_();
  x.grad().zero_();

  torch::manual_seed(11);
  checkpoint([mlp](const at::Tensor& input) mutable { return mlp(input); }, x)
      .square()
      .sum()
      .backward();
  EXPECT_TRUE(at::equal(x.grad(), reference_x));
  auto grads = mlp.grads();
  for (size_t i = 0; i < grads.size(); ++i) EXPECT_TRUE(at::equal(grads[i], reference[i])) << i;
}

TEST(ActivationCheckpoint, InputWithoutGradStillGivesParameterGradients) {
  // PyTorch's reentrant checkpoint returns an output without grad here; ours keeps the graph.
  Mlp mlp;
  auto x = at::randn({4, 8});
  torch::manual_seed(12);
  mlp(x).sum().backward();
  std::vector<at::Tensor> reference;
  for (auto& g : mlp.grads()) reference.push_back(g.clone());
  for (auto& g : mlp.grads()) g.zero_();

  torch::manual_seed(12);
  auto y = checkpoint([mlp](const at::Tensor& input) mutable { return mlp(input); }, x);
  ASSERT_TRUE(y.requires_grad());
  y.sum().backward();
  auto grads = mlp.grads();
  for (size_t i = 0; i < grads.size(); ++i) EXPECT_TRUE(at::equal(grads[i], reference[i])) << i;
  EXPECT_FALSE(x.grad().defined());
}

// CPU autocast to bfloat16 for a scope, like `with torch.autocast("cpu", dtype=torch.bfloat16)`.
class CpuAutocast {
 public:
  CpuAutocast() {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~CpuAutocast() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCPU, false);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  }
};

TEST(ActivationCheckpoint, RecomputationRunsUnderTheForwardsAutocast) {
  // Backward runs outside the autocast scope, as in training; the recomputation must still use
  // bf16.
  Mlp mlp;
  auto x = at::randn({4, 8}).requires_grad_(true);
  at::Tensor loss;
  {
    CpuAutocast autocast;
    torch::manual_seed(13);
    loss = mlp(x).to(at::kFloat).square().sum();
  }
  loss.backward();
  std::vector<at::Tensor> reference{x.grad().clone()};
  for (auto& g : mlp.grads()) reference.push_back(g.clone());
  for (auto& g : mlp.grads()) g.zero_();
  x.grad().zero_();

  {
    CpuAutocast autocast;
    torch::manual_seed(13);
    loss = checkpoint([mlp](const at::Tensor& input) mutable { return mlp(input); }, x)
               .to(at::kFloat)
               .square()
               .sum();
  }
  EXPECT_FALSE(at::autocast::is_autocast_enabled(at::kCPU));
  loss.backward();
  EXPECT_FALSE(at::autocast::is_autocast_enabled(at::kCPU));  // state restored after recompute
  std::vector<at::Tensor> grads{x.grad()};
  for (auto& g : mlp.grads()) grads.push_back(g);
  for (size_t i = 0; i < grads.size(); ++i) EXPECT_TRUE(at::equal(grads[i], reference[i])) << i;
}

TEST(ActivationCheckpoint, GradModeOffCallsTheFunctionDirectly) {
  torch::NoGradGuard no_grad;
  auto x = at::randn({3});
  int calls = 0;
  auto y = checkpoint(
      [&calls](const at::Tensor& input) {
        ++calls;
        return input * 2;
      },
      x);
  EXPECT_EQ(calls, 1);
  EXPECT_FALSE(y.requires_grad());
  EXPECT_TRUE(at::equal(y, x * 2));
}

TEST(ActivationCheckpoint, AutogradGradThroughCheckpointIsRejected) {
  // The inner backward writes parameter gradients to .grad, which torch::autograd::grad must not
  // see.
  Mlp mlp;
  auto x = at::randn({4, 8}).requires_grad_(true);
  auto y = checkpoint([mlp](const at::Tensor& input) mutable { return mlp(input); }, x).sum();
  EXPECT_THROW(torch::autograd::grad({y}, {x}), c10::Error);
}

TEST(ActivationCheckpoint, ConfigKeyParses) {
  train::RunConfig config;
  EXPECT_FALSE(config.model.activation_checkpointing());
  core::apply_yaml(core::root_of(config), "model:\n  activation_checkpointing: true\n",
                   "test.yaml");
  EXPECT_TRUE(config.model.activation_checkpointing());
  core::apply_override(core::root_of(config), "model.activation_checkpointing=false");
  EXPECT_FALSE(config.model.activation_checkpointing());
}

TEST(ActivationCheckpoint, GpuGradientsMatchPlainModel) {
  SCALETRAIN_REQUIRE_CUDA();
  for (double dropout : {0.0, 0.1}) {
    auto [plain, checkpointed] = twin_models(tiny(dropout), at::kCUDA);
    auto tokens = at::randint(0, 258, {4, 33}, at::TensorOptions(at::kLong).device(at::kCUDA));
    auto reference = train_step(plain, tokens, 21);
    auto result = train_step(checkpointed, tokens, 21);
    SCOPED_TRACE("dropout " + std::to_string(dropout));
    EXPECT_NEAR(result.loss.item<double>(), reference.loss.item<double>(), 1e-6);
    for (size_t i = 0; i < reference.grads.size(); ++i) {
      const auto& a = reference.grads[i].second;
      const auto& b = result.grads[i].second;
      ASSERT_TRUE(b.defined()) << reference.grads[i].first;
      const double scale = a.abs().max().item<double>();
      EXPECT_LE((a - b).abs().max().item<double>(), 1e-5 * scale + 1e-8)
          << reference.grads[i].first;
    }
    EXPECT_TRUE(at::equal(reference.next_random, result.next_random));  // CUDA stream restored too
  }
}

}  // namespace
}  // namespace scaletrain::model
