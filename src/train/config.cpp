#include "scaletrain/train/config.h"

#include "scaletrain/data/tokenizer.h"

namespace scaletrain::train {

void OptimizerOptions::visit(core::FieldVisitor& v) {
  v.field("lr", lr(), "peak learning rate", core::greater_than(0));
  v.field("min_lr", min_lr(), "learning rate at the end of the cosine decay", core::at_least(0));
  v.field("warmup_steps", warmup_steps(), "steps of linear warmup", core::at_least(0));
  v.field("weight_decay", weight_decay(), "AdamW decoupled weight decay", core::at_least(0));
  v.field("beta1", beta1(), "AdamW first-moment decay", core::half_open(0, 1));
  v.field("beta2", beta2(), "AdamW second-moment decay", core::half_open(0, 1));
  v.field("eps", eps(), "AdamW denominator epsilon", core::greater_than(0));
  v.field("grad_clip", grad_clip(), "largest global gradient norm (0: no clipping)", core::at_least(0));
  v.choice("fused", fused(), "auto (fused AdamW on CUDA, LibTorch's on the CPU), on or off");
  v.field("zero_stage", zero_stage(),
          "ZeRO: 0 off, 1 shards AdamW's state over the ranks (torchrun), 2 also the gradients, 3 also the "
          "parameters (gathered per block)", core::between(0, 3));
  v.field("cpu_offload", cpu_offload(), "zero_stage 1-3: AdamW's state in host memory, stepped by the CPU");
  v.field("offload_overlap", offload_overlap(),
          "cpu_offload: the CPU step overlaps the next forward (each block waits for its own parameters)");
  v.field("offload_fraction", offload_fraction(),
          "cpu_offload: the share of AdamW's state in host memory (the rest stays on the device)",
          core::open_closed(0, 1));
  v.field("bucket_mb", bucket_mb(), "zero_stage 1-3: gradient bucket size in MiB", core::greater_than(0));
}

void TrainerOptions::visit(core::FieldVisitor& v) {
  v.field("max_steps", max_steps(), "optimizer steps", core::at_least(1));
  v.field("batch_size", batch_size(), "sequences per micro-batch", core::between(1, 1 << 20));
  v.field("grad_accum_steps", grad_accum_steps(), "micro-batches accumulated per optimizer step", core::between(1, 4096));
  v.field("seed", seed(), "seed of initialisation and dropout", core::at_least(0));
  v.choice("device", device(), "auto (CUDA when available), cpu or cuda");
  v.field("threads", threads(), "CPU threads for torch (0: one per core)", core::between(0, 4096));
  v.field("log_every", log_every(), "steps between metric lines", core::at_least(1));
  v.field("out_dir", out_dir(), "folder for config, metrics, summary and model (\"\": none)");
  v.field("save_model", save_model(), "write out_dir/model.pt at the end");
  v.choice("cuda_graph", cuda_graph(), "auto (capture the step in a CUDA graph when the run allows it), on or off");
}

void EvalOptions::visit(core::FieldVisitor& v) {
  v.field("every", every(), "steps between validation-loss evaluations (0: only at the end)", core::at_least(0));
  v.field("loss_batches", loss_batches(), "validation batches for the loss", core::at_least(1));
  v.field("batch_size", batch_size(), "sequences per evaluation batch", core::at_least(1));
  v.field("examples", examples(), "held-out prompts decoded for exact match, BLEU-4, ROUGE-L (0: off)",
          core::at_least(0));
  v.field("max_new_tokens", max_new_tokens(), "longest generated answer", core::at_least(1));
  v.field("before_training", before_training(), "also evaluate the untrained model");
  v.field("show_samples", show_samples(), "decoded examples shown in the summary", core::at_least(0));
}

void CheckpointOptions::visit(core::FieldVisitor& v) {
  v.field("dir", dir(), "folder of the checkpoints (\"\": the folder checkpoints in train.out_dir)");
  v.field("every", every(), "optimizer steps between checkpoints (0: no checkpoints)", core::at_least(0));
  v.field("keep", keep(), "newest checkpoints kept, older ones are removed", core::at_least(1));
}

void RunConfig::visit(core::FieldVisitor& v) {
  v.section("model", model, "the GPT model");
  v.section("data", data, "training and validation data");
  v.section("optim", optim, "optimizer and learning-rate schedule");
  v.section("train", train, "the training loop");
  v.section("amp", amp, "mixed precision and loss scaling");
  v.section("eval", eval, "evaluation");
  v.section("checkpoint", checkpoint, "periodic checkpoints for --resume");
}

void RunConfig::validate() const {
  model.validate();
  data.validate();
  amp.validate();
  if (optim.min_lr() > optim.lr()) {
    throw core::ConfigError("optim.min_lr", "optim.min_lr: got " + core::format_number(optim.min_lr()) +
                                                ", expected at most optim.lr (" + core::format_number(optim.lr()) + ")");
  }
  if (data.source() != data::DataSource::bin && model.vocab_size() < data::ByteTokenizer::kVocabSize) {
    throw core::ConfigError("model.vocab_size",
                            "model.vocab_size: got " + std::to_string(model.vocab_size()) + ", expected at least " +
                                std::to_string(data::ByteTokenizer::kVocabSize) +
                                " for the byte tokenizer (data.source is " + core::enum_name(data.source()) + ")");
  }
  if (optim.zero_stage() == 0 && optim.cpu_offload())
    throw core::ConfigError("optim.cpu_offload", "optim.cpu_offload: got true with optim.zero_stage 0, expected "
                                                 "optim.zero_stage 1, 2 or 3 (the offload is ZeroAdamW's)");
  if (!optim.cpu_offload() && optim.offload_fraction() != 1.0)
    throw core::ConfigError("optim.offload_fraction", "optim.offload_fraction: got " +
                                                          core::format_number(optim.offload_fraction()) +
                                                          " with optim.cpu_offload false, expected optim.cpu_offload "
                                                          "true (the fraction is of the offloaded state)");
  if (optim.zero_stage() > 0 && optim.fused() == FusedChoice::on)
    throw core::ConfigError("optim.fused", "optim.fused: got on with optim.zero_stage " +
                                               std::to_string(optim.zero_stage()) +
                                               ", expected auto (ZeroAdamW steps with its own kernels)");
  if (checkpoint.every() > 0 && checkpoint_dir().empty()) {
    throw core::ConfigError("checkpoint.dir",
                            "checkpoint.dir: got \"\" with train.out_dir also \"\", expected a folder for the "
                            "checkpoints that checkpoint.every (" + std::to_string(checkpoint.every()) + ") asks for");
  }
}

std::string RunConfig::checkpoint_dir() const {
  if (!checkpoint.dir().empty()) return checkpoint.dir();
  return train.out_dir().empty() ? std::string() : train.out_dir() + "/checkpoints";
}

std::string RunConfig::to_yaml() { return core::to_yaml(core::root_of(*this)); }

RunConfig RunConfig::load(const std::string& path, const std::vector<std::string>& overrides) {
  RunConfig config;
  auto root = core::root_of(config);
  if (!path.empty()) core::apply_yaml_file(root, path);
  for (const auto& assignment : overrides) core::apply_override(root, assignment);
  config.validate();
  return config;
}

}  // namespace scaletrain::train
