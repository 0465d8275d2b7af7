#include "scaletrain/attention/flash_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

namespace scaletrain::attention {
namespace {

constexpr int64_t kTile = 64;        // query rows and key columns per tile
constexpr int64_t kMaxHeadDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

std::string dtype_name(const at::Tensor& t) { return std::string(c10::toString(t.scalar_type())); }

void fail(const std::string& message) { throw std::invalid_argument("flash_attention: " + message); }

// q, k, v: `dims` dimensions (4 dense, 3 packed), one floating dtype and device, head_dim stride 1.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dims) {
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* ts[3] = {&q, &k, &v};
  const std::string layout = dims == 4 ? "(batch, heads, seq, head_dim)" : "(total, heads, head_dim)";
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *ts[i];
    if (!t.defined()) fail(std::string(names[i]) + ": undefined tensor");
    if (t.dim() != dims)
      fail(std::string(names[i]) + ": " + std::to_string(t.dim()) + " dimensions, expected " + std::to_string(dims) +
           " " + layout);
    if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kBFloat16 && t.scalar_type() != at::kHalf)
      fail(std::string(names[i]) + ": dtype " + dtype_name(t) + ", expected float32, bfloat16 or float16");
    if (t.scalar_type() != q.scalar_type())
      fail(std::string(names[i]) + ": dtype " + dtype_name(t) + ", q is " + dtype_name(q) + " (expected one dtype)");
    if (t.device() != q.device())
      fail(std::string(names[i]) + ": on " + t.device().str() + ", q is on " + q.device().str() +
           " (expected one device)");
    if (t.numel() == 0) fail(std::string(names[i]) + ": empty tensor (shape " + c10::str(t.sizes()) + ")");
    if (t.stride(-1) != 1)
      fail(std::string(names[i]) + ": head_dim stride " + std::to_string(t.stride(-1)) +
           ", expected 1 (the last dimension contiguous)");
  }
  if (!q.is_cpu())
    fail("q: on " + q.device().str() + ", but this build has flash attention kernels for CPU tensors only "
         "(use attention sdpa on " + q.device().str() + ")");
  const int64_t d = q.size(-1);
  if (d > kMaxHeadDim) fail("q: head_dim " + std::to_string(d) + ", expected at most " + std::to_string(kMaxHeadDim));
  if (k.size(-1) != d || v.size(-1) != d)
    fail("k, v: head_dim " + std::to_string(k.size(-1)) + " and " + std::to_string(v.size(-1)) +
         ", expected q's " + std::to_string(d));
  if (k.sizes() != v.sizes())
    fail("v: shape " + c10::str(v.sizes()) + ", expected k's " + c10::str(k.sizes()));
  const int64_t heads = q.size(1), kv_heads = k.size(1);
  if (heads % kv_heads != 0)
    fail("k: " + std::to_string(kv_heads) + " heads do not divide q's " + std::to_string(heads) +
         " (grouped-query attention needs heads a multiple of kv_heads)");
  if (dims == 4 && k.size(0) != q.size(0))
    fail("k: batch " + std::to_string(k.size(0)) + ", expected q's " + std::to_string(q.size(0)));
}

// The sequence offsets on the host as int64, checked against `total` rows.
std::vector<int64_t> offsets_of(const at::Tensor& cu, const char* name, int64_t total) {
  if (!cu.defined() || cu.dim() != 1 || cu.size(0) < 2)
    fail(std::string(name) + ": expected one dimension of batch + 1 >= 2 entries");
  if (cu.scalar_type() != at::kInt && cu.scalar_type() != at::kLong)
    fail(std::string(name) + ": dtype " + dtype_name(cu) + ", expected int32 or int64");
  const at::Tensor host = cu.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> offsets(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + host.numel());
  if (offsets.front() != 0) fail(std::string(name) + ": starts at " + std::to_string(offsets.front()) + ", expected 0");
  for (size_t i = 1; i < offsets.size(); ++i)
    if (offsets[i] < offsets[i - 1])
      fail(std::string(name) + ": decreases at index " + std::to_string(i) + " (" + std::to_string(offsets[i - 1]) +
           " then " + std::to_string(offsets[i]) + "), expected non-decreasing offsets");
  if (offsets.back() != total)
    fail(std::string(name) + ": ends at " + std::to_string(offsets.back()) + ", expected the " + std::to_string(total) +
         " rows of the packed tensor");
  return offsets;
}

struct Problem {
  std::vector<int64_t> q_offsets, k_offsets;
  int64_t heads = 0, kv_heads = 0, dim = 0;
  float scale = 1.f;
  bool causal = false;
  int64_t sequences() const { return static_cast<int64_t>(q_offsets.size()) - 1; }
};

Problem problem_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k,
                   bool causal, std::optional<double> scale) {
  Problem p;
  p.q_offsets = offsets_of(cu_q, "cu_seqlens_q", q.size(0));
  p.k_offsets = offsets_of(cu_k, "cu_seqlens_k", k.size(0));
  if (p.q_offsets.size() != p.k_offsets.size())
    fail("cu_seqlens_k: " + std::to_string(p.k_offsets.size() - 1) + " sequences, cu_seqlens_q has " +
         std::to_string(p.q_offsets.size() - 1));
  p.heads = q.size(1), p.kv_heads = k.size(1), p.dim = q.size(2), p.causal = causal;
  const double s = scale.value_or(1.0 / std::sqrt(static_cast<double>(p.dim)));
  if (!std::isfinite(s)) fail("scale: got " + std::to_string(s) + ", expected a finite number");
  p.scale = static_cast<float>(s);
  return p;
}

// Keys query `i` of a sequence may see: [0, limit).
int64_t key_limit(const Problem& p, int64_t i, int64_t lq, int64_t lk) {
  return p.causal ? std::clamp<int64_t>(i + lk - lq + 1, 0, lk) : lk;
}

// Eight partial sums, so that the compiler can vectorise the reduction without reassociating.
float dot(const float* a, const float* b, int64_t n) {
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int u = 0; u < 8; ++u) s[u] += a[d + u] * b[d + u];
  float tail = 0.f;
  for (; d < n; ++d) tail += a[d] * b[d];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// Forward of one (sequence, head, query tile): the online softmax over the key tiles.
void forward_tile(const Problem& p, const float* q, const float* k, const float* v, int64_t seq, int64_t h,
                  int64_t tile, float* out, float* lse, int64_t total_q) {
  const int64_t q0 = p.q_offsets[seq], lq = p.q_offsets[seq + 1] - q0;
  const int64_t k0 = p.k_offsets[seq], lk = p.k_offsets[seq + 1] - k0;
  const int64_t kv = h / (p.heads / p.kv_heads), dim = p.dim;
  const int64_t first = tile * kTile, rows = std::min(kTile, lq - first);
  std::vector<float> m(rows, kNegInf), l(rows, 0.f), acc(rows * dim, 0.f), s(kTile);
  const int64_t keys = key_limit(p, first + rows - 1, lq, lk);  // the tile's last row sees the most
  for (int64_t j0 = 0; j0 < keys; j0 += kTile) {
    const int64_t cols = std::min(kTile, keys - j0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t limit = key_limit(p, first + r, lq, lk);
      const float* qr = q + ((q0 + first + r) * p.heads + h) * dim;
      float tile_max = kNegInf;
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t j = j0 + c;
        s[c] = j < limit ? dot(qr, k + ((k0 + j) * p.kv_heads + kv) * dim, dim) * p.scale : kNegInf;
        tile_max = std::max(tile_max, s[c]);
      }
      const float m_new = std::max(m[r], tile_max);
      if (m_new == kNegInf) continue;  // no key of this row yet
      const float correction = std::exp(m[r] - m_new);
      float* a = acc.data() + r * dim;
      for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
      float row_sum = 0.f;
      for (int64_t c = 0; c < cols; ++c) {
        const float e = std::exp(s[c] - m_new);
        row_sum += e;
        const float* vr = v + ((k0 + j0 + c) * p.kv_heads + kv) * dim;
        for (int64_t d = 0; d < dim; ++d) a[d] += e * vr[d];
      }
      l[r] = l[r] * correction + row_sum;
      m[r] = m_new;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + ((q0 + first + r) * p.heads + h) * dim;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    for (int64_t d = 0; d < dim; ++d) o[d] = acc[r * dim + d] * inv;
    lse[h * total_q + q0 + first + r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
  }
}

// Backward of one (sequence, key/value head): every query head of the group and every tile, so
// that this task alone writes its dk, dv rows and its heads' dq rows (deterministic, no races).
// Sums are two-level, as tiled matrix products make them: within a (query tile, key tile) pair
// into tile buffers, then tile by tile into dq, dk and dv (a 4k-token sequence would otherwise add
// 4k terms one by one).
void backward_group(const Problem& p, const float* q, const float* k, const float* v, const float* dout,
                    const float* delta, const float* lse, int64_t seq, int64_t kv, float* dq, float* dk, float* dv,
                    int64_t total_q) {
  const int64_t q0 = p.q_offsets[seq], lq = p.q_offsets[seq + 1] - q0;
  const int64_t k0 = p.k_offsets[seq], lk = p.k_offsets[seq + 1] - k0;
  const int64_t group = p.heads / p.kv_heads, dim = p.dim;
  std::vector<float> prob(kTile), dprob(kTile), dk_tile(kTile * dim), dv_tile(kTile * dim), dq_row(dim);
  for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
    for (int64_t first = 0; first < lq; first += kTile) {
      const int64_t rows = std::min(kTile, lq - first);
      const int64_t keys = key_limit(p, first + rows - 1, lq, lk);
      for (int64_t j0 = 0; j0 < keys; j0 += kTile) {
        const int64_t cols = std::min(kTile, keys - j0);
        std::fill(dk_tile.begin(), dk_tile.begin() + cols * dim, 0.f);
        std::fill(dv_tile.begin(), dv_tile.begin() + cols * dim, 0.f);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = first + r;
          const float row_lse = lse[h * total_q + q0 + i];
          const int64_t limit = std::min(key_limit(p, i, lq, lk), j0 + cols);
          if (row_lse == kNegInf || limit <= j0) continue;  // no key here: no gradient
          const float* qi = q + ((q0 + i) * p.heads + h) * dim;
          const float* doi = dout + ((q0 + i) * p.heads + h) * dim;
          const float di = delta[h * total_q + q0 + i];
          std::fill(dq_row.begin(), dq_row.end(), 0.f);
          for (int64_t c = 0; c < limit - j0; ++c) {
            const int64_t row = ((k0 + j0 + c) * p.kv_heads + kv) * dim;
            const float pr = std::exp(dot(qi, k + row, dim) * p.scale - row_lse);
            const float ds = pr * (dot(doi, v + row, dim) - di) * p.scale;
            float* dkr = dk_tile.data() + c * dim;
            float* dvr = dv_tile.data() + c * dim;
            const float* kr = k + row;
            for (int64_t d = 0; d < dim; ++d) {
              dvr[d] += pr * doi[d];
              dkr[d] += ds * qi[d];
              dq_row[d] += ds * kr[d];
            }
          }
          float* dqi = dq + ((q0 + i) * p.heads + h) * dim;
          for (int64_t d = 0; d < dim; ++d) dqi[d] += dq_row[d];
        }
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t row = ((k0 + j0 + c) * p.kv_heads + kv) * dim;
          for (int64_t d = 0; d < dim; ++d) {
            dk[row + d] += dk_tile[c * dim + d];
            dv[row + d] += dv_tile[c * dim + d];
          }
        }
      }
    }
  }
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> forward_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const Problem& p) {
  const at::Tensor qf = as_float(q), kf = as_float(k), vf = as_float(v);
  const int64_t total_q = q.size(0);
  at::Tensor out = at::zeros({total_q, p.heads, p.dim}, qf.options());
  at::Tensor lse = at::full({p.heads, total_q}, kNegInf, qf.options());
  struct Item {
    int64_t seq, head, tile;
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < p.sequences(); ++s) {
    const int64_t tiles = (p.q_offsets[s + 1] - p.q_offsets[s] + kTile - 1) / kTile;
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t t = 0; t < tiles; ++t) items.push_back({s, h, t});
  }
  const float *qd = qf.const_data_ptr<float>(), *kd = kf.const_data_ptr<float>(), *vd = vf.const_data_ptr<float>();
  float *od = out.data_ptr<float>(), *ld = lse.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[static_cast<size_t>(i)];
      forward_tile(p, qd, kd, vd, it.seq, it.head, it.tile, od, ld, total_q);
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_packed(const at::Tensor& dout, const at::Tensor& q,
                                                               const at::Tensor& k, const at::Tensor& v,
                                                               const at::Tensor& out, const at::Tensor& lse,
                                                               const Problem& p) {
  const at::Tensor qf = as_float(q), kf = as_float(k), vf = as_float(v), dof = as_float(dout);
  const int64_t total_q = q.size(0);
  // delta_i = sum_d dO_i,d * O_i,d (the softmax backward's row term), per head: (heads, total_q).
  const at::Tensor delta = (dof * as_float(out)).sum(-1).transpose(0, 1).contiguous();
  const at::Tensor lsef = lse.to(at::kFloat).contiguous();
  at::Tensor dq = at::zeros_like(qf), dk = at::zeros_like(kf), dv = at::zeros_like(vf);
  const float *qd = qf.const_data_ptr<float>(), *kd = kf.const_data_ptr<float>(), *vd = vf.const_data_ptr<float>();
  const float *dod = dof.const_data_ptr<float>(), *deltad = delta.const_data_ptr<float>(),
              *lsed = lsef.const_data_ptr<float>();
  float *dqd = dq.data_ptr<float>(), *dkd = dk.data_ptr<float>(), *dvd = dv.data_ptr<float>();
  at::parallel_for(0, p.sequences() * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      backward_group(p, qd, kd, vd, dod, deltad, lsed, i / p.kv_heads, i % p.kv_heads, dqd, dkd, dvd, total_q);
  });
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse) {
  if (!dout.defined() || dout.sizes() != q.sizes())
    fail("dout: expected q's shape " + c10::str(q.sizes()));
  if (!out.defined() || out.sizes() != q.sizes()) fail("out: expected q's shape " + c10::str(q.sizes()));
  if (!lse.defined() || lse.dim() != 2 || lse.size(0) != q.size(1) || lse.size(1) != q.size(0))
    fail("lse: expected (heads, total_q) = (" + std::to_string(q.size(1)) + ", " + std::to_string(q.size(0)) + ")");
}

// Autograd over the packed layout (the dense entry reshapes into it).
class FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k, bool causal,
                            std::optional<double> scale) {
    auto [out, lse] = flash_attention_forward(q, k, v, cu_q, cu_k, causal, scale);
    ctx->save_for_backward({q, k, v, out, lse, cu_q, cu_k});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale.has_value() ? *scale : std::numeric_limits<double>::quiet_NaN();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const double s = ctx->saved_data["scale"].toDouble();
    auto [dq, dk, dv] = flash_attention_backward(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3],
                                                 saved[4], saved[5], saved[6], ctx->saved_data["causal"].toBool(),
                                                 std::isnan(s) ? std::nullopt : std::optional<double>(s));
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                           const at::Tensor& cu_seqlens_k, bool causal,
                                                           std::optional<double> scale) {
  check_qkv(q, k, v, 3);
  const Problem p = problem_of(q, k, cu_seqlens_q, cu_seqlens_k, causal, scale);
  at::NoGradGuard no_grad;
  return forward_packed(q, k, v, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, bool causal,
    std::optional<double> scale) {
  check_qkv(q, k, v, 3);
  check_backward_inputs(dout, q, out, lse);
  const Problem p = problem_of(q, k, cu_seqlens_q, cu_seqlens_k, causal, scale);
  at::NoGradGuard no_grad;
  return backward_packed(dout, q, k, v, out, lse, p);
}

at::Tensor flash_attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, bool causal,
                                  std::optional<double> scale) {
  return FlashAttentionFunction::apply(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale);
}

at::Tensor flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                           std::optional<double> scale) {
  check_qkv(q, k, v, 4);
  const int64_t batch = q.size(0), heads = q.size(1), lq = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), lk = k.size(2);
  if (v.size(2) != lk) fail("v: sequence length " + std::to_string(v.size(2)) + ", expected k's " + std::to_string(lk));
  // (batch, heads, seq, dim) -> packed (batch * seq, heads, dim): every sequence the same length.
  const auto long_options = at::TensorOptions().dtype(at::kLong);
  const at::Tensor cu_q = at::arange(0, batch + 1, long_options) * lq;
  const at::Tensor cu_k = at::arange(0, batch + 1, long_options) * lk;
  const at::Tensor out = flash_attention_varlen(q.transpose(1, 2).reshape({batch * lq, heads, dim}),
                                                k.transpose(1, 2).reshape({batch * lk, kv_heads, dim}),
                                                v.transpose(1, 2).reshape({batch * lk, kv_heads, dim}), cu_q, cu_k,
                                                causal, scale);
  return out.view({batch, lq, heads, dim}).transpose(1, 2);
}

}  // namespace scaletrain::attention
