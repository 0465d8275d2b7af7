#pragma once
// A GPT decoder in LibTorch: pre-LayerNorm blocks, rotary position encoding (RoPE) on queries and
// keys, GELU MLP, optional tied input/output embeddings. Supports a key/value cache for
// incremental decoding (see generate.h).
#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include "scaletrain/model/fused_ops.h"
#include "scaletrain/model/gpt_options.h"

namespace scaletrain::model {

// Keys and values of earlier positions, per layer, for incremental decoding. Preallocated to
// (batch, heads, capacity, head_dim); `length` positions are filled.
struct KVCache {
  std::vector<at::Tensor> keys;
  std::vector<at::Tensor> values;
  int64_t length = 0;
  int64_t capacity() const { return keys.empty() ? 0 : keys.front().size(2); }
};

// Extra inputs for a forward pass over padded or cached sequences.
struct ForwardContext {
  // (batch, seq) position of each token for RoPE; default 0..seq-1 (after the cache).
  at::Tensor positions;
  // Boolean (batch, 1, seq, cache_length + seq), true where attention is allowed; default causal.
  at::Tensor mask;
  // When set, keys and values are appended to the cache and attention covers it.
  KVCache* cache = nullptr;
};

// Puts a module in eval mode for a scope and restores its mode on exit, exceptions included.
class EvalModeGuard {
 public:
  explicit EvalModeGuard(torch::nn::Module& module) : module_(module), was_training_(module.is_training()) {
    module_.eval();
  }
  ~EvalModeGuard() { module_.train(was_training_); }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  torch::nn::Module& module_;
  bool was_training_;
};

// LayerNorm over the last dimension with a learned scale and an optional bias (LibTorch's
// LayerNorm cannot drop the bias; `model.bias: false` drops it here too).
class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t size, bool bias);
  at::Tensor forward(const at::Tensor& x);
  // LayerNorm of x + residual (residual undefined: of x) through the fused kernels
  // (add_layer_norm), the output in the dtype the next linear layer takes (linear_input_type).
  AddNorm fused(const at::Tensor& x, const at::Tensor& residual = {});
  at::Tensor weight, bias;  // bias undefined when disabled

 private:
  int64_t size_;
};
TORCH_MODULE(LayerNorm);

class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  explicit CausalSelfAttentionImpl(const GPTOptions& options);
  // x: (batch, seq, n_embd); cos/sin: (batch or 1, 1, seq, head_dim / 2).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const ForwardContext& context, int64_t layer);

  torch::nn::Linear qkv{nullptr}, proj{nullptr};

 private:
  GPTOptions options_;
};
TORCH_MODULE(CausalSelfAttention);

class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(const GPTOptions& options);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Linear fc{nullptr}, proj{nullptr};

 private:
  bool fused_ops_ = false;  // model::gelu_mlp (fused_ops.h)
};
TORCH_MODULE(MLP);

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const GPTOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const ForwardContext& context, int64_t layer);
  // With fused_ops: the block with its input's last residual add still to do, x + pending (pending
  // undefined: x), inside ln1's kernel; returns the block's output the same way, as {h, mlp
  // branch}, for the next block's ln1 or ln_f to add. forward(x) is h + branch of forward_pending(x, {}).
  std::pair<at::Tensor, at::Tensor> forward_pending(const at::Tensor& x, const at::Tensor& pending, const at::Tensor& cos,
                                                    const at::Tensor& sin, const ForwardContext& context, int64_t layer);
  LayerNorm ln1{nullptr}, ln2{nullptr};
  CausalSelfAttention attn{nullptr};
  bool fused_ops = false;  // the residual adds run inside ln1 (forward_pending) and ln2 (add_layer_norm)
  MLP mlp{nullptr};
  torch::nn::Dropout residual_dropout{nullptr};
};
TORCH_MODULE(Block);

class GPTImpl : public torch::nn::Module {
 public:
  explicit GPTImpl(GPTOptions options);

  // tokens: (batch, seq) int64 -> logits (batch, seq, vocab_size).
  at::Tensor forward(const at::Tensor& tokens, const ForwardContext& context = {});
  // Mean cross-entropy over targets that are not `ignore_index`.
  at::Tensor loss(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index = -100);
  // The training loss of `tokens` against `targets` (batch, seq): forward and cross-entropy in one,
  // over the padded output rows (with fused_ops no copy of the logits is made). Mean over the
  // targets that are not `ignore_index`, or their sum. With options().loss_chunk_rows() > 0 the
  // output layer and the loss run that many rows at a time (linear_cross_entropy): no logits of
  // the whole batch are ever held.
  at::Tensor forward_loss(const at::Tensor& tokens, const at::Tensor& targets,
                          LossReduction reduction = LossReduction::mean, int64_t ignore_index = -100);
  // A cache for `batch` sequences of up to `capacity` tokens, on the model's device and dtype.
  KVCache make_cache(int64_t batch, int64_t capacity) const;

  const GPTOptions& options() const { return options_; }
  int64_t num_parameters() const;

  // ZeRO-3 units: parts of the forward that use disjoint parameters, in forward order: unit 0 the
  // embedding, the final norm and the lm_head; unit 1 + i block i. parameter_units() gives each
  // parameter's unit (parameters() order). A runner set here runs each part (ZeroAdamW::run_unit
  // gathers the unit's parameters around it) and is told which unit the forward and the backward
  // need next (-1: none); unset, the parts run plainly.
  struct UnitCall {
    int64_t unit;
    int64_t next_forward;
    int64_t next_backward;
  };
  using UnitRunner = std::function<at::Tensor(const UnitCall& call, const std::function<at::Tensor()>& part)>;
  void set_unit_runner(UnitRunner runner) { unit_runner_ = std::move(runner); }
  std::vector<int64_t> parameter_units() const;

  torch::nn::Embedding wte{nullptr};
  torch::nn::Dropout embedding_dropout{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  LayerNorm ln_f{nullptr};
  torch::nn::Linear lm_head{nullptr};

 private:
  void init_weights();
  // (batch, seq, padded_vocab_size()) logits: padding columns included.
  at::Tensor padded_logits(const at::Tensor& tokens, const ForwardContext& context);
  // The model up to the final norm, then `head` of its output (batch, seq, n_embd), in unit 0.
  using Head = std::function<at::Tensor(const at::Tensor& last)>;
  at::Tensor run_model(const at::Tensor& tokens, const ForwardContext& context, const Head& head);
  // The output layer's weight (padded_vocab_size(), n_embd): wte's when tied.
  const at::Tensor& output_weight() const;
  // Cross-entropy over the first `classes` columns: the fused kernel or the reference (fused_ops).
  at::Tensor loss_over(const at::Tensor& logits, const at::Tensor& targets, int64_t classes, int64_t ignore_index,
                       LossReduction reduction) const;
  at::Tensor run_unit(const UnitCall& call, const std::function<at::Tensor()>& part) const {
    return unit_runner_ ? unit_runner_(call, part) : part();
  }
  GPTOptions options_;
  at::Tensor rope_cos_, rope_sin_;  // (block_size, head_dim / 2)
  UnitRunner unit_runner_;
};
TORCH_MODULE(GPT);

}  // namespace scaletrain::model
