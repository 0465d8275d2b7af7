#pragma once
// Options of the GPT model (YAML section `model`).
#include <array>
#include <cstdint>
#include <utility>

#include <torch/arg.h>

#include "scaletrain/core/config.h"

namespace scaletrain::model {

// Which attention implementation the model calls. `math` is the reference (explicit softmax in
// fp32); `sdpa` is torch's scaled_dot_product_attention; `flash` is scaletrain's flash attention
// (attention/flash_attention.h: CPU tensors in this build, no attention dropout; a padding mask,
// as batched generation passes, takes the math path).
enum class AttentionBackend { math, sdpa, flash };

struct GPTOptions {
  // Vocabulary size: 258 for the byte tokenizer (256 bytes, end of sequence, padding).
  TORCH_ARG(int64_t, vocab_size) = 258;
  // The embedding and output layer get padded_vocab_size() rows, vocab_size rounded up to a
  // multiple of this (64, as nanoGPT and llm.c: 50257 rows make GPT-2's output GEMMs slow, 50304
  // do not). The padding rows never reach the loss or a generated token: the logits are the first
  // vocab_size columns. 1: no padding.
  TORCH_ARG(int64_t, pad_vocab_to) = 64;
  // Longest sequence the model accepts; rotary tables are precomputed for it.
  TORCH_ARG(int64_t, block_size) = 256;
  TORCH_ARG(int64_t, n_layer) = 4;
  TORCH_ARG(int64_t, n_head) = 4;
  TORCH_ARG(int64_t, n_embd) = 128;
  TORCH_ARG(double, dropout) = 0.0;
  // Biases in linear layers and LayerNorm.
  TORCH_ARG(bool, bias) = true;
  // Share the token embedding with the output projection.
  TORCH_ARG(bool, tie_embeddings) = true;
  TORCH_ARG(AttentionBackend, attention) = AttentionBackend::sdpa;
  // Base of the rotary position encoding frequencies.
  TORCH_ARG(double, rope_base) = 10000.0;
  // Recompute each block's activations in backward instead of storing them (activation_checkpoint.h):
  // in training with grad enabled and no KV cache, memory for activations drops to one tensor per block
  // at the price of about one more forward pass.
  TORCH_ARG(bool, activation_checkpointing) = false;
  // The fused kernels of model/fused_ops.h: RoPE on the qkv projection (rope_qkv) and
  // cross-entropy over the padded low-precision logits (cross_entropy). false: the unfused ATen
  // expressions they replace (the reference; the same arithmetic, more passes and memory).
  TORCH_ARG(bool, fused_ops) = true;
  // forward_loss computes the output layer and the cross-entropy this many rows (tokens) at a
  // time, gradients included (linear_cross_entropy in model/fused_ops.h): the logits of the whole
  // batch (rows x padded vocabulary) are never held. 0: the whole batch at once.
  TORCH_ARG(int64_t, loss_chunk_rows) = 0;

 public:  // TORCH_ARG leaves the section private
  int64_t head_dim() const { return n_embd_ / n_head_; }
  int64_t padded_vocab_size() const { return (vocab_size_ + pad_vocab_to_ - 1) / pad_vocab_to_ * pad_vocab_to_; }
  void visit(core::FieldVisitor& v);
  // Cross-field checks (n_embd divisible by n_head, even head size); throws ConfigError.
  void validate() const;
};

}  // namespace scaletrain::model

template <>
struct scaletrain::core::EnumNames<scaletrain::model::AttentionBackend> {
  static constexpr std::array<std::pair<scaletrain::model::AttentionBackend, const char*>, 3> values =
      {{{scaletrain::model::AttentionBackend::math, "math"},
        {scaletrain::model::AttentionBackend::sdpa, "sdpa"},
        {scaletrain::model::AttentionBackend::flash, "flash"}}};
};
