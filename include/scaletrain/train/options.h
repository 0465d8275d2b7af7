#pragma once
// Options of the optimizer and schedule (`optim`), the training loop (`train`), evaluation
// (`eval`) and checkpoints (`checkpoint`).
#include <array>
#include <cstdint>
#include <string>
#include <utility>

#include <torch/arg.h>

#include "scaletrain/core/config.h"

namespace scaletrain::train {

enum class DeviceChoice { automatic, cpu, cuda };
// Which AdamW steps the parameters: scaletrain's fused one (optim/adamw.h), or LibTorch's
// torch::optim::AdamW (separate ATen ops per parameter). auto: fused on CUDA, LibTorch's on the
// CPU (where an fp32 run is then bit for bit a plain LibTorch loop).
enum class FusedChoice { automatic, on, off };
// Whether the training step is captured once in a CUDA graph and replayed (step_graph.h). auto:
// when the run allows it (CUDA, fused AdamW, no dropout, no activation checkpointing, batches of
// one shape; with gradient accumulation the graph holds all of a step's micro-batches); on: the
// same, and an error naming what stands in the way; off: every step launched from the host.
enum class GraphChoice { automatic, on, off };

// AdamW with linear warmup and cosine decay to min_lr, and global gradient-norm clipping.
struct OptimizerOptions {
  TORCH_ARG(double, lr) = 3e-4;
  TORCH_ARG(double, min_lr) = 3e-5;
  TORCH_ARG(int64_t, warmup_steps) = 100;
  // Decoupled weight decay on matrices and embeddings (not on biases and LayerNorm).
  TORCH_ARG(double, weight_decay) = 0.1;
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.95;
  TORCH_ARG(double, eps) = 1e-8;
  // Largest global L2 norm of the gradients; 0 turns clipping off.
  TORCH_ARG(double, grad_clip) = 1.0;
  TORCH_ARG(FusedChoice, fused) = FusedChoice::automatic;
  // ZeRO (optim/zero_adamw.h): 0 steps with the AdamW above; 1 shards AdamW's state over the ranks
  // of a torchrun launch (or keeps it whole in one process), 2 also the gradients, 3 also the parameters (gathered block by block). A launch of
  // several ranks (WORLD_SIZE > 1) needs 1, 2 or 3.
  TORCH_ARG(int64_t, zero_stage) = 0;
  // zero_stage 1-3: AdamW's state in host memory, stepped there by the CPU AdamW.
  TORCH_ARG(bool, cpu_offload) = false;
  // cpu_offload: the CPU step of the buckets overlaps the next forward, each part of the model
  // waiting for its own parameters (the same numbers as waiting for the whole step).
  TORCH_ARG(bool, offload_overlap) = true;
  // cpu_offload: the share of AdamW's state in host memory, in (0, 1]; the rest (the parameters
  // the forward needs first) stays on the device and is stepped there.
  TORCH_ARG(double, offload_fraction) = 1.0;
  // zero_stage 1-3: gradient bucket size in MiB, the unit of reduce-scatter and all-gather.
  TORCH_ARG(double, bucket_mb) = 25.0;

 public:  // TORCH_ARG leaves the section private
  void visit(core::FieldVisitor& v);
};

struct TrainerOptions {
  TORCH_ARG(int64_t, max_steps) = 1000;
  // Sequences per micro-batch; an optimizer step sees batch_size x grad_accum_steps sequences.
  TORCH_ARG(int64_t, batch_size) = 32;
  // Micro-batches accumulated per optimizer step (loss normalised by the step's target tokens).
  TORCH_ARG(int64_t, grad_accum_steps) = 1;
  // Seeds weight initialisation and dropout.
  TORCH_ARG(int64_t, seed) = 0;
  TORCH_ARG(DeviceChoice, device) = DeviceChoice::automatic;
  // CPU threads for torch; 0 keeps torch's default (one per core).
  TORCH_ARG(int64_t, threads) = 0;
  // Steps between metric lines.
  TORCH_ARG(int64_t, log_every) = 50;
  // Where config.yaml, metrics.jsonl, summary.json and model.pt go; "" writes nothing.
  TORCH_ARG(std::string, out_dir) = "runs/default";
  TORCH_ARG(bool, save_model) = true;
  TORCH_ARG(GraphChoice, cuda_graph) = GraphChoice::automatic;

 public:  // TORCH_ARG leaves the section private
  void visit(core::FieldVisitor& v);
};

struct EvalOptions {
  // Steps between validation-loss evaluations; 0: only at the end.
  TORCH_ARG(int64_t, every) = 0;
  // Validation batches for the loss.
  TORCH_ARG(int64_t, loss_batches) = 8;
  TORCH_ARG(int64_t, batch_size) = 64;
  // Held-out prompts decoded greedily for exact match, BLEU-4 and ROUGE-L; 0 turns it off.
  TORCH_ARG(int64_t, examples) = 200;
  TORCH_ARG(int64_t, max_new_tokens) = 96;
  // Also evaluate the untrained model, to show what training changed.
  TORCH_ARG(bool, before_training) = true;
  // Decoded examples printed in the summary.
  TORCH_ARG(int64_t, show_samples) = 3;

 public:  // TORCH_ARG leaves the section private
  void visit(core::FieldVisitor& v);
};

// Periodic checkpoints of the whole training state, for `scaletrain train --resume` (see
// checkpoint.h and docs/checkpointing.md).
struct CheckpointOptions {
  // Folder of the checkpoints; "" means <train.out_dir>/checkpoints.
  TORCH_ARG(std::string, dir) = "";
  // Optimizer steps between checkpoints; 0 turns checkpoints off. With checkpoints on, the last
  // step is checkpointed too.
  TORCH_ARG(int64_t, every) = 0;
  // Newest checkpoints kept; older ones are removed after each save.
  TORCH_ARG(int64_t, keep) = 3;

 public:  // TORCH_ARG leaves the section private
  void visit(core::FieldVisitor& v);
};

}  // namespace scaletrain::train

template <>
struct scaletrain::core::EnumNames<scaletrain::train::FusedChoice> {
  static constexpr std::array<std::pair<scaletrain::train::FusedChoice, const char*>, 3> values = {
      {{scaletrain::train::FusedChoice::automatic, "auto"},
       {scaletrain::train::FusedChoice::on, "on"},
       {scaletrain::train::FusedChoice::off, "off"}}};
};

template <>
struct scaletrain::core::EnumNames<scaletrain::train::GraphChoice> {
  static constexpr std::array<std::pair<scaletrain::train::GraphChoice, const char*>, 3> values = {
      {{scaletrain::train::GraphChoice::automatic, "auto"},
       {scaletrain::train::GraphChoice::on, "on"},
       {scaletrain::train::GraphChoice::off, "off"}}};
};

template <>
struct scaletrain::core::EnumNames<scaletrain::train::DeviceChoice> {
  static constexpr std::array<std::pair<scaletrain::train::DeviceChoice, const char*>, 3> values = {
      {{scaletrain::train::DeviceChoice::automatic, "auto"},
       {scaletrain::train::DeviceChoice::cpu, "cpu"},
       {scaletrain::train::DeviceChoice::cuda, "cuda"}}};
};
