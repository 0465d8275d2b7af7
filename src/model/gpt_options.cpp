#include "scaletrain/model/gpt_options.h"

#include <string>

namespace scaletrain::model {

void GPTOptions::visit(core::FieldVisitor& v) {
  v.field("vocab_size", vocab_size(), "vocabulary size (258 for the byte tokenizer)", core::at_least(2));
  v.field("pad_vocab_to", pad_vocab_to(),
          "embedding and output rows padded to a multiple of this (faster GEMMs; never in the loss; 1: none)",
          core::between(1, 1 << 16));
  v.field("block_size", block_size(), "longest sequence in tokens", core::between(2, 1 << 20));
  v.field("n_layer", n_layer(), "number of transformer blocks", core::between(1, 1024));
  v.field("n_head", n_head(), "attention heads per block", core::between(1, 1024));
  v.field("n_embd", n_embd(), "width of the residual stream", core::between(2, 1 << 16));
  v.field("dropout", dropout(), "dropout probability (embeddings, attention, residual)",
          core::half_open(0, 1));
  v.field("bias", bias(), "biases in linear layers and LayerNorm");
  v.field("tie_embeddings", tie_embeddings(), "share the token embedding with the output layer");
  v.choice("attention", attention(), "attention implementation");
  v.field("rope_base", rope_base(), "base of the rotary position encoding", core::greater_than(1));
  v.field("activation_checkpointing", activation_checkpointing(),
          "recompute each block's activations in backward (less memory, ~1/3 more compute)");
  v.field("fused_ops", fused_ops(),
          "fused RoPE and cross-entropy kernels (false: the unfused reference expressions)");
  v.field("loss_chunk_rows", loss_chunk_rows(),
          "output layer and loss this many tokens at a time, never holding the whole batch's logits "
          "(0: all at once; needs fused_ops)",
          core::between(0, 1 << 30));
}

void GPTOptions::validate() const {
  if (n_embd() % n_head() != 0) {
    throw core::ConfigError("model.n_head", "model.n_head: got " + std::to_string(n_head()) +
                                                ", expected a divisor of model.n_embd (" +
                                                std::to_string(n_embd()) + ")");
  }
  if (attention() == AttentionBackend::flash && dropout() > 0) {
    throw core::ConfigError("model.dropout", "model.dropout: got " + core::format_number(dropout()) +
                                                 ", expected 0 with model.attention flash (it applies no attention "
                                                 "dropout)");
  }
  if (loss_chunk_rows() > 0 && !fused_ops()) {
    throw core::ConfigError("model.loss_chunk_rows",
                            "model.loss_chunk_rows: got " + std::to_string(loss_chunk_rows()) +
                                ", expected 0 with model.fused_ops false (the chunked loss runs the fused "
                                "cross-entropy kernels)");
  }
  if (head_dim() % 2 != 0) {
    throw core::ConfigError("model.n_head", "model.n_head: n_embd / n_head = " +
                                                std::to_string(head_dim()) +
                                                ", expected an even head size for rotary encoding");
  }
}

}  // namespace scaletrain::model
