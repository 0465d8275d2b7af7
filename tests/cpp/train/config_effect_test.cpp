// Every configuration key takes effect. Driven by the configuration reference (every leaf key of
// RunConfig): each key is listed below either as one that changes training, with another value and
// the context in which it matters (a short run with that value must end with different weights
// than the same run without it), or as one that cannot change the weights, with the reason (and,
// where the run is deterministic, a check that the weights are bit-identical). A key added to the
// configuration without an entry here fails the test. Reference: the weights of the run with the
// default value, compared as the bytes model.pt would hold.
#include <fstream>
#include <map>
#include <set>

#include <gtest/gtest.h>

#include "scaletrain/core/config.h"
#include "scaletrain/train/checkpoint.h"
#include "scaletrain/train/train_state.h"
#include "scaletrain/train/trainer.h"
#include "test_util.h"

namespace scaletrain::train {
namespace {

enum class Effect {
  changes,    // another value gives other weights
  none,       // cannot change the weights: asserted bit-identical
  unchecked,  // cannot change the math, but may change the bits (summation order, kernels) or
              // cannot run here; the reason says which
};

struct KeyCase {
  const char* key;
  const char* value;                 // the other value (YAML)
  std::vector<std::string> context;  // overrides of the base run that make the key matter
  Effect effect;
  const char* reason;  // for none / unchecked: why the weights cannot change
};

// fp16 on this CPU needs emulation; the loss scale matters there (underflow, overflow, skips).
const std::vector<std::string> kFp16 = {"amp.precision=fp16", "amp.emulated_fp16=true"};
// A scale that overflows this model's fp16 gradients for the first steps (2^20 does, 2^16 does
// not): backoff, hysteresis and the floor decide when steps stop being skipped.
std::vector<std::string> overflowing() {
  std::vector<std::string> context = kFp16;
  context.insert(context.end(), {"amp.init_scale=1048576.0", "train.max_steps=8"});
  return context;
}
// A scale that grows every step from a small start: growth and the ceiling decide its path.
std::vector<std::string> growing(std::vector<std::string> more = {}) {
  std::vector<std::string> context = kFp16;
  context.insert(context.end(), {"amp.init_scale=1.0", "amp.growth_interval=1"});
  context.insert(context.end(), more.begin(), more.end());
  return context;
}

const std::vector<KeyCase>& key_cases() {
  static const std::vector<KeyCase> cases = {
      {"model.vocab_size", "300", {}, Effect::changes, ""},
      {"model.pad_vocab_to", "1", {}, Effect::changes, ""},
      {"model.block_size", "256", {}, Effect::changes, ""},
      {"model.n_layer", "1", {}, Effect::changes, ""},
      {"model.n_head", "4", {}, Effect::changes, ""},
      {"model.n_embd", "48", {}, Effect::changes, ""},
      {"model.dropout", "0.0", {}, Effect::changes, ""},
      {"model.bias", "false", {}, Effect::changes, ""},
      {"model.tie_embeddings", "false", {}, Effect::changes, ""},
      {"model.attention", "math", {}, Effect::unchecked,
       "the same attention by another kernel: equal up to rounding, the bits may differ"},
      {"model.rope_base", "500.0", {}, Effect::changes, ""},
      {"model.activation_checkpointing", "true", {}, Effect::none,
       "recomputes activations in backward: bit-identical gradients by design"},
      {"model.fused_ops", "false", {}, Effect::unchecked,
       "the same RoPE and cross-entropy by the unfused expressions: RoPE bit-identical, the loss equal up to "
       "rounding (FusedOps tests the agreement)"},
      {"model.loss_chunk_rows", "5", {}, Effect::unchecked,
       "the same output layer and loss a chunk of rows at a time: equal up to the rounding of the sums "
       "(FusedOps tests the agreement)"},
      {"data.source", "text", {"data.path=@text"}, Effect::changes, ""},
      {"data.tasks", "[flowroll]", {}, Effect::changes, ""},
      {"data.seed", "7", {}, Effect::changes, ""},
      {"data.train_examples", "300", {}, Effect::changes, ""},
      {"data.val_examples", "40", {}, Effect::none, "validation pairs are drawn after the training pairs"},
      {"data.path", "@text2", {"data.source=text", "data.path=@text"}, Effect::changes, ""},
      {"data.val_path", "@bin_val", {"data.source=bin", "data.path=@bin", "model.vocab_size=512"}, Effect::changes,
       ""},
      {"data.val_fraction", "0.3", {"data.source=text", "data.path=@text"}, Effect::changes, ""},
      {"optim.lr", "1e-2", {}, Effect::changes, ""},
      {"optim.min_lr", "1e-5", {}, Effect::changes, ""},
      {"optim.warmup_steps", "3", {}, Effect::changes, ""},
      {"optim.weight_decay", "0.5", {}, Effect::changes, ""},
      {"optim.beta1", "0.5", {}, Effect::changes, ""},
      {"optim.beta2", "0.5", {}, Effect::changes, ""},
      {"optim.eps", "1e-3", {}, Effect::changes, ""},
      {"optim.grad_clip", "0.01", {}, Effect::changes, ""},
      {"optim.fused", "on", {}, Effect::unchecked,
       "the same AdamW arithmetic in one pass: equal up to rounding (TrainerFused tests the agreement)"},
      {"optim.zero_stage", "2", {}, Effect::unchecked,
       "AdamW over flat buffers: equal up to rounding (tests/python/test_train_zero.py checks the losses)"},
      {"optim.cpu_offload", "true", {"optim.zero_stage=1"}, Effect::unchecked,
       "the same AdamW on the host: equal up to rounding (test_train_zero.py)"},
      {"optim.offload_overlap", "false", {"optim.zero_stage=2", "optim.cpu_offload=true"}, Effect::none,
       "when the CPU step runs, not what it computes: the same numbers in the same order"},
      {"optim.offload_fraction", "0.5", {"optim.zero_stage=2", "optim.cpu_offload=true"}, Effect::unchecked,
       "the device's share is stepped by the device's AdamW: equal up to rounding (test_train_zero.py)"},
      {"optim.bucket_mb", "0.01", {"optim.zero_stage=2"}, Effect::unchecked,
       "how the gradients are cut for the collectives; one process reduces nothing"},
      {"train.max_steps", "5", {}, Effect::changes, ""},
      {"train.batch_size", "3", {}, Effect::changes, ""},
      {"train.grad_accum_steps", "2", {}, Effect::changes, ""},
      {"train.seed", "5", {}, Effect::changes, ""},
      {"train.device", "cuda", {}, Effect::unchecked, "the same math on another device (no GPU in this test)"},
      {"train.threads", "1", {}, Effect::unchecked, "the same math; the summation order may change the bits"},
      {"train.log_every", "1", {}, Effect::none, "logging only"},
      {"train.out_dir", "@run2", {}, Effect::none, "a path"},
      {"train.save_model", "false", {}, Effect::none, "whether model.pt is written"},
      {"train.cuda_graph", "off", {}, Effect::none,
       "whether the same kernels are replayed from a CUDA graph (CudaGraph tests bit-identity on the GPU)"},
      {"amp.precision", "bf16", {}, Effect::changes, ""},
      {"amp.loss_scale", "none", kFp16, Effect::changes, ""},
      {"amp.low_precision_params", "true", {"amp.precision=bf16"}, Effect::changes, ""},
      {"amp.fp32_grad_accum", "false", {"amp.precision=bf16", "amp.low_precision_params=true",
                                        "train.grad_accum_steps=3"},
       Effect::changes, ""},
      {"amp.emulated_fp16", "true", {}, Effect::none, "permits fp16 on a CPU without it; no effect in fp32"},
      {"amp.init_scale", "1.0", kFp16, Effect::changes, ""},
      {"amp.growth_interval", "2", growing(), Effect::changes, ""},
      {"amp.growth_factor", "64.0", growing(), Effect::changes, ""},
      {"amp.backoff_factor", "0.9", overflowing(), Effect::changes, ""},
      {"amp.hysteresis", "2", overflowing(), Effect::changes, ""},
      {"amp.min_scale", "524288.0", overflowing(), Effect::changes, ""},
      {"amp.max_scale", "4.0", growing(), Effect::changes, ""},
      {"eval.every", "2", {}, Effect::none, "evaluation only (no random numbers drawn)"},
      {"eval.loss_batches", "2", {}, Effect::none, "evaluation only"},
      {"eval.batch_size", "4", {}, Effect::none, "evaluation only"},
      {"eval.examples", "2", {}, Effect::none, "evaluation only (greedy decoding)"},
      {"eval.max_new_tokens", "8", {"eval.examples=2"}, Effect::none, "evaluation only"},
      {"eval.before_training", "true", {}, Effect::none, "evaluation only"},
      {"eval.show_samples", "1", {}, Effect::none, "what the summary prints"},
      {"checkpoint.dir", "@checkpoints", {"checkpoint.every=2"}, Effect::none, "a path"},
      {"checkpoint.every", "1", {}, Effect::none, "saving reads the state and draws no random numbers"},
      {"checkpoint.keep", "1", {"checkpoint.every=1"}, Effect::none, "how many checkpoints stay on disk"},
  };
  return cases;
}

class ConfigEffect : public ::testing::Test {
 protected:
  void SetUp() override {
    write(dir_.file("text.txt"), 6000, 11);
    write(dir_.file("text2.txt"), 6000, 29);
    // uint16 tokens below 512
    std::ofstream bin(dir_.file("train.bin"), std::ios::binary), val(dir_.file("val.bin"), std::ios::binary);
    for (uint16_t i = 0; i < 4000; ++i) {
      const uint16_t a = static_cast<uint16_t>((i * 37) % 512), b = static_cast<uint16_t>((i * 101) % 512);
      bin.write(reinterpret_cast<const char*>(&a), 2);
      val.write(reinterpret_cast<const char*>(&b), 2);
    }
  }

  static void write(const std::string& path, int length, int stride) {
    std::ofstream out(path);
    for (int i = 0; i < length; ++i) out << static_cast<char>('a' + (i * stride) % 26) << (i % 13 == 0 ? "\n" : "");
  }

  // "@text" -> a file of this test's folder.
  std::string resolve(const std::string& assignment) const {
    const auto at = assignment.find('@');
    if (at == std::string::npos) return assignment;
    static const std::map<std::string, std::string> files = {
        {"text", "text.txt"}, {"text2", "text2.txt"}, {"bin", "train.bin"}, {"bin_val", "val.bin"},
        {"run2", "run2"},     {"checkpoints", "checkpoints"}};
    return assignment.substr(0, at) + dir_.file(files.at(assignment.substr(at + 1)));
  }

  // The weights after a short run of the base configuration with `overrides`, as model.pt bytes.
  std::string train(std::vector<std::string> overrides) {
    RunConfig config;
    config.model.n_layer(2).n_head(2).n_embd(32).block_size(224).dropout(0.1);
    config.data.train_examples(256).val_examples(16);
    config.optim.lr(3e-3).min_lr(3e-4).warmup_steps(1);
    config.train.max_steps(4).batch_size(4).log_every(100).out_dir(dir_.file("run")).device(DeviceChoice::cpu);
    config.eval.examples(0).before_training(false).loss_batches(1).batch_size(4).max_new_tokens(16);
    config.checkpoint.dir(dir_.file("base_checkpoints"));
    for (auto& assignment : overrides) core::apply_override(core::root_of(config), resolve(assignment));
    config.validate();
    Trainer trainer(config);
    trainer.fit();
    return model_archive(trainer.model());
  }

  testing::TempDir dir_;
};

TEST_F(ConfigEffect, EveryKeyOfTheReferenceIsListed) {
  RunConfig defaults;
  std::set<std::string> listed;
  for (const auto& c : key_cases()) {
    EXPECT_TRUE(listed.insert(c.key).second) << c.key << " listed twice";
    if (c.effect != Effect::changes) {
      EXPECT_STRNE(c.reason, "") << c.key << ": a key without effect needs a reason";
    }
  }
  for (const auto& [key, value] : core::key_values(core::root_of(defaults)))
    EXPECT_TRUE(listed.count(key)) << key << ": not listed (does it change training? add it to key_cases)";
  EXPECT_EQ(listed.size(), core::key_values(core::root_of(defaults)).size()) << "a listed key is not in the reference";
}

TEST_F(ConfigEffect, EveryKeyChangesTrainingOrCannot) {
  std::map<std::vector<std::string>, std::string> base_runs;  // context -> weights
  for (const auto& c : key_cases()) {
    if (c.effect == Effect::unchecked) continue;
    SCOPED_TRACE(std::string(c.key) + "=" + c.value);
    std::vector<std::string> changed = c.context;
    changed.push_back(std::string(c.key) + "=" + c.value);
    std::string weights;
    auto base = base_runs.find(c.context);
    try {
      if (base == base_runs.end()) base = base_runs.emplace(c.context, train(c.context)).first;
      weights = train(changed);
    } catch (const std::exception& e) {
      ADD_FAILURE() << c.key << ": the run failed: " << e.what();
      continue;
    }
    if (c.effect == Effect::changes) {
      EXPECT_TRUE(weights != base->second) << c.key << " had no effect on the weights";
    } else {
      EXPECT_TRUE(weights == base->second) << c.key << " changed the weights (" << c.reason << ")";
    }
  }
}

// A checkpoint stores each parameter group's AdamW options; the configuration of the resumed run
// decides them. Reference: an uninterrupted run with the resumed run's options from the checkpoint's
// step on is not needed: the resumed runs with beta2 0.95 and 0.5 must differ, and the one with the
// unchanged configuration must equal the uninterrupted run.
TEST_F(ConfigEffect, OptimizerKeysTakeEffectAfterAResume) {
  auto config_for = [&](const std::string& beta2) {
    RunConfig config;
    config.model.n_layer(1).n_head(2).n_embd(16).block_size(224);
    config.data.train_examples(128).val_examples(8);
    config.optim.lr(3e-3).min_lr(3e-4).warmup_steps(1).beta2(std::stod(beta2));
    config.train.max_steps(6).batch_size(2).out_dir(dir_.file("resume_run")).device(DeviceChoice::cpu);
    config.eval.examples(0).before_training(false).loss_batches(1);
    config.checkpoint.every(3).keep(5);
    return config;
  };
  Trainer uninterrupted(config_for("0.95"));
  uninterrupted.fit();
  const std::string reference = model_archive(uninterrupted.model());
  const Checkpoint at3 = CheckpointStore(dir_.file("resume_run/checkpoints")).load(3);
  Trainer same(config_for("0.95")), changed(config_for("0.5"));
  same.fit(at3);
  EXPECT_TRUE(model_archive(same.model()) == reference) << "the resumed run differs from the uninterrupted one";
  changed.fit(at3);
  EXPECT_TRUE(model_archive(changed.model()) != reference) << "optim.beta2 of the resumed run had no effect";
}

// The padding is part of the model: a checkpoint records it (config.yaml), and a model saved
// without it loads only with pad_vocab_to 1, which the error names.
TEST_F(ConfigEffect, VocabularyPaddingIsRecordedAndNamed) {
  RunConfig config;
  config.model.n_layer(1).n_head(2).n_embd(16).block_size(224).pad_vocab_to(1);
  config.data.train_examples(64).val_examples(8);
  config.train.max_steps(2).batch_size(2).out_dir(dir_.file("unpadded")).device(DeviceChoice::cpu);
  config.eval.examples(0).before_training(false).loss_batches(1);
  config.checkpoint.every(2);
  Trainer(config).fit();
  RunConfig padded = config;
  padded.model.pad_vocab_to(64);
  const Checkpoint at2 = CheckpointStore(dir_.file("unpadded/checkpoints")).load(2);
  try {
    check_resumable(at2, padded);
    ADD_FAILURE() << "resumed with another padding";
  } catch (const core::ConfigError& e) {
    EXPECT_EQ(e.key(), "model.pad_vocab_to");
  }
  padded.train.out_dir("");
  padded.checkpoint.every(0);
  Trainer fresh(padded);
  try {
    load_model(fresh.model(), dir_.file("unpadded/model.pt"));
    ADD_FAILURE() << "an unpadded model loaded into a padded one";
  } catch (const core::IOError& e) {
    EXPECT_NE(std::string(e.what()).find("'wte.weight' is 258x16 Float, the model expects 320x16 Float (saved without "
                                         "vocabulary padding: load it with --set model.pad_vocab_to=1)"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace scaletrain::train
