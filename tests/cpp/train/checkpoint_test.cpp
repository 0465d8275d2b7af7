// Checkpoints. References: the bytes handed to the store (read back with std::ifstream), the CRC-32
// check value of "123456789" (0xcbf43926), files damaged by hand (truncated, one bit flipped); for
// resume, the uninterrupted run of the same configuration, compared bit for bit (at::equal) on
// every parameter and every AdamW state tensor, and byte for byte on trainer.json (progress
// counters and RNG states).
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>
#include <nlohmann/json.hpp>

#include "scaletrain/core/error.h"
#include "scaletrain/core/fs.h"
#include "scaletrain/optim/adamw.h"
#include "scaletrain/train/checkpoint.h"
#include "scaletrain/train/train_state.h"
#include "scaletrain/train/trainer.h"
#include "test_util.h"

namespace scaletrain::train {
namespace {

using Files = std::vector<std::pair<std::string, std::string>>;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void overwrite(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
}

Files sample_files(char fill) {
  std::string binary(3000, fill);
  binary[17] = '\0';
  return {{"model.pt", binary}, {"trainer.json", "{\"step\": 1}\n"}, {"empty.bin", ""}};
}

// The IOError message of reading `path`, or "" when it reads fine.
std::string read_error(const std::string& path) {
  try {
    CheckpointStore::read(path);
    return "";
  } catch (const core::IOError& e) {
    return e.what();
  }
}

TEST(Checkpoint, Crc32IsZlibs) {
  EXPECT_EQ(crc32_of("123456789"), 0xcbf43926u);
  EXPECT_EQ(crc32_of(""), 0u);
}

TEST(Checkpoint, RoundTripWithManifest) {
  testing::TempDir dir;
  CheckpointStore store(dir.file("ckpt"));
  const Files files = sample_files('x');
  const std::string path = store.save(40, files);
  EXPECT_EQ(path, dir.file("ckpt/step_00000040"));
  EXPECT_EQ(store.list(), std::vector<int64_t>{40});
  for (const auto& [name, contents] : files) EXPECT_EQ(slurp(path + "/" + name), contents) << name;
  // Only the files and the manifest: no temporary names left behind.
  EXPECT_EQ(core::list_directory(path),
            (std::vector<std::string>{"empty.bin", "manifest.json", "model.pt", "trainer.json"}));
  EXPECT_EQ(core::list_directory(dir.file("ckpt")), std::vector<std::string>{"step_00000040"});

  auto manifest = nlohmann::json::parse(slurp(path + "/manifest.json"));
  EXPECT_EQ(manifest["format"], "scaletrain-checkpoint");
  EXPECT_EQ(manifest["version"], 1);
  EXPECT_EQ(manifest["step"], 40);
  EXPECT_TRUE(manifest["created"].is_string());
  ASSERT_EQ(manifest["files"].size(), 3u);
  EXPECT_EQ(manifest["files"][0]["name"], "model.pt");
  EXPECT_EQ(manifest["files"][0]["size"], 3000);
  EXPECT_EQ(manifest["files"][0]["crc32"], fmt::format("{:08x}", crc32_of(files[0].second)));

  Checkpoint loaded = store.load(40);
  EXPECT_EQ(loaded.step, 40);
  EXPECT_EQ(loaded.path, path);
  ASSERT_EQ(loaded.files.size(), 3u);
  for (const auto& [name, contents] : files) EXPECT_EQ(loaded.file(name), contents) << name;
  EXPECT_THROW(loaded.file("optimizer.pt"), core::IOError);

  // Saving the same step again replaces it.
  store.save(40, sample_files('y'));
  EXPECT_EQ(store.load(40).file("model.pt"), sample_files('y')[0].second);
  EXPECT_EQ(store.list(), std::vector<int64_t>{40});
}

TEST(Checkpoint, RejectsBadFileNames) {
  testing::TempDir dir;
  CheckpointStore store(dir.path());
  EXPECT_THROW(store.save(1, {{"manifest.json", "x"}}), std::invalid_argument);
  EXPECT_THROW(store.save(1, {{"a/b", "x"}}), std::invalid_argument);
  EXPECT_THROW(store.save(1, {{".hidden", "x"}}), std::invalid_argument);
  EXPECT_THROW(store.save(1, {{"a", "x"}, {"a", "y"}}), std::invalid_argument);
  EXPECT_TRUE(store.list().empty());
}

TEST(Checkpoint, TruncatedFileIsNamed) {
  testing::TempDir dir;
  CheckpointStore store(dir.path());
  const std::string path = store.save(8, sample_files('x'));
  overwrite(path + "/model.pt", sample_files('x')[0].second.substr(0, 1234));
  EXPECT_EQ(read_error(path), "checkpoint '" + path + "': model.pt is 1234 bytes, the manifest says 3000 (truncated?)");
}

TEST(Checkpoint, OneFlippedBitIsNamed) {
  testing::TempDir dir;
  CheckpointStore store(dir.path());
  const std::string path = store.save(8, sample_files('x'));
  for (size_t byte : {0u, 17u, 1500u, 2999u}) {
    for (int bit : {0, 7}) {
      std::string damaged = sample_files('x')[0].second;
      damaged[byte] = static_cast<char>(damaged[byte] ^ (1 << bit));
      overwrite(path + "/model.pt", damaged);
      const std::string error = read_error(path);
      EXPECT_NE(error.find("checkpoint '" + path + "': model.pt: checksum mismatch (corrupt)"), std::string::npos)
          << "byte " << byte << " bit " << bit << ": " << error;
    }
  }
}

TEST(Checkpoint, ManifestIsChecked) {
  testing::TempDir dir;
  CheckpointStore store(dir.path());
  const std::string path = store.save(8, sample_files('x'));
  const std::string manifest = slurp(path + "/manifest.json");

  // Every single-bit flip anywhere in the manifest is caught (invalid JSON, or its own checksum).
  for (size_t byte = 0; byte < manifest.size(); byte += 7) {
    std::string damaged = manifest;
    damaged[byte] = static_cast<char>(damaged[byte] ^ 0x04);
    overwrite(path + "/manifest.json", damaged);
    EXPECT_NE(read_error(path), "") << "byte " << byte;
  }
  // An edited step: the manifest's own checksum.
  std::string edited = manifest;
  edited.replace(edited.find("\"step\": 8"), 9, "\"step\": 9");
  overwrite(path + "/manifest.json", edited);
  EXPECT_NE(read_error(path).find("manifest.json: checksum mismatch (corrupt)"), std::string::npos) << read_error(path);
  // Another format version.
  auto newer = nlohmann::ordered_json::parse(manifest);
  newer["version"] = 2;
  newer.erase("manifest_crc32");
  newer["manifest_crc32"] = fmt::format("{:08x}", crc32_of(newer.dump()));
  overwrite(path + "/manifest.json", newer.dump(2));
  EXPECT_NE(read_error(path).find("manifest.json has format version 2, this build of scaletrain reads version 1"),
            std::string::npos)
      << read_error(path);
  // No manifest: the writing never finished, or not a checkpoint at all.
  overwrite(path + "/manifest.json", manifest);
  EXPECT_EQ(read_error(path), "");
  ::unlink((path + "/manifest.json").c_str());
  EXPECT_NE(read_error(path).find("no manifest.json"), std::string::npos);
  // A listed file that is gone.
  const std::string other = store.save(9, sample_files('x'));
  ::unlink((other + "/trainer.json").c_str());
  EXPECT_EQ(read_error(other), "checkpoint '" + other + "': trainer.json is missing (the manifest lists it)");
  EXPECT_NE(read_error(dir.file("nowhere")).find("no such checkpoint folder"), std::string::npos);
  // The folder of checkpoints instead of one of them.
  EXPECT_EQ(read_error(dir.path()), "checkpoint '" + dir.path() +
                                        "': no manifest.json: this is a folder of checkpoints, "
                                        "expected one of them ('" +
                                        other + "') or --resume auto");
}

TEST(Checkpoint, LatestValidSkipsCorruptNewest) {
  testing::TempDir dir;
  CheckpointStore store(dir.path());
  EXPECT_FALSE(store.latest_valid().has_value());  // empty folder
  EXPECT_FALSE(CheckpointStore(dir.file("absent")).latest_valid().has_value());
  for (int64_t step : {3, 6, 9, 12}) store.save(step, sample_files('x'));
  EXPECT_EQ(store.list(), (std::vector<int64_t>{12, 9, 6, 3}));
  overwrite(dir.file("step_00000012/model.pt"), "short");
  ::unlink(dir.file("step_00000009/manifest.json").c_str());
  auto latest = store.latest_valid();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->step, 6);
  EXPECT_EQ(latest->file("model.pt"), sample_files('x')[0].second);
}

TEST(Checkpoint, LeftoverTemporaryFolderIsIgnoredThenRemoved) {
  testing::TempDir dir;
  CheckpointStore store(dir.path());
  store.save(4, sample_files('x'));
  // What a crash during the writing of step 8 leaves: a half-filled temporary folder.
  core::create_directories(dir.file(".tmp-step_00000008-12345"));
  overwrite(dir.file(".tmp-step_00000008-12345/model.pt"), "half");
  EXPECT_EQ(store.list(), std::vector<int64_t>{4});
  EXPECT_EQ(store.latest_valid()->step, 4);
  store.save(8, sample_files('y'));
  EXPECT_EQ(core::list_directory(dir.path()), (std::vector<std::string>{"step_00000004", "step_00000008"}));
  EXPECT_EQ(store.latest_valid()->step, 8);
}

TEST(Checkpoint, PruneKeepsTheNewest) {
  testing::TempDir dir;
  CheckpointStore store(dir.path());
  for (int64_t step = 1; step <= 5; ++step) store.save(step * 10, sample_files('x'));
  store.prune(2);
  EXPECT_EQ(store.list(), (std::vector<int64_t>{50, 40}));
  store.prune(1, /*also_keep=*/40);  // a resumed run keeps the checkpoint it just wrote
  EXPECT_EQ(store.list(), (std::vector<int64_t>{50, 40}));
  store.prune(1);
  EXPECT_EQ(store.list(), std::vector<int64_t>{50});
  EXPECT_EQ(core::list_directory(dir.path()), std::vector<std::string>{"step_00000050"});
}

// ---------------------------------------------------------------------------------------------
// Resume: bit-identical to the uninterrupted run.

// One CPU thread for the resume tests (stable timings on a busy machine); the process-wide
// setting is put back afterwards for the other tests.
class Resume : public ::testing::Test {
 protected:
  void TearDown() override { at::set_num_threads(threads_); }

 private:
  int threads_ = at::get_num_threads();
};

RunConfig resumable(const std::string& out_dir) {
  RunConfig c;
  c.model.n_layer(2).n_head(2).n_embd(32).block_size(224).dropout(0.1);  // dropout: the RNG state matters
  c.data.train_examples(512).val_examples(16);
  c.optim.lr(3e-3).min_lr(3e-4).warmup_steps(5);
  c.train.max_steps(12).batch_size(8).log_every(3).out_dir(out_dir).device(DeviceChoice::cpu).threads(1);
  c.eval.examples(0).loss_batches(1).batch_size(8).before_training(false);
  c.checkpoint.every(4).keep(10);
  return c;
}

std::vector<at::Tensor> weights(model::GPT& m) {
  std::vector<at::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().clone());
  return out;
}

// The AdamW state a checkpoint holds, restored into a fresh optimizer over a fresh model (same
// groups as the trainer's): per parameter its step count, exp_avg and exp_avg_sq.
struct OptimizerTensors {
  std::vector<int64_t> steps;
  std::vector<at::Tensor> tensors;
};
OptimizerTensors optimizer_state(const RunConfig& config, const Checkpoint& checkpoint) {
  Trainer fresh(config);
  auto& m = fresh.model();
  std::vector<at::Tensor> decay, no_decay;
  for (const auto& p : m->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>());
  groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>());
  const bool fused = uses_fused_adamw(config.optim.fused(), fresh.device());
  std::unique_ptr<torch::optim::Optimizer> adamw;
  if (fused) adamw = std::make_unique<optim::AdamW>(groups, torch::optim::AdamWOptions());
  else adamw = std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions());
  TrainState(m, *adamw).restore(checkpoint);
  OptimizerTensors out;
  for (const auto& group : adamw->param_groups()) {
    for (const auto& p : group.params()) {
      auto& state = *adamw->state().at(p.unsafeGetTensorImpl());
      if (fused) {
        auto& s = dynamic_cast<optim::AdamWParamState&>(state);
        out.steps.push_back(static_cast<int64_t>(s.step().item<float>()));
        out.tensors.push_back(s.exp_avg());
        out.tensors.push_back(s.exp_avg_sq());
      } else {
        auto& s = dynamic_cast<torch::optim::AdamWParamState&>(state);
        out.steps.push_back(s.step());
        out.tensors.push_back(s.exp_avg());
        out.tensors.push_back(s.exp_avg_sq());
      }
    }
  }
  return out;
}

std::vector<nlohmann::json> metric_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// Trains the uninterrupted reference, then a second Trainer from the checkpoint of `resume_step`
// into the same run folder, and compares the two bit for bit.
void expect_bit_exact_resume(const RunConfig& config, int64_t resume_step) {
  const std::string dir = config.checkpoint_dir();
  Trainer uninterrupted(config);
  uninterrupted.fit();
  auto reference_weights = weights(uninterrupted.model());
  const Checkpoint reference_end = CheckpointStore(dir).load(12);  // in memory: the resumed run rewrites it

  Trainer resumed(config);
  auto summary = resumed.fit(CheckpointStore(dir).load(resume_step));
  EXPECT_EQ(summary.steps, 12);
  EXPECT_FALSE(summary.before.has_value());
  auto resumed_weights = weights(resumed.model());
  ASSERT_EQ(resumed_weights.size(), reference_weights.size());
  for (size_t i = 0; i < resumed_weights.size(); ++i)
    EXPECT_TRUE(at::equal(resumed_weights[i], reference_weights[i])) << "parameter " << i;

  const Checkpoint resumed_end = CheckpointStore(dir).load(12);
  // Progress counters, the open logging interval and the RNG states after the last step.
  EXPECT_EQ(resumed_end.file("trainer.json"), reference_end.file("trainer.json"));
  EXPECT_EQ(resumed_end.file("model.pt"), reference_end.file("model.pt"));
  auto a = optimizer_state(config, reference_end), b = optimizer_state(config, resumed_end);
  EXPECT_EQ(a.steps, b.steps);
  // AdamW counts the steps it took: all 12 but those skipped for inf/NaN gradients.
  const auto skipped = nlohmann::json::parse(reference_end.file("trainer.json"))["components"]["amp"]["skipped_steps"];
  EXPECT_EQ(a.steps.front(), 12 - skipped.get<int64_t>());
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) EXPECT_TRUE(at::equal(a.tensors[i], b.tensors[i])) << "state " << i;
}

TEST_F(Resume, BitExactWithDropout) {
  testing::TempDir dir;
  RunConfig config = resumable(dir.file("run"));
  expect_bit_exact_resume(config, 8);

  // metrics.jsonl: the resumed run appended a resume record, then the same lines again; the
  // line at step 9 closes an interval that the checkpoint at step 8 cut, and still matches.
  auto lines = metric_lines(dir.file("run/metrics.jsonl"));
  std::vector<std::string> kinds;
  std::vector<double> losses_at_9;
  for (const auto& j : lines) {
    kinds.push_back(j["kind"].get<std::string>() + "@" + std::to_string(j["step"].get<int64_t>()));
    if (j["kind"] == "train" && j["step"] == 9) losses_at_9.push_back(j["loss"].get<double>());
  }
  EXPECT_EQ(kinds, (std::vector<std::string>{"train@3", "train@6", "train@9", "train@12", "eval@12", "resume@8",
                                             "train@9", "train@12", "eval@12"}));
  ASSERT_EQ(losses_at_9.size(), 2u);
  EXPECT_EQ(losses_at_9[0], losses_at_9[1]);
  EXPECT_EQ(CheckpointStore(dir.file("run/checkpoints")).list(), (std::vector<int64_t>{12, 8, 4}));
}

TEST_F(Resume, BitExactWithAccumulation) {
  testing::TempDir dir;
  RunConfig config = resumable(dir.file("run"));
  config.train.grad_accum_steps(2).batch_size(4);
  expect_bit_exact_resume(config, 4);
}

TEST_F(Resume, BitExactWithFp16LossScaling) {
  // A first scale far too high: the early steps overflow and are skipped while the scale backs
  // off, so the checkpoint at step 4 must carry the scaler's state and the skip count.
  testing::TempDir dir;
  RunConfig config = resumable(dir.file("run"));
  config.amp.precision(amp::Precision::fp16).emulated_fp16(true);
  config.amp.scaler().init_scale(1048576.0).growth_interval(3);
  expect_bit_exact_resume(config, 4);
  const auto trainer_json = nlohmann::json::parse(CheckpointStore(dir.file("run/checkpoints")).load(12).file("trainer.json"));
  const auto& amp_state = trainer_json["components"]["amp"];
  EXPECT_GT(amp_state["skipped_steps"].get<int64_t>(), 0);
  EXPECT_LT(amp_state["loss_scaler"]["scale"].get<double>(), 1048576.0);
}

// The fused AdamW (step counts on the device, no host read of the skip decision): fp32, and fp16
// loss scaling with overflowing first steps.
TEST_F(Resume, BitExactWithFusedAdamW) {
  testing::TempDir dir;
  RunConfig config = resumable(dir.file("run"));
  config.optim.fused(FusedChoice::on);
  expect_bit_exact_resume(config, 4);
  RunConfig fp16 = resumable(dir.file("fp16"));
  fp16.optim.fused(FusedChoice::on);
  fp16.amp.precision(amp::Precision::fp16).emulated_fp16(true);
  fp16.amp.scaler().init_scale(1048576.0).growth_interval(3);
  expect_bit_exact_resume(fp16, 8);
}

// On the GPU: dropout draws from the CUDA generator, whose state the checkpoint must restore.
TEST_F(Resume, BitExactOnCudaWithDropout) {
  SCALETRAIN_REQUIRE_CUDA();
  testing::TempDir dir;
  RunConfig config = resumable(dir.file("run"));
  config.train.device(DeviceChoice::cuda);
  expect_bit_exact_resume(config, 8);
  RunConfig master = resumable(dir.file("master"));
  master.train.device(DeviceChoice::cuda).grad_accum_steps(2).batch_size(4);
  master.amp.precision(amp::Precision::bf16).low_precision_params(true);
  expect_bit_exact_resume(master, 4);
}

TEST_F(Resume, BitExactWithBf16ParametersAndMasterWeights) {
  testing::TempDir dir;
  RunConfig config = resumable(dir.file("run"));
  config.amp.precision(amp::Precision::bf16).low_precision_params(true);
  Trainer uninterrupted(config);
  uninterrupted.fit();
  const std::string master_at_12 = CheckpointStore(dir.file("run/checkpoints")).load(12).file("tensors.pt");
  Trainer resumed(config);
  resumed.fit(CheckpointStore(dir.file("run/checkpoints")).load(8));
  // The fp32 master weights (tensors.pt) and the bf16 model both continue bit for bit.
  EXPECT_EQ(CheckpointStore(dir.file("run/checkpoints")).load(12).file("tensors.pt"), master_at_12);
  auto a = weights(uninterrupted.model()), b = weights(resumed.model());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << "parameter " << i;
  EXPECT_EQ(a.front().scalar_type(), at::kBFloat16);
}

TEST_F(Resume, KeepsTheNewestAndCheckpointsTheLastStep) {
  testing::TempDir dir;
  RunConfig config = resumable("");
  config.train.max_steps(7);
  config.checkpoint.dir(dir.file("ckpt")).every(2).keep(2);
  Trainer(config).fit();
  EXPECT_EQ(CheckpointStore(dir.file("ckpt")).list(), (std::vector<int64_t>{7, 6}));
  auto trainer_json = nlohmann::json::parse(CheckpointStore(dir.file("ckpt")).load(7).file("trainer.json"));
  EXPECT_EQ(trainer_json["step"], 7);
  EXPECT_EQ(trainer_json["micro_step"], 0);
  EXPECT_EQ(trainer_json["next_batch"], 7);
  EXPECT_EQ(trainer_json["batch_size"], 8);
  EXPECT_GT(trainer_json["tokens"].get<int64_t>(), 0);
  EXPECT_TRUE(trainer_json["rng"]["cpu"].is_string());
  EXPECT_TRUE(trainer_json["components"].is_object());
}

TEST_F(Resume, ConfigMustMatchWhereItCounts) {
  testing::TempDir dir;
  RunConfig config = resumable("");
  config.train.max_steps(4);
  config.checkpoint.dir(dir.file("ckpt"));
  Trainer(config).fit();
  const Checkpoint checkpoint = CheckpointStore(dir.file("ckpt")).load(4);

  RunConfig deeper = config;
  deeper.model.n_layer(4);
  try {
    check_resumable(checkpoint, deeper);
    FAIL() << "no error";
  } catch (const core::ConfigError& e) {
    EXPECT_EQ(e.key(), "model.n_layer");
    EXPECT_NE(std::string(e.what()).find("checkpoint '" + checkpoint.path +
                                         "' was trained with model.n_layer=2, the config says 4"),
              std::string::npos)
        << e.what();
  }
  RunConfig other_batch = config;
  other_batch.train.batch_size(4);
  EXPECT_THROW(check_resumable(checkpoint, other_batch), core::ConfigError);
  RunConfig shorter = config;
  shorter.train.max_steps(3);
  EXPECT_THROW(check_resumable(checkpoint, shorter), core::ConfigError);

  // Training longer, with other evaluation and logging settings, continues the run.
  RunConfig longer = config;
  longer.train.max_steps(6).log_every(2);
  longer.eval.loss_batches(2);
  longer.optim.lr(1e-3).min_lr(1e-4);
  check_resumable(checkpoint, longer);
  EXPECT_EQ(Trainer(longer).fit(checkpoint).steps, 6);
  EXPECT_EQ(CheckpointStore(dir.file("ckpt")).list().front(), 6);
}

TEST_F(Resume, FindResumeCheckpoint) {
  testing::TempDir dir;
  RunConfig config = resumable(dir.file("run"));
  EXPECT_FALSE(find_resume_checkpoint(config, "none").has_value());
  EXPECT_FALSE(find_resume_checkpoint(config, "auto").has_value());  // nothing there yet
  CheckpointStore store(dir.file("run/checkpoints"));
  store.save(3, sample_files('x'));
  store.save(6, sample_files('x'));
  overwrite(dir.file("run/checkpoints/step_00000006/trainer.json"), "{}");
  EXPECT_EQ(find_resume_checkpoint(config, "auto")->step, 3);
  EXPECT_EQ(find_resume_checkpoint(config, store.path_of(3))->step, 3);
  EXPECT_THROW(find_resume_checkpoint(config, store.path_of(6)), core::IOError);
  config.train.out_dir("");
  config.checkpoint.every(0);
  EXPECT_THROW(find_resume_checkpoint(config, "auto"), core::UsageError);
}

TEST_F(Resume, CheckpointDirNeedsAFolder) {
  RunConfig config = resumable("");
  try {
    config.validate();
    FAIL() << "no error";
  } catch (const core::ConfigError& e) {
    EXPECT_EQ(e.key(), "checkpoint.dir");
  }
  config.checkpoint.every(0);
  config.validate();
}

}  // namespace
}  // namespace scaletrain::train
