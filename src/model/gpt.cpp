#include "scaletrain/model/gpt.h"

#include <cmath>
#include <unordered_map>

#include <torch/nn/functional/linear.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/init.h>

#include "scaletrain/model/activation_checkpoint.h"
#include "scaletrain/model/attention.h"
#include "scaletrain/model/fused_ops.h"

namespace scaletrain::model {
namespace {

constexpr double kLayerNormEps = 1e-5;

torch::nn::Linear make_linear(int64_t in, int64_t out, bool bias) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
}

// y = x W^T + b through ATen's linear op, as Python's nn.Linear does: for a 3-d input it is one
// GEMM with the bias added in its epilogue. LibTorch's torch::nn::Linear (F::linear) runs a matmul
// and then `output += bias`, a separate pass that under autocast adds an fp32 bias into the bf16
// output with a casting kernel (6 ms of a GPT-2 124M step on an H200).
// With fused_ops, model::linear: the same GEMMs, the bias gradient summed by scaletrain's kernel.
at::Tensor apply_linear(const torch::nn::Linear& layer, const at::Tensor& x, bool fused) {
  if (fused) return model::linear(x, layer->weight, layer->bias);
  return at::linear(x, layer->weight, layer->bias.defined() ? std::optional<at::Tensor>(layer->bias) : std::nullopt);
}

}  // namespace

LayerNormImpl::LayerNormImpl(int64_t size, bool bias) : size_(size) {
  weight = register_parameter("weight", at::ones({size}));
  if (bias) this->bias = register_parameter("bias", at::zeros({size}));
}

at::Tensor LayerNormImpl::forward(const at::Tensor& x) { return at::layer_norm(x, {size_}, weight, bias, kLayerNormEps); }

AddNorm LayerNormImpl::fused(const at::Tensor& x, const at::Tensor& residual) {
  // On the CPU ATen's vectorised LayerNorm is faster than the fused kernel (1.3-1.6x at widths
  // 128-768 on 2 cores), which is there for the algorithm's tests: the model takes ATen's there.
  if (!x.is_cuda()) return add_layer_norm_reference(x, residual, weight, bias, kLayerNormEps, linear_input_type(x));
  return add_layer_norm(x, residual, weight, bias, kLayerNormEps, linear_input_type(x));
}

CausalSelfAttentionImpl::CausalSelfAttentionImpl(const GPTOptions& options) : options_(options) {
  qkv = register_module("qkv", make_linear(options.n_embd(), 3 * options.n_embd(), options.bias()));
  proj = register_module("proj", make_linear(options.n_embd(), options.n_embd(), options.bias()));
}

at::Tensor CausalSelfAttentionImpl::forward(const at::Tensor& x, const at::Tensor& cos,
                                            const at::Tensor& sin, const ForwardContext& context,
                                            int64_t layer) {
  const int64_t batch = x.size(0), seq = x.size(1), heads = options_.n_head();
  const auto projected = apply_linear(qkv, x, options_.fused_ops());
  auto [q, k, v] = options_.fused_ops() ? rope_qkv(projected, cos, sin, heads)
                                         : rope_qkv_reference(projected, cos, sin, heads);
  if (context.cache != nullptr) {
    KVCache& cache = *context.cache;
    cache.keys[layer].narrow(2, cache.length, seq).copy_(k);
    cache.values[layer].narrow(2, cache.length, seq).copy_(v);
    k = cache.keys[layer].narrow(2, 0, cache.length + seq);
    v = cache.values[layer].narrow(2, 0, cache.length + seq);
  }
  auto y = attention(q, k, v, options_.attention(), /*causal=*/true, context.mask,
                     is_training() ? options_.dropout() : 0.0);
  return apply_linear(proj, y.transpose(1, 2).reshape({batch, seq, options_.n_embd()}), options_.fused_ops());
}

MLPImpl::MLPImpl(const GPTOptions& options) : fused_ops_(options.fused_ops()) {
  fc = register_module("fc", make_linear(options.n_embd(), 4 * options.n_embd(), options.bias()));
  proj = register_module("proj", make_linear(4 * options.n_embd(), options.n_embd(), options.bias()));
}

at::Tensor MLPImpl::forward(const at::Tensor& x) {
  if (fused_ops_) return gelu_mlp(x, fc->weight, fc->bias, proj->weight, proj->bias);
  return apply_linear(proj, at::gelu(apply_linear(fc, x, false), "tanh"), false);
}

BlockImpl::BlockImpl(const GPTOptions& options) {
  ln1 = register_module("ln1", LayerNorm(options.n_embd(), options.bias()));
  attn = register_module("attn", CausalSelfAttention(options));
  ln2 = register_module("ln2", LayerNorm(options.n_embd(), options.bias()));
  mlp = register_module("mlp", MLP(options));
  residual_dropout = register_module("residual_dropout", torch::nn::Dropout(options.dropout()));
  fused_ops = options.fused_ops();
}

at::Tensor BlockImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                              const ForwardContext& context, int64_t layer) {
  if (!fused_ops) {
    auto h = x + residual_dropout(attn(ln1(x), cos, sin, context, layer));
    return h + residual_dropout(mlp(ln2(h)));
  }
  auto [h, branch] = forward_pending(x, at::Tensor(), cos, sin, context, layer);
  return h + branch;
}

std::pair<at::Tensor, at::Tensor> BlockImpl::forward_pending(const at::Tensor& x, const at::Tensor& pending,
                                                             const at::Tensor& cos, const at::Tensor& sin,
                                                             const ForwardContext& context, int64_t layer) {
  // x + pending and ln1 of it in one pass, h = that + attention branch and ln2(h) in another.
  auto [input, normed1] = ln1->fused(x, pending);
  auto [h, normed2] = ln2->fused(input, residual_dropout(attn(normed1, cos, sin, context, layer)));
  return {h, residual_dropout(mlp(normed2))};
}

GPTImpl::GPTImpl(GPTOptions options) : options_(std::move(options)) {
  options_.validate();
  wte = register_module("wte", torch::nn::Embedding(options_.padded_vocab_size(), options_.n_embd()));
  embedding_dropout = register_module("embedding_dropout", torch::nn::Dropout(options_.dropout()));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < options_.n_layer(); ++i) blocks->push_back(Block(options_));
  ln_f = register_module("ln_f", LayerNorm(options_.n_embd(), options_.bias()));
  if (!options_.tie_embeddings())
    lm_head = register_module("lm_head", make_linear(options_.n_embd(), options_.padded_vocab_size(), false));

  // Rotary tables: angle(pos, i) = pos * base^(-2i / head_dim), i < head_dim / 2.
  const int64_t half = options_.head_dim() / 2;
  auto inv_freq = at::pow(options_.rope_base(), -at::arange(0, half, at::kDouble) * 2.0 / options_.head_dim());
  auto angles = at::outer(at::arange(options_.block_size(), at::kDouble), inv_freq);
  rope_cos_ = register_buffer("rope_cos", angles.cos().to(at::kFloat));
  rope_sin_ = register_buffer("rope_sin", angles.sin().to(at::kFloat));
  init_weights();
}

void GPTImpl::init_weights() {
  torch::NoGradGuard no_grad;
  // GPT-2: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer).
  const double residual_std = 0.02 / std::sqrt(2.0 * static_cast<double>(options_.n_layer()));
  for (auto& item : named_modules("", /*include_self=*/false)) {
    if (auto* linear = item.value()->as<torch::nn::Linear>()) {
      bool residual = item.key().size() >= 5 && item.key().compare(item.key().size() - 5, 5, ".proj") == 0;
      torch::nn::init::normal_(linear->weight, 0.0, residual ? residual_std : 0.02);
      if (linear->bias.defined()) torch::nn::init::zeros_(linear->bias);
    } else if (auto* embedding = item.value()->as<torch::nn::Embedding>()) {
      torch::nn::init::normal_(embedding->weight, 0.0, 0.02);
    }
  }
}

at::Tensor GPTImpl::forward(const at::Tensor& tokens, const ForwardContext& context) {
  auto logits = padded_logits(tokens, context);
  // The GEMM runs over the padded rows; the padding columns are dropped here, so they take no
  // part in the softmax, the loss or decoding, and their rows get no gradient from the output.
  return options_.padded_vocab_size() == options_.vocab_size() ? logits
                                                               : logits.narrow(-1, 0, options_.vocab_size());
}

at::Tensor GPTImpl::padded_logits(const at::Tensor& tokens, const ForwardContext& context) {
  return run_model(tokens, context, [this](const at::Tensor& last) {
    return options_.tie_embeddings() ? at::linear(last, wte->weight) : apply_linear(lm_head, last, false);
  });
}

const at::Tensor& GPTImpl::output_weight() const { return options_.tie_embeddings() ? wte->weight : lm_head->weight; }

at::Tensor GPTImpl::run_model(const at::Tensor& tokens, const ForwardContext& context, const Head& head) {
  TORCH_CHECK(tokens.dim() == 2, "GPT: tokens must be (batch, seq), got ", tokens.sizes());
  const int64_t batch = tokens.size(0), seq = tokens.size(1);
  const int64_t offset = context.cache ? context.cache->length : 0;
  // Without explicit positions, positions are offset..offset+seq-1 and must fit the rotary table;
  // with them (left-padded batches), the caller keeps each position below block_size.
  TORCH_CHECK(context.positions.defined() || offset + seq <= options_.block_size(), "GPT: ", offset + seq,
              " tokens exceed model.block_size = ", options_.block_size());
  if (context.cache) {
    TORCH_CHECK(offset + seq <= context.cache->capacity(), "GPT: cache holds ",
                context.cache->capacity(), " positions, needs ", offset + seq);
  }
  const int64_t half = options_.head_dim() / 2;
  at::Tensor cos, sin;
  if (context.positions.defined()) {
    TORCH_CHECK(context.positions.sizes() == tokens.sizes(), "GPT: positions ", context.positions.sizes(),
                " do not match tokens ", tokens.sizes());
    auto flat = context.positions.reshape({-1});
    cos = rope_cos_.index_select(0, flat).view({batch, seq, half});
    sin = rope_sin_.index_select(0, flat).view({batch, seq, half});
  } else {
    cos = rope_cos_.narrow(0, offset, seq).view({1, seq, half});
    sin = rope_sin_.narrow(0, offset, seq).view({1, seq, half});
  }
  // (1 or batch, seq, half), in the tables' precision: the rotation runs in it and rounds to q/k's dtype.
  const int64_t n_layer = options_.n_layer();
  // The embedding's backward comes last: nothing to prefetch after it.
  auto x = run_unit({0, 1, -1}, [&] { return embedding_dropout(wte(tokens)); });
  // Checkpointing pays off only when backward will run; a cache would be appended to twice.
  const bool recompute = options_.activation_checkpointing() && is_training() && torch::GradMode::is_enabled() &&
                         context.cache == nullptr;
  // With fused_ops (not checkpointing, whose units take and give one tensor) each block's last
  // residual add runs in the next block's ln1 or in ln_f: x + pending.
  const bool pending_adds = options_.fused_ops() && !recompute;
  at::Tensor pending;
  for (size_t i = 0; i < blocks->size(); ++i) {
    const auto layer = static_cast<int64_t>(i);
    auto block = blocks->ptr<BlockImpl>(i);
    const UnitCall unit{1 + layer, 2 + layer < 1 + n_layer ? 2 + layer : -1, layer};
    if (pending_adds) {
      // The unit's output is the branch: its gradient arrives with h's (one node, the next ln1,
      // gives both), and its node is the block's last, whose backward runs first: the unit's
      // backward hook is on time for all of the block.
      at::Tensor h;
      pending = run_unit(unit, [&] {
        auto [sum, branch] = block->forward_pending(x, pending, cos, sin, context, layer);
        h = sum;
        return branch;
      });
      x = h;
      continue;
    }
    x = run_unit(unit, [&] {
      if (recompute) {
        // Captured by value: the recomputation runs in backward, after this frame is gone.
        return checkpoint([block, cos, sin, context, layer](const at::Tensor& input) {
          return block->forward(input, cos, sin, context, layer);
        }, x);
      }
      return block->forward(x, cos, sin, context, layer);
    });
  }
  if (context.cache) context.cache->length += seq;
  // The head (unit 0 again): its backward comes first and the last block's next.
  return run_unit({0, -1, n_layer},
                  [&] { return head(options_.fused_ops() ? ln_f->fused(x, pending).normed : ln_f(x)); });
}

std::vector<int64_t> GPTImpl::parameter_units() const {
  std::unordered_map<const void*, int64_t> block_of;  // a block's parameters -> 1 + its index
  for (size_t i = 0; i < blocks->size(); ++i) {
    for (const auto& p : blocks->ptr(i)->parameters()) block_of[p.unsafeGetTensorImpl()] = 1 + static_cast<int64_t>(i);
  }
  std::vector<int64_t> units;
  for (const auto& p : parameters()) {
    auto found = block_of.find(p.unsafeGetTensorImpl());
    units.push_back(found == block_of.end() ? 0 : found->second);
  }
  return units;
}

at::Tensor GPTImpl::loss(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  return loss_over(logits, targets, logits.size(-1), ignore_index, LossReduction::mean);
}

at::Tensor GPTImpl::loss_over(const at::Tensor& logits, const at::Tensor& targets, int64_t classes,
                              int64_t ignore_index, LossReduction reduction) const {
  return options_.fused_ops() ? cross_entropy(logits, targets, classes, ignore_index, reduction)
                              : cross_entropy_reference(logits, targets, classes, ignore_index, reduction);
}

at::Tensor GPTImpl::forward_loss(const at::Tensor& tokens, const at::Tensor& targets, LossReduction reduction,
                                 int64_t ignore_index) {
  TORCH_CHECK(targets.sizes() == tokens.sizes(), "GPT: targets ", targets.sizes(), " do not match tokens ",
              tokens.sizes());
  // Over the padded logits: the loss takes the first vocab_size columns (fused: in the kernels,
  // the padding columns get zero gradient and nothing is copied).
  if (options_.loss_chunk_rows() == 0)
    return loss_over(padded_logits(tokens, {}), targets, options_.vocab_size(), ignore_index, reduction);
  // The output layer and the loss a chunk of rows at a time (the lm_head is bias-free).
  return run_model(tokens, {}, [&](const at::Tensor& last) {
    return linear_cross_entropy(last, output_weight(), targets, options_.vocab_size(), ignore_index, reduction,
                                options_.loss_chunk_rows());
  });
}

KVCache GPTImpl::make_cache(int64_t batch, int64_t capacity) const {
  KVCache cache;
  auto options = wte->weight.options();
  for (int64_t i = 0; i < options_.n_layer(); ++i) {
    cache.keys.push_back(at::zeros({batch, options_.n_head(), capacity, options_.head_dim()}, options));
    cache.values.push_back(at::zeros({batch, options_.n_head(), capacity, options_.head_dim()}, options));
  }
  return cache;
}

int64_t GPTImpl::num_parameters() const {
  int64_t total = 0;
  for (const auto& p : parameters()) total += p.numel();
  return total;
}

}  // namespace scaletrain::model
