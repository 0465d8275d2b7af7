// GPT model. References: the full-sequence forward pass (for the cache), each prompt decoded
// alone (for batched generation), shifted positions (RoPE is relative), and a model whose
// attention math is written out in attention_test.
#include <fstream>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "scaletrain/core/error.h"
#include "scaletrain/model/generate.h"
#include "scaletrain/model/gpt.h"
#include "scaletrain/train/trainer.h"
#include "test_util.h"

namespace scaletrain::model {
namespace {

GPTOptions small(AttentionBackend backend = AttentionBackend::sdpa) {
  GPTOptions o;
  o.n_layer(2).n_head(2).n_embd(32).block_size(64).attention(backend);
  return o;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

// Reference: the same model without padding (pad_vocab_to 1), holding the padded model's real
// rows, in fp64. The loss, every gradient and the real rows' gradients must agree; the padding
// rows get no gradient and never win a decoding step even when their weights are large.
TEST(GPT, PaddedVocabularyIsTheUnpaddedModel) {
  for (bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied" : "untied");
    torch::manual_seed(3);
    GPT padded(small().tie_embeddings(tied).pad_vocab_to(64));
    GPT plain(small().tie_embeddings(tied).pad_vocab_to(1));
    padded->to(at::kDouble);
    plain->to(at::kDouble);
    ASSERT_EQ(padded->wte->weight.size(0), 320);
    ASSERT_EQ(plain->wte->weight.size(0), 258);
    {
      torch::NoGradGuard no_grad;
      auto from = padded->named_parameters();
      for (auto& item : plain->named_parameters()) {
        const at::Tensor& source = from[item.key()];
        item.value().copy_(source.narrow(0, 0, item.value().size(0)));  // real rows (all rows elsewhere)
      }
      // Padding rows that would dominate the softmax if they reached it.
      padded->wte->weight.narrow(0, 258, 62).fill_(50.0);
      if (!tied) padded->lm_head->weight.narrow(0, 258, 62).fill_(50.0);
    }
    const auto tokens = at::randint(0, 258, {3, 17});
    const auto targets = at::randint(0, 258, {3, 17});
    auto padded_logits = padded->forward(tokens);
    EXPECT_EQ(padded_logits.sizes(), (at::IntArrayRef{3, 17, 258}));
    auto padded_loss = padded->loss(padded_logits, targets);
    auto plain_loss = plain->loss(plain->forward(tokens), targets);
    EXPECT_LT(std::abs(padded_loss.item<double>() - plain_loss.item<double>()), 1e-12);
    padded_loss.backward();
    plain_loss.backward();
    auto padded_params = padded->named_parameters();
    for (const auto& item : plain->named_parameters()) {
      const at::Tensor grad = padded_params[item.key()].grad();
      const int64_t rows = item.value().size(0);
      EXPECT_LT(max_diff(grad.narrow(0, 0, rows), item.value().grad()), 1e-12) << item.key();
      if (grad.size(0) > rows) {
        EXPECT_EQ(grad.narrow(0, rows, grad.size(0) - rows).abs().max().item<double>(), 0.0) << item.key();
      }
    }
    // Greedy decoding over the padded model picks only real tokens.
    padded->eval();
    EXPECT_LT(padded->forward(tokens).argmax(-1).max().item<int64_t>(), 258);
  }
}

TEST(GPT, ShapesAndParameterCount) {
  GPT m(small());
  auto logits = m->forward(at::randint(0, 258, {3, 10}));
  EXPECT_EQ(logits.sizes(), (at::IntArrayRef{3, 10, 258}));
  // Per block: qkv (32*96+96), proj (32*32+32), fc (32*128+128), proj (128*32+32), 2 LayerNorms (2*64).
  const int64_t block = 32 * 96 + 96 + 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32 + 128;
  // The embedding has 320 rows: 258 padded to a multiple of 64 (model.pad_vocab_to).
  EXPECT_EQ(m->num_parameters(), 320 * 32 + 2 * block + 64);  // tied output layer adds nothing
  GPT untied(small().tie_embeddings(false));
  EXPECT_EQ(untied->num_parameters(), m->num_parameters() + 320 * 32);
  GPT unpadded(small().pad_vocab_to(1));
  EXPECT_EQ(unpadded->num_parameters(), m->num_parameters() - 62 * 32);
  // Without biases: no linear biases (96 + 32 + 128 + 32 per block) and no LayerNorm biases (3 x 32).
  GPT no_bias(small().bias(false));
  EXPECT_EQ(no_bias->num_parameters(), m->num_parameters() - 2 * (96 + 32 + 128 + 32) - 5 * 32);
  for (const auto& item : no_bias->named_parameters()) EXPECT_EQ(item.key().find("bias"), std::string::npos) << item.key();
}

TEST(GPT, FutureTokensDoNotChangeEarlierLogits) {
  torch::NoGradGuard no_grad;
  GPT m(small());
  m->eval();
  auto tokens = at::randint(0, 256, {2, 20});
  auto changed = tokens.clone();
  changed.narrow(1, 12, 8).random_(0, 256);
  auto a = m->forward(tokens), b = m->forward(changed);
  EXPECT_LT(max_diff(a.narrow(1, 0, 12), b.narrow(1, 0, 12)), 1e-5);
  EXPECT_GT(max_diff(a.narrow(1, 12, 8), b.narrow(1, 12, 8)), 1e-3);
}

TEST(GPT, RotaryEncodingIsRelative) {
  torch::NoGradGuard no_grad;
  GPT m(small());
  m->eval();
  // Sharpen attention so that positions matter a lot (at init it is nearly uniform).
  for (size_t i = 0; i < m->blocks->size(); ++i) m->blocks->at<BlockImpl>(i).attn->qkv->weight.mul_(20);
  auto tokens = at::randint(0, 256, {1, 16});
  auto base = at::arange(16, at::kLong).view({1, 16});
  auto a = m->forward(tokens, ForwardContext{base, {}, nullptr});
  auto b = m->forward(tokens, ForwardContext{base + 30, {}, nullptr});
  const double scale = a.abs().max().item<double>();
  EXPECT_LT(max_diff(a, b), 1e-4 * scale);  // same relative positions, same outputs
  auto c = m->forward(tokens, ForwardContext{base * 2, {}, nullptr});
  EXPECT_GT(max_diff(a, c), 1e-2 * scale);  // other distances, other outputs
}

TEST(GPT, CachedDecodingEqualsFullForward) {
  torch::NoGradGuard no_grad;
  for (auto backend : {AttentionBackend::math, AttentionBackend::sdpa, AttentionBackend::flash}) {
    GPT m(small(backend));
    m->eval();
    auto tokens = at::randint(0, 256, {2, 24});
    auto full = m->forward(tokens);
    KVCache cache = m->make_cache(2, 24);
    std::vector<at::Tensor> pieces{m->forward(tokens.narrow(1, 0, 10), ForwardContext{{}, {}, &cache})};
    for (int64_t t = 10; t < 24; ++t) pieces.push_back(m->forward(tokens.narrow(1, t, 1), ForwardContext{{}, {}, &cache}));
    EXPECT_EQ(cache.length, 24);
    EXPECT_LT(max_diff(at::cat(pieces, 1), full), 1e-4) << core::enum_name(backend);
  }
}

TEST(GPT, BatchedGenerationEqualsEachPromptAlone) {
  GPT m(small());
  std::vector<std::vector<int64_t>> prompts = {{1, 2, 3, 4, 5, 6, 7}, {9}, {40, 41, 42}};
  GenerateOptions options;
  options.max_new_tokens = 12;
  options.eos_id = 1000;  // never produced: every sequence runs the full length
  auto together = greedy_generate(m, prompts, options);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto alone = greedy_generate(m, {prompts[i]}, options);
    EXPECT_EQ(together[i], alone[0]) << "prompt " << i;
    EXPECT_EQ(together[i].size(), 12u);
  }
  EXPECT_TRUE(m->is_training());  // mode restored
}

TEST(GPT, ShortPromptBesideALongOneGetsItsFullBudget) {
  GPT m(small());  // block_size 64
  std::vector<int64_t> long_prompt(50, 5), short_prompt = {1, 2, 3};
  GenerateOptions options;
  options.max_new_tokens = 40;
  options.eos_id = 1000;
  auto together = greedy_generate(m, {long_prompt, short_prompt}, options);
  EXPECT_EQ(together[0].size(), 14u);  // 64 - 50
  EXPECT_EQ(together[1].size(), 40u);
  EXPECT_EQ(together[1], greedy_generate(m, {short_prompt}, options)[0]);
  EXPECT_EQ(together[0], greedy_generate(m, {long_prompt}, options)[0]);
}

TEST(GPT, GenerationStopsAtEndToken) {
  GPT m(small());
  // Make token 7 the argmax everywhere: the output layer is tied, so push its embedding.
  {
    torch::NoGradGuard no_grad;
    m->ln_f->weight.fill_(0);
    m->ln_f->bias.fill_(1);
    m->wte->weight[7].fill_(5);
  }
  GenerateOptions options;
  options.eos_id = 7;
  auto out = greedy_generate(m, {{1, 2}}, options);
  EXPECT_TRUE(out[0].empty());
  options.eos_id = 256;
  options.max_new_tokens = 5;
  out = greedy_generate(m, {{1, 2}}, options);
  EXPECT_EQ(out[0], std::vector<int64_t>(5, 7));
}

TEST(GPT, SaveAndLoadRoundTrip) {
  testing::TempDir dir;
  torch::NoGradGuard no_grad;
  at::manual_seed(5);
  GPT a(small());
  train::save_model(a, dir.file("model.pt"));
  at::manual_seed(6);
  GPT b(small());
  auto tokens = at::randint(0, 256, {1, 8});
  EXPECT_GT(max_diff(a->forward(tokens), b->forward(tokens)), 1e-3);
  train::load_model(b, dir.file("model.pt"));
  EXPECT_EQ(max_diff(a->forward(tokens), b->forward(tokens)), 0.0);
  GPT other(small().n_embd(64));
  EXPECT_THROW(train::load_model(other, dir.file("model.pt")), core::IOError);
  std::ofstream(dir.file("junk.pt")) << "not a model";
  EXPECT_THROW(train::load_model(b, dir.file("junk.pt")), core::IOError);
}

// model.attention flash: the same loss and gradients as the math backend (same weights).
TEST(GPT, FlashAttentionBackendTrainsLikeMath) {
  at::manual_seed(7);
  GPT flash(small(AttentionBackend::flash)), math(small(AttentionBackend::math));
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < flash->parameters().size(); ++i) math->parameters()[i].copy_(flash->parameters()[i]);
  }
  const auto tokens = at::randint(0, 256, {3, 40}), targets = at::randint(0, 256, {3, 40});
  const auto lf = flash->forward_loss(tokens, targets), lm = math->forward_loss(tokens, targets);
  lf.backward(), lm.backward();
  EXPECT_LT(std::abs(lf.item<double>() - lm.item<double>()), 1e-5);
  for (size_t i = 0; i < flash->parameters().size(); ++i)
    EXPECT_LT(max_diff(flash->parameters()[i].grad(), math->parameters()[i].grad()), 1e-5) << "parameter " << i;
  // Batched generation (a padding mask) works too; attention dropout does not exist in flash.
  EXPECT_EQ(greedy_generate(flash, {{1, 2, 3}, {4}}, GenerateOptions{}).size(), 2u);
  EXPECT_THROW(GPT(small(AttentionBackend::flash).dropout(0.1)), core::ConfigError);
}

TEST(GPT, OptionsValidation) {
  EXPECT_THROW(GPT(small().n_embd(30).n_head(4)), core::ConfigError);
  EXPECT_THROW(GPT(small().n_embd(6).n_head(2)), core::ConfigError);  // odd head size: no rotary pairs
  GPT m(small());
  EXPECT_THROW(m->forward(at::zeros({1, 65}, at::kLong)), c10::Error);
}

TEST(GPT, CudaMatchesCpu) {
  SCALETRAIN_REQUIRE_CUDA();
  torch::NoGradGuard no_grad;
  GPT m(small());
  m->eval();
  auto tokens = at::randint(0, 256, {2, 32});
  auto cpu = m->forward(tokens);
  m->to(at::kCUDA);
  auto gpu = m->forward(tokens.to(at::kCUDA)).cpu();
  EXPECT_LT(max_diff(cpu, gpu), 2e-3);
  auto prompts = std::vector<std::vector<int64_t>>{{3, 4, 5}, {6}};
  GenerateOptions options;
  options.max_new_tokens = 8;
  auto on_gpu = greedy_generate(m, prompts, options);
  m->to(at::kCPU);
  EXPECT_EQ(on_gpu, greedy_generate(m, prompts, options));
}

}  // namespace
}  // namespace scaletrain::model
