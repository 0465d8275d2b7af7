// Trainer. References: a training loop written out here with torch::optim::AdamW (same batches,
// schedule and clipping) must give bit-identical weights; run-folder files parsed back.
#include <fstream>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include "scaletrain/core/error.h"
#include "scaletrain/data/tokenizer.h"
#include "scaletrain/train/lr_schedule.h"
#include "scaletrain/train/trainer.h"
#include "test_util.h"

namespace scaletrain::train {
namespace {

RunConfig tiny(const std::string& out_dir) {
  RunConfig c;
  c.model.n_layer(2).n_head(2).n_embd(32).block_size(224);
  c.data.train_examples(512).val_examples(16);
  c.optim.lr(3e-3).min_lr(3e-4).warmup_steps(5);
  c.train.max_steps(12).batch_size(8).log_every(4).out_dir(out_dir).device(DeviceChoice::cpu);
  c.eval.examples(8).max_new_tokens(24).loss_batches(2).batch_size(8);
  return c;
}

std::vector<at::Tensor> weights(model::GPT& m) {
  std::vector<at::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

// torch AdamW as the tiny config asks for it: betas (0.9, 0.95) and eps 1e-8 (the optim.*
// defaults), weight decay 0.1 on matrices and embeddings only. Each group spells out every option:
// LibTorch does not fill a group's options from the optimizer's defaults.
std::unique_ptr<torch::optim::AdamW> reference_adamw(model::GPT& m) {
  std::vector<at::Tensor> decay, no_decay;
  for (const auto& p : m->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  auto options = [](double weight_decay) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(3e-3).betas({0.9, 0.95}).eps(1e-8).weight_decay(weight_decay));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, options(0.1));
  groups.emplace_back(no_decay, options(0.0));
  return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(3e-3));
}

// The hand-written loop's loss is ATen's cross_entropy: bit for bit against the trainer with the
// unfused loss, and within rounding with the fused one (model.fused_ops, the default).
// With loss_chunk_rows > 0 the trainer's output layer and loss run a chunk of rows at a time.
void check_matches_hand_written_loop(bool fused_ops, double tolerance, int64_t loss_chunk_rows = 0) {
  RunConfig config = tiny("");
  config.eval.before_training(false).examples(0);
  config.model.fused_ops(fused_ops).loss_chunk_rows(loss_chunk_rows);
  Trainer trainer(config);
  trainer.fit();

  // The reference: same seed, same batches, torch AdamW with the same groups, schedule, clipping.
  Trainer fresh(config);  // a second, untrained model from the same seed
  auto& m = fresh.model();
  auto adamw_owner = reference_adamw(m);
  auto& adamw = *adamw_owner;
  for (int64_t step = 0; step < 12; ++step) {
    // warmup 5 steps to 3e-3, cosine to 3e-4 at step 11
    double lr = step < 5 ? 3e-3 * (step + 1) / 5.0 : 3e-4 + 0.5 * 2.7e-3 * (1 + std::cos(M_PI * (step - 5) / 6.0));
    for (auto& g : adamw.param_groups()) g.options().set_lr(lr);
    auto batch = fresh.dataset().train_batch(step, 8);
    adamw.zero_grad();
    auto logits = m->forward(batch.inputs);
    auto loss = at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), batch.targets.reshape({-1}), {},
                                       at::Reduction::Mean, -100);
    loss.backward();
    torch::nn::utils::clip_grad_norm_(m->parameters(), 1.0);
    adamw.step();
  }
  auto trained = weights(trainer.model()), reference = weights(m);
  ASSERT_EQ(trained.size(), reference.size());
  for (size_t i = 0; i < trained.size(); ++i) {
    if (tolerance == 0) {
      EXPECT_TRUE(at::equal(trained[i], reference[i])) << "parameter " << i;
    } else {
      EXPECT_LE((trained[i] - reference[i]).abs().max().item<double>(), tolerance) << "parameter " << i;
    }
  }
}

TEST(Trainer, MatchesAHandWrittenAdamWLoop) { check_matches_hand_written_loop(false, 0.0); }

TEST(Trainer, MatchesAHandWrittenAdamWLoopWithinRoundingWithFusedOps) { check_matches_hand_written_loop(true, 1e-5); }

TEST(Trainer, MatchesAHandWrittenAdamWLoopWithTheLossInChunks) { check_matches_hand_written_loop(true, 1e-5, 50); }

// grad_accum_steps = 3: step s uses dataset batches 3s, 3s+1, 3s+2. The reference trains on one
// batch per step holding the same sequences (padded and concatenated), with the mean loss. With
// loss_chunk_rows the trainer's loss gradient arrives scaled by the accumulation weights.
void check_accumulation_matches_one_big_batch(int64_t loss_chunk_rows) {
  RunConfig config = tiny("");
  config.model.loss_chunk_rows(loss_chunk_rows);
  config.train.grad_accum_steps(3).max_steps(4).batch_size(2);
  config.eval.before_training(false).examples(0);
  Trainer trainer(config);
  trainer.fit();

  Trainer fresh(config);
  auto& m = fresh.model();
  auto adamw_owner = reference_adamw(m);
  auto& adamw = *adamw_owner;
  WarmupCosineSchedule schedule(3e-3, 3e-4, 5, 4);
  for (int64_t step = 0; step < 4; ++step) {
    schedule.apply(adamw, step);
    std::vector<data::Batch> parts;
    int64_t longest = 0;
    for (int64_t i = 0; i < 3; ++i) {
      parts.push_back(fresh.dataset().train_batch(step * 3 + i, 2));
      longest = std::max(longest, parts.back().inputs.size(1));
    }
    std::vector<at::Tensor> inputs, targets;
    for (const auto& b : parts) {
      const int64_t extra = longest - b.inputs.size(1);
      inputs.push_back(at::constant_pad_nd(b.inputs, {0, extra}, data::ByteTokenizer::kPad));
      targets.push_back(at::constant_pad_nd(b.targets, {0, extra}, -100));
    }
    adamw.zero_grad();
    m->loss(m->forward(at::cat(inputs)), at::cat(targets)).backward();
    torch::nn::utils::clip_grad_norm_(m->parameters(), 1.0);
    adamw.step();
  }
  auto trained = weights(trainer.model()), reference = weights(m);
  for (size_t i = 0; i < trained.size(); ++i)
    EXPECT_LT((trained[i] - reference[i]).abs().max().item<double>(), 2e-6) << "parameter " << i;
}

TEST(Trainer, AccumulationMatchesOneBigBatchPerStep) { check_accumulation_matches_one_big_batch(0); }

TEST(Trainer, AccumulationWithTheLossInChunksMatchesOneBigBatchPerStep) {
  check_accumulation_matches_one_big_batch(37);
}

TEST(Trainer, LearnsAndWritesTheRunFolder) {
  testing::TempDir dir;
  RunConfig config = tiny(dir.file("run"));
  config.train.max_steps(60);
  config.eval.every(30);
  auto summary = Trainer(config).fit();
  ASSERT_TRUE(summary.before.has_value());
  EXPECT_LT(summary.after.loss, summary.before->loss - 1.0);  // from ~5.5 (uniform over 258) down
  EXPECT_EQ(summary.after.examples, 8);
  EXPECT_GE(summary.after.exact_match, 0.0);
  EXPECT_GT(summary.tokens_per_second, 0);

  // config.yaml reloads to the same configuration.
  RunConfig reloaded = RunConfig::load(dir.file("run/config.yaml"));
  EXPECT_EQ(reloaded.to_yaml(), config.to_yaml());
  // metrics.jsonl: valid JSON per line, train lines every 4 steps, evals at 0, 30, 60.
  std::ifstream metrics(dir.file("run/metrics.jsonl"));
  int train_lines = 0;
  std::vector<int64_t> eval_steps;
  for (std::string line; std::getline(metrics, line);) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "train") {
      ++train_lines;
      EXPECT_TRUE(j["loss"].is_number());
    } else {
      eval_steps.push_back(j["step"].get<int64_t>());
    }
  }
  EXPECT_EQ(train_lines, 15);
  EXPECT_EQ(eval_steps, (std::vector<int64_t>{0, 30, 60}));
  std::ifstream summary_file(dir.file("run/summary.json"));
  auto j = nlohmann::json::parse(summary_file);
  EXPECT_EQ(j["steps"], 60);
  EXPECT_NEAR(j["after"]["val_loss"].get<double>(), summary.after.loss, 1e-12);
  // model.pt reloads into a fresh model with identical outputs.
  Trainer again(config);
  load_model(again.model(), dir.file("run/model.pt"));
  EXPECT_NEAR(again.evaluate(false).loss, summary.after.loss, 1e-6);
}

TEST(Trainer, SameSeedSameWeights) {
  RunConfig config = tiny("");
  config.eval.before_training(false).examples(0);
  Trainer a(config), b(config);
  a.fit();
  b.fit();
  auto wa = weights(a.model()), wb = weights(b.model());
  for (size_t i = 0; i < wa.size(); ++i) EXPECT_TRUE(at::equal(wa[i], wb[i]));
}

TEST(Trainer, TrainsOnAPlainTextFile) {
  testing::TempDir dir;
  {
    std::ofstream text(dir.file("corpus.txt"));
    for (int i = 0; i < 300; ++i) text << "the cat sat on the mat. ";
  }
  RunConfig config = tiny("");
  config.data.source(data::DataSource::text).path(dir.file("corpus.txt"));
  config.model.block_size(32);
  config.train.max_steps(150);
  auto summary = Trainer(config).fit();
  EXPECT_EQ(summary.after.examples, 0);  // no prompts in plain text
  EXPECT_LT(summary.after.loss, 1.0);    // the text repeats: nearly every byte is predictable
}

TEST(Trainer, CudaRequestWithoutCudaIsAConfigError) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a CUDA device is present";
  RunConfig config = tiny("");
  config.train.device(DeviceChoice::cuda);
  try {
    Trainer trainer(config);
    FAIL() << "no error";
  } catch (const core::ConfigError& e) {
    EXPECT_EQ(e.key(), "train.device");
  }
}

TEST(Trainer, TrainsOnCuda) {
  SCALETRAIN_REQUIRE_CUDA();
  RunConfig config = tiny("");
  config.train.device(DeviceChoice::cuda).max_steps(40);
  auto summary = Trainer(config).fit();
  EXPECT_EQ(summary.device, "cuda:0");
  EXPECT_LT(summary.after.loss, summary.before->loss - 1.0);
}

}  // namespace
}  // namespace scaletrain::train
