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

#include "scaletrain/core/version.h"  // SCALETRAIN_WITH_CUDA

#ifdef SCALETRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "core/tensor_dtype.h"
#include "flash_attention_cuda.h"
#endif

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
  const int64_t d = q.size(-1);
  if (q.is_cuda()) {
#ifdef SCALETRAIN_WITH_CUDA
    if (q.scalar_type() == at::kFloat)
      fail("q: dtype Float on " + q.device().str() + ", the CUDA kernels take bfloat16 or float16 (cast q, k, v)");
    if (!cuda_supports_head_dim(d))
      fail("q: head_dim " + std::to_string(d) + " on " + q.device().str() + ", the CUDA kernels take 64 or 128");
#else
    fail("q: on " + q.device().str() + ", but this build has no CUDA kernels (built without CUDA)");
#endif
  } else if (!q.is_cpu()) {
    fail("q: on " + q.device().str() + ", expected a CPU or CUDA tensor");
  }
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

float scale_of(int64_t dim, std::optional<double> scale) {
  const double s = scale.value_or(1.0 / std::sqrt(static_cast<double>(dim)));
  if (!std::isfinite(s)) fail("scale: got " + std::to_string(s) + ", expected a finite number");
  return static_cast<float>(s);
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
  p.scale = scale_of(p.dim, scale);
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

// cu_seqlens: both (packed sequences) or neither (the dense layout).
bool is_dense(const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k) {
  const bool has_q = cu_q.has_value() && cu_q->defined(), has_k = cu_k.has_value() && cu_k->defined();
  if (has_q != has_k)
    fail(std::string(has_q ? "cu_seqlens_k" : "cu_seqlens_q") +
         ": missing; pass both cu_seqlens (packed sequences) or neither (the dense layout)");
  return !has_q;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool dense) {
  check_qkv(q, k, v, dense ? 4 : 3);
  if (dense && v.size(2) != k.size(2))
    fail("v: sequence length " + std::to_string(v.size(2)) + ", expected k's " + std::to_string(k.size(2)));
}

// lse: (batch, heads, q_len) dense, (heads, total_q) packed.
std::vector<int64_t> lse_shape(const at::Tensor& q, bool dense) {
  return dense ? std::vector<int64_t>{q.size(0), q.size(1), q.size(2)} : std::vector<int64_t>{q.size(1), q.size(0)};
}

void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                           bool dense) {
  const auto same = [&](const at::Tensor& t, const char* name) {
    if (!t.defined() || t.sizes() != q.sizes())
      fail(std::string(name) + ": expected q's shape " + c10::str(q.sizes()));
    if (t.scalar_type() != q.scalar_type())
      fail(std::string(name) + ": dtype " + dtype_name(t) + ", q is " + dtype_name(q) + " (expected one dtype)");
    if (t.device() != q.device())
      fail(std::string(name) + ": on " + t.device().str() + ", q is on " + q.device().str() + " (expected one device)");
  };
  same(dout, "dout");
  same(out, "out");
  const std::vector<int64_t> want = lse_shape(q, dense);
  if (!lse.defined() || lse.sizes() != at::IntArrayRef(want) || lse.scalar_type() != at::kFloat ||
      lse.device() != q.device())
    fail("lse: expected float32 of shape " + c10::str(at::IntArrayRef(want)) + (dense ? " (batch, heads, q_len)" : " (heads, total_q)") +
         " on " + q.device().str());
}

// `values` in the strides at::empty_like(like) has (what the Meta kernels promise).
at::Tensor in_layout_of(const at::Tensor& like, const at::Tensor& values) {
  at::Tensor r = at::empty_like(like, values.options());
  if (r.strides() == values.strides()) return values;
  r.copy_(values);
  return r;
}

// ---- CPU: the dense layout through the packed kernels.

at::Tensor pack(const at::Tensor& t) {  // (batch, heads, seq, dim) -> (batch * seq, heads, dim)
  return t.transpose(1, 2).reshape({t.size(0) * t.size(2), t.size(1), t.size(3)});
}
at::Tensor unpack(const at::Tensor& t, int64_t batch) {
  return t.view({batch, t.size(0) / batch, t.size(1), t.size(2)}).transpose(1, 2);
}
Problem dense_problem(const at::Tensor& q, const at::Tensor& k, bool causal, std::optional<double> scale) {
  Problem p;
  for (int64_t b = 0; b <= q.size(0); ++b) p.q_offsets.push_back(b * q.size(2)), p.k_offsets.push_back(b * k.size(2));
  p.heads = q.size(1), p.kv_heads = k.size(1), p.dim = q.size(3), p.causal = causal, p.scale = scale_of(p.dim, scale);
  return p;
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& cu_q,
                                               const std::optional<at::Tensor>& cu_k, bool causal,
                                               std::optional<double> scale, bool dense) {
  if (!dense) {
    auto [out, lse] = forward_packed(q, k, v, problem_of(q, k, *cu_q, *cu_k, causal, scale));
    return {in_layout_of(q, out), lse};
  }
  const int64_t batch = q.size(0), heads = q.size(1), lq = q.size(2);
  auto [out, lse] = forward_packed(pack(q), pack(k), pack(v), dense_problem(q, k, causal, scale));
  return {in_layout_of(q, unpack(out, batch)), lse.view({heads, batch, lq}).transpose(0, 1).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            const std::optional<at::Tensor>& cu_q,
                                                            const std::optional<at::Tensor>& cu_k, bool causal,
                                                            std::optional<double> scale, bool dense) {
  if (!dense) {
    auto [dq, dk, dv] = backward_packed(dout, q, k, v, out, lse, problem_of(q, k, *cu_q, *cu_k, causal, scale));
    return {in_layout_of(q, dq), in_layout_of(k, dk), in_layout_of(v, dv)};
  }
  const int64_t batch = q.size(0);
  const at::Tensor lse_packed = lse.transpose(0, 1).reshape({q.size(1), batch * q.size(2)});
  auto [dq, dk, dv] = backward_packed(pack(dout), pack(q), pack(k), pack(v), pack(out), lse_packed,
                                      dense_problem(q, k, causal, scale));
  return {in_layout_of(q, unpack(dq, batch)), in_layout_of(k, unpack(dk, batch)), in_layout_of(v, unpack(dv, batch))};
}

#ifdef SCALETRAIN_WITH_CUDA
// ---- CUDA

void check_launch(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("flash_attention: ") + what + ": CUDA launch failed: " +
                             cudaGetErrorString(status));
}

cuda::Strides strides_of(const at::Tensor& t, bool dense) {
  return dense ? cuda::Strides{t.stride(0), t.stride(2), t.stride(1)} : cuda::Strides{0, t.stride(0), t.stride(1)};
}
cuda::Strides lse_strides(const at::Tensor& lse, bool dense) {
  return dense ? cuda::Strides{lse.stride(0), 1, lse.stride(1)} : cuda::Strides{0, 1, lse.stride(0)};
}

// The kernels move 16-byte chunks of rows: a tensor whose data pointer or outer strides are not
// multiples of 16 bytes is copied first.
at::Tensor aligned(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.stride(i) * t.element_size()) % 16 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The kernels' shape, and the device offsets it points at.
struct CudaProblem {
  cuda::Shape shape;
  at::Tensor cu_q, cu_k;
};

CudaProblem cuda_problem(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& cu_q,
                         const std::optional<at::Tensor>& cu_k, bool causal, std::optional<double> scale, bool dense) {
  CudaProblem c;
  cuda::Shape& s = c.shape;
  int64_t batch = 0, lq = 0, lk = 0;
  if (dense) {
    batch = q.size(0), lq = q.size(2), lk = k.size(2);
  } else {
    // Read on the host to check them (a device-to-host copy when they live on the GPU; pass them
    // on the CPU to avoid that synchronisation), then copied to the device as int32.
    const Problem p = problem_of(q, k, *cu_q, *cu_k, causal, scale);
    batch = p.sequences();
    std::vector<int32_t> oq, ok;
    for (int64_t i = 0; i <= batch; ++i) {
      oq.push_back(static_cast<int32_t>(p.q_offsets[i])), ok.push_back(static_cast<int32_t>(p.k_offsets[i]));
      if (i > 0) {
        lq = std::max(lq, p.q_offsets[i] - p.q_offsets[i - 1]);
        lk = std::max(lk, p.k_offsets[i] - p.k_offsets[i - 1]);
      }
    }
    if (q.size(0) > INT32_MAX || k.size(0) > INT32_MAX)
      fail("q: " + std::to_string(q.size(0)) + " packed rows, the CUDA kernels take at most 2^31 - 1");
    const auto on_device = at::TensorOptions().dtype(at::kInt).device(q.device());
    c.cu_q = at::tensor(oq, at::kInt).to(on_device);
    c.cu_k = at::tensor(ok, at::kInt).to(on_device);
    s.cu_q = c.cu_q.const_data_ptr<int32_t>();
    s.cu_k = c.cu_k.const_data_ptr<int32_t>();
  }
  if (batch > 65535) fail("q: batch " + std::to_string(batch) + ", the CUDA kernels take at most 65535 sequences");
  if (q.size(1) > 65535) fail("q: " + std::to_string(q.size(1)) + " heads, the CUDA kernels take at most 65535");
  if (lq > INT32_MAX || lk > INT32_MAX) fail("q: sequence longer than 2^31 - 1 rows");
  s.batch = static_cast<int>(batch), s.heads = static_cast<int>(q.size(1)), s.kv_heads = static_cast<int>(k.size(1));
  s.dim = static_cast<int>(q.size(-1)), s.q_len = static_cast<int>(lq), s.k_len = static_cast<int>(lk);
  s.causal = causal, s.scale = scale_of(q.size(-1), scale);
  if (!(s.scale > 0.f)) fail("scale: got " + std::to_string(s.scale) + ", the CUDA kernels take a positive scale");
  return c;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const std::optional<at::Tensor>& cu_q,
                                                const std::optional<at::Tensor>& cu_k, bool causal,
                                                std::optional<double> scale, bool dense) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const CudaProblem c = cuda_problem(q_in, k_in, cu_q, cu_k, causal, scale, dense);
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  at::Tensor out = at::empty_like(q_in);
  at::Tensor lse = at::empty(lse_shape(q, dense), q.options().dtype(at::kFloat));
  const cuda::ForwardArgs args{q.const_data_ptr(), k.const_data_ptr(),     v.const_data_ptr(),
                               strides_of(q, dense), strides_of(k, dense), strides_of(v, dense),
                               out.data_ptr(),      strides_of(out, dense), lse.data_ptr<float>(),
                               lse_strides(lse, dense)};
  check_launch(cuda::launch_forward(core::dtype_of(q), c.shape, args, c10::cuda::getCurrentCUDAStream().stream()),
               "forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, bool causal, std::optional<double> scale, bool dense) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const CudaProblem c = cuda_problem(q_in, k_in, cu_q, cu_k, causal, scale, dense);
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), out = aligned(out_in),
                   dout = aligned(dout_in);
  const at::Tensor lse = lse_in.stride(-1) == 1 ? lse_in : lse_in.contiguous();
  at::Tensor delta = at::empty_like(lse);
  // torch.use_deterministic_algorithms(True): dq from a kernel of its own instead of atomics.
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor dq_accum, dq;
  if (deterministic) dq = at::empty_like(q_in);
  else dq_accum = at::zeros_like(q_in, q_in.options().dtype(at::kFloat));
  at::Tensor dk = at::empty_like(k_in), dv = at::empty_like(v_in);
  const at::Tensor& dq_like = deterministic ? dq : dq_accum;
  const cuda::BackwardArgs args{q.const_data_ptr(),
                                k.const_data_ptr(),
                                v.const_data_ptr(),
                                out.const_data_ptr(),
                                dout.const_data_ptr(),
                                strides_of(q, dense),
                                strides_of(k, dense),
                                strides_of(v, dense),
                                strides_of(out, dense),
                                strides_of(dout, dense),
                                lse.const_data_ptr<float>(),
                                delta.data_ptr<float>(),
                                lse_strides(lse, dense),
                                deterministic ? nullptr : dq_accum.data_ptr<float>(),
                                strides_of(dq_like, dense),
                                deterministic ? dq.data_ptr() : nullptr,
                                strides_of(dq_like, dense),
                                dk.data_ptr(),
                                dv.data_ptr(),
                                strides_of(dk, dense),
                                strides_of(dv, dense)};
  check_launch(cuda::launch_backward(core::dtype_of(q), c.shape, args, deterministic,
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "backward");
  if (deterministic) return {dq, dk, dv};
  return {dq_accum.mul_(c.shape.scale).to(q_in.scalar_type()), dk, dv};
}
#endif

// Autograd over both layouts (no cu_seqlens: dense).
class FlashAttentionFunction : public torch::autograd::Function<FlashAttentionFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& cu_q,
                            const std::optional<at::Tensor>& cu_k, bool causal, std::optional<double> scale) {
    auto [out, lse] = flash_attention_forward(q, k, v, cu_q, cu_k, causal, scale);
    ctx->save_for_backward({q, k, v, out, lse, cu_q.value_or(at::Tensor()), cu_k.value_or(at::Tensor())});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale.has_value() ? *scale : std::numeric_limits<double>::quiet_NaN();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const double s = ctx->saved_data["scale"].toDouble();
    const at::Tensor dout = grads[0].stride(-1) == 1 ? grads[0] : grads[0].contiguous();
    auto [dq, dk, dv] = flash_attention_backward(dout, saved[0], saved[1], saved[2], saved[3], saved[4],
                                                 optional(saved[5]), optional(saved[6]),
                                                 ctx->saved_data["causal"].toBool(),
                                                 std::isnan(s) ? std::nullopt : std::optional<double>(s));
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }

 private:
  static std::optional<at::Tensor> optional(const at::Tensor& t) {
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  }
};

}  // namespace

bool cuda_supports_head_dim(int64_t head_dim) {
#ifdef SCALETRAIN_WITH_CUDA
  return head_dim <= INT32_MAX && cuda::supports_head_dim(static_cast<int>(head_dim));
#else
  (void)head_dim;
  return false;
#endif
}

bool cuda_hopper_kernels() {
#ifdef SCALETRAIN_WITH_CUDA
  return cuda::hopper_kernels_enabled();
#else
  return false;
#endif
}

std::string cuda_last_forward_kernel() {
#ifdef SCALETRAIN_WITH_CUDA
  const char* name = cuda::last_forward_kernel();
  return name == nullptr ? std::string() : std::string(name);
#else
  return {};
#endif
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v,
                                                           const std::optional<at::Tensor>& cu_seqlens_q,
                                                           const std::optional<at::Tensor>& cu_seqlens_k, bool causal,
                                                           std::optional<double> scale) {
  const bool dense = is_dense(cu_seqlens_q, cu_seqlens_k);
  check_inputs(q, k, v, dense);
  at::NoGradGuard no_grad;
#ifdef SCALETRAIN_WITH_CUDA
  if (q.is_cuda()) return forward_cuda(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dense);
#endif
  return forward_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, dense);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, bool causal, std::optional<double> scale) {
  const bool dense = is_dense(cu_seqlens_q, cu_seqlens_k);
  check_inputs(q, k, v, dense);
  check_backward_inputs(dout, q, out, lse, dense);
  at::NoGradGuard no_grad;
#ifdef SCALETRAIN_WITH_CUDA
  if (q.is_cuda()) return backward_cuda(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, scale, dense);
#endif
  return backward_cpu(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, scale, dense);
}

at::Tensor flash_attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, bool causal,
                                  std::optional<double> scale) {
  if (!cu_seqlens_q.defined()) fail("cu_seqlens_q: undefined tensor");
  if (!cu_seqlens_k.defined()) fail("cu_seqlens_k: undefined tensor");
  return FlashAttentionFunction::apply(q, k, v, std::optional<at::Tensor>(cu_seqlens_q),
                                       std::optional<at::Tensor>(cu_seqlens_k), causal, scale);
}

at::Tensor flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                           std::optional<double> scale) {
  check_inputs(q, k, v, true);
  return FlashAttentionFunction::apply(q, k, v, std::optional<at::Tensor>(), std::optional<at::Tensor>(), causal,
                                       scale);
}

}  // namespace scaletrain::attention
