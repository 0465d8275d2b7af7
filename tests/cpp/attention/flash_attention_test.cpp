// Flash attention on the CPU and (on a machine with one) the GPU. Reference: attention in fp64
// (softmax(q k^T * scale) v with the causal mask, autograd for the gradients). Our error against it
// must stay within twice the error of torch's own scaled_dot_product_attention on the same inputs
// (its CPU flash kernel; on CUDA the backend torch picks: flash where its constraints allow), plus a
// floor of one rounding (in the dtype) of the largest value; the varlen entry must equal the dense
// one sequence by sequence.
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include "scaletrain/attention/flash_attention.h"
#include "test_util.h"

namespace scaletrain::attention {
namespace {

struct Grads {
  at::Tensor out, dq, dk, dv;
};

// The causal mask aligned bottom right: query i sees keys j <= i + k_len - q_len.
at::Tensor causal_mask(int64_t lq, int64_t lk, at::Device device = at::kCPU) {
  return at::ones({lq, lk}, at::TensorOptions().dtype(at::kBool).device(device)).tril(lk - lq);
}

Grads run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
          const std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>& f) {
  auto qq = q.detach().clone().requires_grad_(true), kk = k.detach().clone().requires_grad_(true),
       vv = v.detach().clone().requires_grad_(true);
  auto out = f(qq, kk, vv);
  auto grads = torch::autograd::grad({out}, {qq, kk, vv}, {dout.to(out.scalar_type())});
  return {out.detach(), grads[0], grads[1], grads[2]};
}

at::Tensor fp64_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale) {
  const int64_t group = q.size(1) / k.size(1), lq = q.size(2), lk = k.size(2);
  const auto kk = k.repeat_interleave(group, 1), vv = v.repeat_interleave(group, 1);
  auto s = at::matmul(q, kk.transpose(-2, -1)) * scale;
  if (causal) s = s.masked_fill(causal_mask(lq, lk, q.device()).logical_not(), -INFINITY);
  auto p = at::softmax(s, -1);
  if (causal && lq > lk) p = p.nan_to_num(0.0);  // a query without keys: no weights
  return at::matmul(p, vv);
}

double max_err(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble) - want).abs().max().item<double>();
}

struct Case {
  int64_t batch, heads, kv_heads, lq, lk, dim;
  bool causal;
  at::ScalarType dtype;
  at::Device device = at::kCPU;
};

std::string describe(const Case& c) {
  return "B" + std::to_string(c.batch) + " H" + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) + " q" +
         std::to_string(c.lq) + " k" + std::to_string(c.lk) + " d" + std::to_string(c.dim) +
         (c.causal ? " causal " : " ") + std::string(c.dtype == at::kFloat ? "fp32" : c.dtype == at::kHalf ? "fp16" : "bf16");
}

// Ours and torch's SDPA against fp64: out, dq, dk, dv each within 2x torch's error + a floor.
void check_against_fp64(const Case& c) {
  SCOPED_TRACE(describe(c));
  at::manual_seed(static_cast<uint64_t>(c.lq * 31 + c.lk + c.heads));
  const auto o = at::TensorOptions().dtype(c.dtype).device(c.device);
  const auto q = at::randn({c.batch, c.heads, c.lq, c.dim}, o), k = at::randn({c.batch, c.kv_heads, c.lk, c.dim}, o),
             v = at::randn({c.batch, c.kv_heads, c.lk, c.dim}, o);
  const auto dout = at::randn({c.batch, c.heads, c.lq, c.dim}, o);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const Grads ours = run(q, k, v, dout, [&](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, c.causal); });
  const Grads exact = run(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), dout.to(at::kDouble),
                          [&](auto& a, auto& b, auto& d) { return fp64_attention(a, b, d, c.causal, scale); });
  const bool same_length = c.lq == c.lk;
  const Grads torch_sdpa = run(q, k, v, dout, [&](auto& a, auto& b, auto& d) {
    const auto mask =
        c.causal && !same_length ? std::optional<at::Tensor>(causal_mask(c.lq, c.lk, c.device)) : std::nullopt;
    if (c.device.is_cuda() && c.heads != c.kv_heads) {  // CUDA SDPA's flash kernel takes equal head counts
      const int64_t g = c.heads / c.kv_heads;
      return at::scaled_dot_product_attention(a, b.repeat_interleave(g, 1), d.repeat_interleave(g, 1), mask, 0.0,
                                              c.causal && same_length);
    }
    return at::scaled_dot_product_attention(a, b, d, mask, 0.0, c.causal && same_length, std::nullopt,
                                            /*enable_gqa=*/c.heads != c.kv_heads);
  });
  const double eps = c.dtype == at::kFloat ? 1.2e-7 : c.dtype == at::kHalf ? 9.8e-4 : 7.9e-3;
  const char* names[4] = {"out", "dq", "dk", "dv"};
  const at::Tensor Grads::*fields[4] = {&Grads::out, &Grads::dq, &Grads::dk, &Grads::dv};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& want = exact.*fields[i];
    const double ours_err = max_err(ours.*fields[i], want), torch_err = max_err(torch_sdpa.*fields[i], want);
    const double floor = eps * want.abs().max().item<double>();  // one rounding of the largest value
    EXPECT_LE(ours_err, 2 * torch_err + floor) << names[i] << ": ours " << ours_err << ", torch SDPA " << torch_err;
    if (std::getenv("SCALETRAIN_PRINT_ERRORS"))
      std::printf("%-40s %-4s ours %.3g torch %.3g floor %.3g\n", describe(c).c_str(), names[i], ours_err, torch_err, floor);
    EXPECT_EQ((ours.*fields[i]).scalar_type(), c.dtype) << names[i];
  }
}

TEST(FlashAttention, CpuWithinTwiceTorchSdpaErrorOfFp64) {
  const at::ScalarType f32 = at::kFloat, bf16 = at::kBFloat16;
  for (bool causal : {false, true}) {
    for (const Case& c : std::vector<Case>{{2, 4, 2, 17, 17, 64, causal, f32},
                                           {1, 2, 1, 127, 127, 128, causal, f32},
                                           {3, 2, 2, 1, 127, 64, causal, f32},
                                           {1, 2, 2, 127, 1000, 64, causal, f32},
                                           {4, 4, 4, 17, 17, 32, causal, bf16},
                                           {1, 4, 1, 127, 127, 64, causal, bf16},
                                           {2, 2, 2, 33, 33, 96, causal, at::kHalf}})
      check_against_fp64(c);
  }
}

TEST(FlashAttention, CpuLongSequences) {
  check_against_fp64({1, 1, 1, 1000, 1000, 64, false, at::kFloat});
  check_against_fp64({1, 1, 1, 4097, 4097, 64, true, at::kFloat});
}

// q_len > k_len with causal: the first q_len - k_len queries see no key: zero output, no gradient.
TEST(FlashAttention, CpuQueriesWithoutKeysGetZeros) {
  at::manual_seed(3);
  const auto q = at::randn({1, 2, 40, 16}), k = at::randn({1, 2, 25, 16}), v = at::randn({1, 2, 25, 16});
  const auto dout = at::randn({1, 2, 40, 16});
  const Grads ours = run(q, k, v, dout, [](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, true); });
  const Grads exact = run(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), dout.to(at::kDouble),
                          [](auto& a, auto& b, auto& d) { return fp64_attention(a, b, d, true, 0.25); });
  EXPECT_EQ(ours.out.narrow(2, 0, 15).abs().max().item<float>(), 0.f);
  EXPECT_EQ(ours.dq.narrow(2, 0, 15).abs().max().item<float>(), 0.f);
  EXPECT_LE(max_err(ours.out, exact.out), 1e-5);
  EXPECT_LE(max_err(ours.dq, exact.dq), 1e-5);
  EXPECT_LE(max_err(ours.dk, exact.dk), 1e-5);
  EXPECT_LE(max_err(ours.dv, exact.dv), 1e-5);
}

TEST(FlashAttention, CpuScaleOption) {
  at::manual_seed(4);
  const auto q = at::randn({2, 2, 20, 8}), k = at::randn({2, 2, 30, 8}), v = at::randn({2, 2, 30, 8});
  const auto ours = flash_attention(q, k, v, false, 0.7);
  const auto exact = fp64_attention(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), false, 0.7);
  EXPECT_LE(max_err(ours, exact), 1e-5);
  EXPECT_GT(max_err(flash_attention(q, k, v, false), exact), 1e-3);  // the default scale differs
}

// Packed sequences of different lengths (one empty) equal the dense call on each, bit for bit.
TEST(FlashAttention, CpuVarlenEqualsDensePerSequence) {
  at::manual_seed(5);
  const std::vector<int64_t> lq = {5, 0, 33, 64, 65}, lk = {7, 3, 33, 1, 130};
  std::vector<int64_t> cu_q = {0}, cu_k = {0};
  for (size_t i = 0; i < lq.size(); ++i) cu_q.push_back(cu_q.back() + lq[i]), cu_k.push_back(cu_k.back() + lk[i]);
  const auto q = at::randn({cu_q.back(), 4, 32}), k = at::randn({cu_k.back(), 2, 32}), v = at::randn({cu_k.back(), 2, 32});
  const auto dout = at::randn({cu_q.back(), 4, 32});
  for (bool causal : {false, true}) {
    const Grads packed = run(q, k, v, dout, [&](auto& a, auto& b, auto& d) {
      return flash_attention_varlen(a, b, d, at::tensor(cu_q, at::kInt), at::tensor(cu_k), causal);
    });
    for (size_t i = 0; i < lq.size(); ++i) {
      if (lq[i] == 0 || lk[i] == 0) continue;
      SCOPED_TRACE("sequence " + std::to_string(i) + (causal ? " causal" : ""));
      const auto dense = [&](const at::Tensor& t, const std::vector<int64_t>& cu) {
        return t.narrow(0, cu[i], cu[i + 1] - cu[i]).transpose(0, 1).unsqueeze(0);
      };
      const Grads one = run(dense(q, cu_q), dense(k, cu_k), dense(v, cu_k), dense(dout, cu_q),
                            [&](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, causal); });
      EXPECT_TRUE(at::equal(dense(packed.out, cu_q), one.out));
      EXPECT_TRUE(at::equal(dense(packed.dq, cu_q), one.dq));
      EXPECT_TRUE(at::equal(dense(packed.dk, cu_k), one.dk));
      EXPECT_TRUE(at::equal(dense(packed.dv, cu_k), one.dv));
    }
  }
}

// ---- CUDA kernels (skipped without a GPU)

TEST(FlashAttention, CudaWithinTwiceTorchSdpaErrorOfFp64) {
  SCALETRAIN_REQUIRE_CUDA();
  const at::Device gpu(at::kCUDA);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf})
    for (int64_t dim : {64, 128})
      for (bool causal : {false, true})
        for (const Case& c : std::vector<Case>{{1, 2, 2, 1, 1, dim, causal, dtype, gpu},
                                               {2, 4, 2, 17, 17, dim, causal, dtype, gpu},
                                               {3, 4, 4, 127, 127, dim, causal, dtype, gpu},
                                               {4, 2, 1, 1000, 1000, dim, causal, dtype, gpu},
                                               {1, 2, 2, 17, 1000, dim, causal, dtype, gpu},
                                               {2, 2, 2, 1000, 127, dim, false, dtype, gpu}})
          check_against_fp64(c);
}

TEST(FlashAttention, CudaLongSequences) {
  SCALETRAIN_REQUIRE_CUDA();
  const at::Device gpu(at::kCUDA);
  for (bool causal : {false, true}) {
    check_against_fp64({1, 2, 2, 4097, 4097, 64, causal, at::kBFloat16, gpu});
    check_against_fp64({2, 4, 1, 4097, 4097, 128, causal, at::kHalf, gpu});
  }
}

// An environment variable (SCALETRAIN_FLASH_SM90 unless named) set for a scope (the kernels read
// it at each call), restored after.
class KernelEnv {
 public:
  explicit KernelEnv(const char* value, const char* name = "SCALETRAIN_FLASH_SM90") : name_(name) {
    if (const char* old = std::getenv(name_)) old_ = old;
    ::setenv(name_, value, 1);
  }
  ~KernelEnv() { old_ ? (void)::setenv(name_, old_->c_str(), 1) : (void)::unsetenv(name_); }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// Packed sequences (one empty, lengths across tile edges) against the dense call on each sequence:
// out, dk and dv bit for bit (the same tiles in the same order: on Hopper the dense forward runs
// the cp.async kernel that packed sequences take); dq to rounding, since its tiles are added with
// atomics in an order that varies.
TEST(FlashAttention, CudaVarlenEqualsDensePerSequence) {
  SCALETRAIN_REQUIRE_CUDA();
  at::manual_seed(6);
  const std::vector<int64_t> lq = {5, 0, 129, 64, 300}, lk = {7, 3, 129, 1, 257};
  std::vector<int64_t> cu_q = {0}, cu_k = {0};
  for (size_t i = 0; i < lq.size(); ++i) cu_q.push_back(cu_q.back() + lq[i]), cu_k.push_back(cu_k.back() + lk[i]);
  const auto o = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  const auto q = at::randn({cu_q.back(), 4, 64}, o), k = at::randn({cu_k.back(), 2, 64}, o),
             v = at::randn({cu_k.back(), 2, 64}, o), dout = at::randn({cu_q.back(), 4, 64}, o);
  const KernelEnv same_forward("cpasync", "SCALETRAIN_FLASH_SM90_FORWARD");
  for (bool causal : {false, true}) {
    const Grads packed = run(q, k, v, dout, [&](auto& a, auto& b, auto& d) {
      return flash_attention_varlen(a, b, d, at::tensor(cu_q, at::kInt).cuda(), at::tensor(cu_k), causal);
    });
    for (size_t i = 0; i < lq.size(); ++i) {
      const auto dense = [&](const at::Tensor& t, const std::vector<int64_t>& cu) {
        return t.narrow(0, cu[i], cu[i + 1] - cu[i]).transpose(0, 1).unsqueeze(0);
      };
      if (lq[i] == 0 || lk[i] == 0) continue;
      SCOPED_TRACE("sequence " + std::to_string(i) + (causal ? " causal" : ""));
      const Grads one = run(dense(q, cu_q), dense(k, cu_k), dense(v, cu_k), dense(dout, cu_q),
                            [&](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, causal); });
      EXPECT_TRUE(at::equal(dense(packed.out, cu_q), one.out));
      EXPECT_TRUE(at::equal(dense(packed.dk, cu_k), one.dk));
      EXPECT_TRUE(at::equal(dense(packed.dv, cu_k), one.dv));
      EXPECT_LE(max_err(dense(packed.dq, cu_q), one.dq.to(at::kDouble)), 2e-2 * one.dq.abs().max().item<double>());
    }
    EXPECT_EQ(packed.dk.narrow(0, cu_k[1], lk[1]).abs().max().item<float>(), 0.f);  // keys of an empty query set
  }
}

// Strided views are read in place and give the contiguous call's results; rows whose stride is not
// a multiple of 16 bytes are copied first and give them too.
TEST(FlashAttention, CudaStridedAndMisalignedInputs) {
  SCALETRAIN_REQUIRE_CUDA();
  at::manual_seed(7);
  const auto o = at::TensorOptions().dtype(at::kHalf).device(at::kCUDA);
  const auto bshd = at::randn({2, 300, 3, 4, 64}, o);  // (batch, seq, q|k|v, heads, dim), as a qkv projection
  const auto q = bshd.select(2, 0).transpose(1, 2), k = bshd.select(2, 1).transpose(1, 2),
             v = bshd.select(2, 2).transpose(1, 2);
  const auto dout = at::randn({2, 4, 300, 64}, o);
  const Grads strided = run(q, k, v, dout, [](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, true); });
  const Grads dense = run(q.contiguous(), k.contiguous(), v.contiguous(), dout,
                          [](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, true); });
  EXPECT_TRUE(at::equal(strided.out, dense.out));
  EXPECT_EQ(strided.out.strides(), at::empty_like(q).strides());  // what the Meta kernel promises
  EXPECT_TRUE(at::equal(strided.dk, dense.dk));
  EXPECT_TRUE(at::equal(strided.dv, dense.dv));
  EXPECT_TRUE(at::allclose(strided.dq, dense.dq, 1e-2, 1e-2));
  const auto wide = at::randn({2, 4, 300, 68}, o).narrow(3, 0, 64);  // rows 136 bytes apart
  wide.copy_(q);
  const Grads odd = run(wide, k, v, dout, [](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, true); });
  EXPECT_TRUE(at::equal(odd.out, dense.out));
  // A (batch, seq, heads, dim) buffer seen as (batch, heads, seq, dim): out keeps that layout.
  const auto bshd_q = q.transpose(1, 2).contiguous().transpose(1, 2);
  const auto out = flash_attention(bshd_q, k, v, true);
  EXPECT_EQ(out.strides(), bshd_q.strides());
  EXPECT_TRUE(at::equal(out, dense.out));
}


// On a Hopper GPU the forward and backward run the wgmma kernels (the tests above check them
// against fp64); the portable mma.sync kernels, which other GPUs run, are checked here on the same
// grid with the Hopper kernels switched off.
TEST(FlashAttention, CudaPortableKernelsOnHopperWithinTwiceTorchSdpaErrorOfFp64) {
  SCALETRAIN_REQUIRE_CUDA();
  if (!cuda_hopper_kernels()) GTEST_SKIP() << "not a Hopper GPU (or a build without sm_90): the tests above ran it";
  const KernelEnv portable("0");
  ASSERT_FALSE(cuda_hopper_kernels());
  const at::Device gpu(at::kCUDA);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf})
    for (int64_t dim : {64, 128})
      for (bool causal : {false, true})
        for (const Case& c : std::vector<Case>{{2, 4, 2, 17, 17, dim, causal, dtype, gpu},
                                               {4, 2, 1, 1000, 1000, dim, causal, dtype, gpu},
                                               {1, 2, 2, 17, 1000, dim, causal, dtype, gpu},
                                               {2, 2, 2, 1000, 127, dim, false, dtype, gpu}})
          check_against_fp64(c);
}

// Each Hopper forward (SCALETRAIN_FLASH_SM90_FORWARD: the copy-engine kernel on a persistent grid or
// a block per work item, with two or, at head_dim 64, three consumer warpgroups
// (SCALETRAIN_FLASH_SM90_CONSUMERS); and the cp.async kernel) against the portable forward: odd
// lengths, GQA, a query block longer than its keys (rows that see no key, also in persistent
// blocks that take several work items), more work items than multiprocessors, a (batch, seq,
// heads, dim) layout, a batch of one, and expanded keys and values (the cp.async kernel). Each call
// checks which kernel ran (cuda_last_forward_kernel).
TEST(FlashAttention, CudaHopperForwardsMatchPortable) {
  SCALETRAIN_REQUIRE_CUDA();
  if (!cuda_hopper_kernels()) GTEST_SKIP() << "not a Hopper GPU (or a build without sm_90)";
  enum Layout { bhsd, bshd, expanded_kv };
  struct Shape {
    int64_t batch, heads, kv_heads, lq, lk;
    Layout layout;
  };
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf})
    for (int64_t dim : {64, 128})
      for (bool causal : {false, true})
        for (const Shape& sh : std::vector<Shape>{{2, 4, 2, 300, 77, bhsd},
                                                  {2, 4, 2, 513, 1030, bshd},
                                                  {3, 16, 4, 1000, 1000, bhsd},
                                                  {4, 32, 8, 1000, 300, bhsd},
                                                  {1, 2, 1, 1, 129, bshd},
                                                  {2, 4, 2, 300, 300, expanded_kv}}) {
          SCOPED_TRACE("B" + std::to_string(sh.batch) + " q" + std::to_string(sh.lq) + " k" + std::to_string(sh.lk) +
                       " d" + std::to_string(dim) + (causal ? " causal" : "") + " layout " +
                       std::to_string(sh.layout));
          at::manual_seed(sh.lq + sh.lk + dim);
          const auto o = at::TensorOptions().dtype(dtype).device(at::kCUDA);
          const auto make = [&](int64_t heads, int64_t len) {
            return sh.layout == bshd ? at::randn({sh.batch, len, heads, dim}, o).transpose(1, 2)
                                     : at::randn({sh.batch, heads, len, dim}, o);
          };
          // expanded_kv: one key/value head seen as kv_heads (head stride 0), which the copy engine
          // cannot take: the cp.async kernel runs.
          const auto kv = [&](int64_t len) {
            return sh.layout == expanded_kv ? make(1, len).expand({sh.batch, sh.kv_heads, len, dim})
                                            : make(sh.kv_heads, len);
          };
          const auto q = make(sh.heads, sh.lq), k = kv(sh.lk), v = kv(sh.lk);
          at::Tensor out0, lse0;
          {
            const KernelEnv portable("0");
            std::tie(out0, lse0) = flash_attention_forward(q, k, v, std::nullopt, std::nullopt, causal, std::nullopt);
          }
          const auto seen = lse0.isfinite();
          const double eps = dtype == at::kHalf ? 9.8e-4 : 7.9e-3;
          for (const auto& [variant, consumers] : std::vector<std::pair<const char*, const char*>>{
                   {"persistent", "2"}, {"blocks", "2"}, {"persistent", "3"}, {"blocks", "3"}, {"cpasync", "2"}}) {
            if (dim == 128 && std::string(consumers) == "3") continue;  // head_dim 64 only
            SCOPED_TRACE(std::string(variant) + ", " + consumers + " consumer warpgroups");
            const KernelEnv forward(variant, "SCALETRAIN_FLASH_SM90_FORWARD");
            const KernelEnv warpgroups(consumers, "SCALETRAIN_FLASH_SM90_CONSUMERS");
            const auto [out, lse] = flash_attention_forward(q, k, v, std::nullopt, std::nullopt, causal, std::nullopt);
            const bool copy_engine = std::string(variant) != "cpasync" && sh.layout != expanded_kv;
            EXPECT_EQ(cuda_last_forward_kernel(),
                      copy_engine ? std::string(variant) + "/" + (dim == 64 ? consumers : "2") : std::string("cpasync"));
            EXPECT_LE(max_err(out, out0.to(at::kDouble)), 2 * eps * out0.abs().max().item<double>());
            EXPECT_TRUE(at::equal(seen, lse.isfinite()));
            EXPECT_LE(max_err(lse.masked_fill(seen.logical_not(), 0), lse0.masked_fill(seen.logical_not(), 0).to(at::kDouble)),
                      1e-4);
          }
        }
}

// The two kernel sets on one input (odd lengths, GQA, a query block longer than the keys): outputs
// and gradients within a rounding of each other, log-sum-exps within fp32 noise; rows without keys
// zero in both.
TEST(FlashAttention, CudaHopperKernelsMatchPortable) {
  SCALETRAIN_REQUIRE_CUDA();
  if (!cuda_hopper_kernels()) GTEST_SKIP() << "not a Hopper GPU (or a build without sm_90)";
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf})
    for (int64_t dim : {64, 128})
      for (bool causal : {false, true})
        for (const auto& [lq, lk] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {300, 77}, {513, 1030}, {4097, 4097}}) {
          SCOPED_TRACE("q" + std::to_string(lq) + " k" + std::to_string(lk) + " d" + std::to_string(dim) +
                       (causal ? " causal" : ""));
          at::manual_seed(lq + lk + dim);
          const auto o = at::TensorOptions().dtype(dtype).device(at::kCUDA);
          const auto q = at::randn({2, 4, lq, dim}, o), k = at::randn({2, 2, lk, dim}, o), v = at::randn({2, 2, lk, dim}, o);
          const auto dout = at::randn({2, 4, lq, dim}, o);
          const auto attend = [&](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, causal); };
          const auto [out, lse] = flash_attention_forward(q, k, v, std::nullopt, std::nullopt, causal, std::nullopt);
          const Grads hopper = run(q, k, v, dout, attend);
          at::Tensor out0, lse0;
          Grads portable_grads;
          {
            const KernelEnv portable("0");
            std::tie(out0, lse0) = flash_attention_forward(q, k, v, std::nullopt, std::nullopt, causal, std::nullopt);
            portable_grads = run(q, k, v, dout, attend);
          }
          const double eps = dtype == at::kHalf ? 9.8e-4 : 7.9e-3;
          EXPECT_LE(max_err(out, out0.to(at::kDouble)), 2 * eps * out0.abs().max().item<double>());
          const auto seen = lse0.isfinite();
          EXPECT_TRUE(at::equal(seen, lse.isfinite()));
          EXPECT_LE(max_err(lse.masked_fill(seen.logical_not(), 0), lse0.masked_fill(seen.logical_not(), 0).to(at::kDouble)),
                    1e-4);
          const char* names[3] = {"dq", "dk", "dv"};
          const at::Tensor Grads::*fields[3] = {&Grads::dq, &Grads::dk, &Grads::dv};
          for (int i = 0; i < 3; ++i) {
            const at::Tensor& want = portable_grads.*fields[i];
            EXPECT_LE(max_err(hopper.*fields[i], want.to(at::kDouble)), 2 * eps * want.abs().max().item<double>())
                << names[i];
          }
        }
}

// torch.use_deterministic_algorithms: dq from its own kernel (no atomics), every gradient bit for bit
// the same on a second run, and as accurate as the default path.
TEST(FlashAttention, CudaDeterministicBackward) {
  SCALETRAIN_REQUIRE_CUDA();
  struct Restore {
    ~Restore() { at::globalContext().setDeterministicAlgorithms(false, false); }
  } restore;
  at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);  // torch's SDPA only warns
  const at::Device gpu(at::kCUDA);
  for (int64_t dim : {64, 128})
    for (bool causal : {false, true}) {
      check_against_fp64({2, 4, 2, 1000, 1000, dim, causal, at::kBFloat16, gpu});
      check_against_fp64({1, 2, 2, 127, 1000, dim, causal, at::kHalf, gpu});
      at::manual_seed(8);
      const auto o = at::TensorOptions().dtype(at::kBFloat16).device(gpu);
      const auto q = at::randn({2, 4, 777, dim}, o), k = at::randn({2, 2, 777, dim}, o),
                 v = at::randn({2, 2, 777, dim}, o), dout = at::randn({2, 4, 777, dim}, o);
      const auto f = [&](auto& a, auto& b, auto& d) { return flash_attention(a, b, d, causal); };
      const Grads first = run(q, k, v, dout, f), second = run(q, k, v, dout, f);
      EXPECT_TRUE(at::equal(first.dq, second.dq));
      EXPECT_TRUE(at::equal(first.dk, second.dk));
      EXPECT_TRUE(at::equal(first.dv, second.dv));
      at::globalContext().setDeterministicAlgorithms(false, false);
      const Grads atomic = run(q, k, v, dout, f);
      at::globalContext().setDeterministicAlgorithms(true, true);
      EXPECT_TRUE(at::equal(first.dk, atomic.dk));  // dK and dV: the same kernels either way
      EXPECT_TRUE(at::equal(first.dv, atomic.dv));
      EXPECT_LE(max_err(first.dq, atomic.dq.to(at::kDouble)), 2e-2 * atomic.dq.abs().max().item<double>());
    }
}

TEST(FlashAttention, CudaRejectsWhatTheKernelsDoNotTake) {
  SCALETRAIN_REQUIRE_CUDA();
  const auto o = at::TensorOptions().device(at::kCUDA);
  const auto q = at::randn({1, 2, 8, 64}, o);
  const auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message([&] { flash_attention(q, q, q); }).find("q: dtype Float on cuda:0, the CUDA kernels take bfloat16 or float16"),
            std::string::npos);
  const auto h = at::randn({1, 2, 8, 96}, o.dtype(at::kHalf));
  EXPECT_NE(message([&] { flash_attention(h, h, h); }).find("q: head_dim 96 on cuda:0, the CUDA kernels take 64 or 128"),
            std::string::npos);
  EXPECT_NE(message([&] { flash_attention(q.to(at::kHalf), q.to(at::kHalf).cpu(), q.to(at::kHalf)); }).find("k: on cpu, q is on cuda:0"),
            std::string::npos);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(FlashAttention, RejectsBadInputsByName) {
  const auto q = at::randn({1, 4, 8, 16}), k = at::randn({1, 2, 8, 16}), v = at::randn({1, 2, 8, 16});
  const auto expect = [](const std::function<void()>& f, const std::string& needle) {
    const std::string message = error_of(f);
    EXPECT_NE(message.find(needle), std::string::npos) << "got: '" << message << "', expected: '" << needle << "'";
  };
  expect([&] { flash_attention(q, k.to(at::kBFloat16), v); }, "k: dtype BFloat16, q is Float");
  expect([&] { flash_attention(q.to(at::kDouble), k, v); }, "q: dtype Double, expected float32, bfloat16 or float16");
  expect([&] { flash_attention(q, k, v.to(at::kMeta)); }, "v: on meta, q is on cpu");
  expect([&] { flash_attention(q, at::randn({1, 3, 8, 16}), at::randn({1, 3, 8, 16})); }, "3 heads do not divide q's 4");
  expect([&] { flash_attention(at::randn({1, 4, 8, 300}), at::randn({1, 2, 8, 300}), at::randn({1, 2, 8, 300})); },
         "q: head_dim 300, expected at most 256");
  expect([&] { flash_attention(q, k, at::randn({1, 2, 8, 8})); }, "k, v: head_dim 16 and 8, expected q's 16");
  expect([&] { flash_attention(at::randn({1, 4, 0, 16}), k, v); }, "q: empty tensor");
  expect([&] { flash_attention(at::randn({1, 4, 16, 8}).transpose(2, 3), k, v); }, "q: head_dim stride 8, expected 1");
  expect([&] { flash_attention(q, k, at::randn({1, 2, 9, 16})); }, "v: shape [1, 2, 9, 16], expected k's [1, 2, 8, 16]");
  expect([&] { flash_attention(q.squeeze(0), k, v); }, "q: 3 dimensions, expected 4 (batch, heads, seq, head_dim)");
  const auto pq = at::randn({10, 4, 16}), pk = at::randn({6, 2, 16}), pv = at::randn({6, 2, 16});
  expect([&] { flash_attention_varlen(pq, pk, pv, at::tensor({0, 6, 4, 10}), at::tensor({0, 2, 4, 6})); },
         "cu_seqlens_q: decreases at index 2 (6 then 4), expected non-decreasing offsets");
  expect([&] { flash_attention_varlen(pq, pk, pv, at::tensor({0, 4, 9}), at::tensor({0, 2, 6})); },
         "cu_seqlens_q: ends at 9, expected the 10 rows of the packed tensor");
  expect([&] { flash_attention_varlen(pq, pk, pv, at::tensor({1, 4, 10}), at::tensor({0, 2, 6})); },
         "cu_seqlens_q: starts at 1, expected 0");
  expect([&] { flash_attention_varlen(pq, pk, pv, at::tensor({0, 4, 10}), at::tensor({0, 6})); },
         "cu_seqlens_k: 1 sequences, cu_seqlens_q has 2");
  expect([&] { flash_attention_varlen(pq, pk, pv, at::tensor({0.0, 10.0}), at::tensor({0, 6})); },
         "cu_seqlens_q: dtype Double, expected int32 or int64");
}

}  // namespace
}  // namespace scaletrain::attention
