#pragma once
// Fused kernels of the GPT step, each with a CPU and a CUDA implementation and an autograd
// backward, and each the same arithmetic as the unfused ATen expression it replaces:
//
//   rope_qkv       splits the qkv projection into q, k and v in the attention layout and rotates
//                  q and k (one read of qkv, one write of q, k, v; backward: one pass that writes
//                  the qkv gradient). Replaces view/permute/unbind + apply_rope.
//   cross_entropy  softmax cross-entropy over the first `classes` columns of low- or full-precision
//                  logits, fp32 inside, without an fp32 copy of the logits: forward keeps one
//                  log-sum-exp per row, backward writes the logits' gradient in their dtype in one
//                  pass (zeros in the padding columns). Replaces narrow + to(fp32) + cross_entropy.
//   add_layer_norm LayerNorm of x + residual with the sum kept for the residual stream: one read of
//                  x and the residual, one write of the sum and of the normalised rows, straight in
//                  the dtype the next linear layer takes (bf16 under autocast: no fp32 output and
//                  cast); backward: one pass that writes d x and d residual, with deterministic
//                  d weight and d bias. Replaces add + layer_norm (+ the autocast cast).
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace scaletrain::model {

struct QKV {
  at::Tensor q, k, v;  // (batch, heads, seq, head_dim), views of (batch, seq, heads, head_dim) storage
};

// The unfused reference: rotates pairs (x[i], x[i + half]) of the last dimension of `x`
// (GPT-NeoX layout) by angles whose cos and sin broadcast against x's (..., seq, half); in the
// tables' precision, rounded to x's dtype at the end.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// qkv: (batch, seq, 3 * heads * head_dim), q then k then v, each heads x head_dim (a linear
// layer's output). cos, sin: (seq, head_dim / 2) or (batch, seq, head_dim / 2), fp32 tables of the
// positions' angles. Returns q and k rotated as apply_rope rotates them (fp32 math, the same
// rounding), and v. Differentiable in qkv (the tables get no gradient).
// fp64 qkv takes rope_qkv_reference (the kernels compute in fp32).
QKV rope_qkv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads);
// The unfused reference of rope_qkv: view, permute, unbind and apply_rope (q and k dense in
// (batch, heads, seq, head_dim), v a view of qkv).
QKV rope_qkv_reference(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads);

enum class LossReduction { mean, sum };

// Cross-entropy of `logits` (rows, columns) or (..., columns), any float dtype, against `targets`
// (rows) int64, over the first `classes` columns (classes <= columns; the rest, such as padding
// rows of an output layer, take no part and get zero gradient). Rows whose target is ignore_index
// count for nothing; mean divides by the rows that count (NaN when none do, as torch). A target
// outside [0, classes) is an error on the CPU and gives a NaN loss on CUDA (checked without
// synchronising with the host). Returns an fp32 scalar (fp64 logits: cross_entropy_reference).
at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets, int64_t classes,
                         int64_t ignore_index = -100, LossReduction reduction = LossReduction::mean);
// The kernels without autograd, for the dispatcher operators
//   torch.ops.scaletrain.cross_entropy_forward(logits, targets, classes, ignore_index=-100)
//       -> (loss_rows, lse)
//   torch.ops.scaletrain.cross_entropy_backward(grad_rows, logits, targets, lse, classes,
//       ignore_index=-100) -> grad_logits
// logits (rows, columns) with a dense last dimension and any row stride (a narrowed view of padded
// logits is read in place), targets (rows) int64. loss_rows and lse are fp32 (fp64 for fp64
// logits); an ignored row's loss is 0. grad_rows is d loss / d loss_rows: (rows), or one value for
// every row; grad_logits is (rows, columns) dense, zero past `classes`. Errors are ValueErrors.
std::tuple<at::Tensor, at::Tensor> cross_entropy_rows(const at::Tensor& logits, const at::Tensor& targets,
                                                      int64_t classes, int64_t ignore_index = -100);
at::Tensor cross_entropy_rows_backward(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& targets,
                                       const at::Tensor& lse, int64_t classes, int64_t ignore_index = -100);
// The output layer and the cross-entropy together, `chunk_rows` rows at a time: the loss of
// cross_entropy(linear(hidden, weight), targets, classes, ...) without ever holding the logits of
// more than one chunk (rows x weight's rows). When a gradient is wanted (grad mode on and hidden
// or weight requiring one), each chunk's logits gradient is made in forward, right after its
// loss, and folded into d hidden (fp32) and d weight (fp32 sums, cuBLAS on CUDA); backward only
// scales them by the incoming gradient. hidden (..., features), weight (columns, features),
// targets (...) int64 with one target per row of hidden. The GEMMs run in the autocast dtype when
// autocast is on for hidden's device (as linear would), else in hidden's dtype; the logits'
// gradient is (softmax - one_hot) unscaled, in that dtype. fp64 hidden: ATen's ops in fp64. Same
// conventions as cross_entropy (ignore_index, NaN mean of no rows, columns past `classes` never
// in the loss, zero gradient there). chunk_rows >= 1.
at::Tensor linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                int64_t classes, int64_t ignore_index, LossReduction reduction, int64_t chunk_rows);
// The chunk loop of linear_cross_entropy without autograd, for the dispatcher operator
//   torch.ops.scaletrain.linear_cross_entropy_sum(hidden, weight, targets, classes, ignore_index,
//       chunk_rows, compute_dtype=None, with_grad=True) -> (loss_sum, grad_hidden, grad_weight)
// loss_sum: the sum of the rows' losses (fp32; fp64 GEMMs: fp64); with_grad: its gradients with
// respect to hidden (hidden's shape) and weight, fp32, else two empty tensors. The GEMMs run in
// compute_dtype (default hidden's). Errors are ValueErrors naming the argument.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_sum(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, int64_t classes,
    int64_t ignore_index, int64_t chunk_rows, std::optional<at::ScalarType> compute_dtype, bool with_grad);
// The unfused reference: narrow to `classes` columns, convert to (at least) fp32, ATen's
// cross_entropy (log_softmax + nll_loss).
at::Tensor cross_entropy_reference(const at::Tensor& logits, const at::Tensor& targets, int64_t classes,
                                   int64_t ignore_index = -100, LossReduction reduction = LossReduction::mean);

struct AddNorm {
  at::Tensor sum;     // x + residual (x itself without a residual)
  at::Tensor normed;  // LayerNorm(sum)
};

// The dtype a linear layer computes in for input x: autocast's when autocast is on for x's device
// (fp64 excepted, as autocast leaves it), else x's. A LayerNorm that feeds a linear layer can write
// its output in this type: the linear layer would cast it to that anyway.
at::ScalarType linear_input_type(const at::Tensor& x);

// LayerNorm over the last dimension of sum = x + residual (residual undefined: of x), with the
// sum in result_type(x, residual) (fp32 + bf16 under autocast: fp32, as the unfused add). The
// normalisation runs in fp32 on the rounded sum and is rounded once to out_type (default: the
// sum's type). weight (features), bias (features) or undefined. Differentiable in x, residual,
// weight and bias. The kernels take fp32, fp16 and bf16 on the CPU and, with features a multiple
// of 4 up to 1024, on CUDA; anything else (fp64, wider rows) runs add_layer_norm_reference.
AddNorm add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                       const at::Tensor& bias, double eps, std::optional<at::ScalarType> out_type = std::nullopt);
// y = x weight^T + bias as ATen's linear computes it (one GEMM, the bias in its epilogue; under
// autocast in autocast's type), whose backward sums the bias gradient with a column-sum kernel on
// CUDA: fp32 sums of d y's rows in a fixed order, returned in the bias's dtype (ATen's linear
// reduces in a generic reduction kernel and rounds the sum to the compute type first). The input
// and weight gradients are ATen's two GEMMs. Without a bias, or for fp64: ATen's linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
// The GPT MLP, proj(gelu_tanh(fc(x))) with fc(x) = x fc_weight^T + fc_bias (and proj alike; either
// bias undefined: none), as one autograd function that keeps fc's output for backward and not the
// GELU's: backward recomputes gelu(fc(x)) in the pass that computes the GELU's gradient, so the
// MLP holds one (rows, hidden) tensor less between forward and backward (GPT-2 124M, B16 x T1024:
// 1.1 GiB). Casts as autocast would for linear. On CUDA (hidden a multiple of 4) scaletrain's
// kernels: the GELU in fp32 math, and a backward pass that writes gelu(pre) and d pre and sums
// d pre's columns for fc's bias gradient (fp32, deterministic, as linear's); elsewhere ATen's
// gelu and gelu_backward. fp64, or shapes that do not fit: gelu_mlp_reference. Differentiable
// once: backward refuses create_graph (the reference supports it).
at::Tensor gelu_mlp(const at::Tensor& x, const at::Tensor& fc_weight, const at::Tensor& fc_bias,
                    const at::Tensor& proj_weight, const at::Tensor& proj_bias);
// The unfused reference: ATen's linear, gelu (tanh) and linear, each saving its own input.
at::Tensor gelu_mlp_reference(const at::Tensor& x, const at::Tensor& fc_weight, const at::Tensor& fc_bias,
                              const at::Tensor& proj_weight, const at::Tensor& proj_bias);
// The unfused reference: x + residual, ATen's layer_norm, then a cast to out_type.
AddNorm add_layer_norm_reference(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                 const at::Tensor& bias, double eps,
                                 std::optional<at::ScalarType> out_type = std::nullopt);

}  // namespace scaletrain::model
