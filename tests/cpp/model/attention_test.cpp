// Attention backends against an fp64 reference computed here with explicit loops.
#include <cmath>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "scaletrain/model/attention.h"
#include "test_util.h"

namespace scaletrain::model {

// Readable parameter names in test listings.
void PrintTo(AttentionBackend backend, std::ostream* os) { *os << core::enum_name(backend); }

namespace {

// softmax(q k^T / sqrt(d) with -inf where not allowed) v, in double, element by element.
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& allowed) {
  auto qd = q.to(at::kDouble).cpu(), kd = k.to(at::kDouble).cpu(), vd = v.to(at::kDouble).cpu();
  auto al = allowed.cpu().expand({q.size(0), q.size(1), q.size(2), k.size(2)}).contiguous();
  auto out = at::zeros(qd.sizes(), at::kDouble);
  auto Q = qd.accessor<double, 4>(), K = kd.accessor<double, 4>(), V = vd.accessor<double, 4>(), O = out.accessor<double, 4>();
  auto A = al.accessor<bool, 4>();
  const int64_t D = q.size(3);
  for (int64_t b = 0; b < q.size(0); ++b)
    for (int64_t h = 0; h < q.size(1); ++h)
      for (int64_t i = 0; i < q.size(2); ++i) {
        std::vector<double> s(k.size(2), -INFINITY);
        double top = -INFINITY;
        for (int64_t j = 0; j < k.size(2); ++j) {
          if (!A[b][h][i][j]) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += Q[b][h][i][d] * K[b][h][j][d];
          s[j] = dot / std::sqrt(static_cast<double>(D));
          top = std::max(top, s[j]);
        }
        double total = 0;
        for (auto& x : s) total += (x = std::exp(x - top));
        for (int64_t j = 0; j < k.size(2); ++j)
          for (int64_t d = 0; d < D; ++d) O[b][h][i][d] += s[j] / total * V[b][h][j][d];
      }
  return out;
}

at::Tensor causal(int64_t q_len, int64_t k_len) {
  auto i = at::arange(q_len).unsqueeze(1), j = at::arange(k_len).unsqueeze(0);
  return (j <= i + (k_len - q_len)).view({1, 1, q_len, k_len});
}

double relative_error(const at::Tensor& out, const at::Tensor& ref) {
  return (out.to(at::kDouble).cpu() - ref).norm().item<double>() / ref.norm().item<double>();
}

class AttentionBackends : public ::testing::TestWithParam<AttentionBackend> {};

TEST_P(AttentionBackends, MatchFp64ReferenceCausalFullAndCached) {
  at::manual_seed(1);
  for (auto [q_len, k_len] : {std::pair{17, 17}, std::pair{1, 9}, std::pair{5, 12}}) {
    auto q = at::randn({2, 3, q_len, 16}), k = at::randn({2, 3, k_len, 16}), v = at::randn({2, 3, k_len, 16});
    auto out = attention(q, k, v, GetParam(), /*causal=*/true);
    EXPECT_LT(relative_error(out, reference(q, k, v, causal(q_len, k_len))), 1e-5) << q_len << "x" << k_len;
    auto full = attention(q, k, v, GetParam(), /*causal=*/false);
    EXPECT_LT(relative_error(full, reference(q, k, v, at::ones({1, 1, q_len, k_len}, at::kBool))), 1e-5);
  }
}

TEST_P(AttentionBackends, ExplicitMaskPerBatch) {
  at::manual_seed(2);
  auto q = at::randn({2, 2, 6, 8}), k = at::randn({2, 2, 6, 8}), v = at::randn({2, 2, 6, 8});
  auto mask = at::rand({2, 1, 6, 6}) > 0.4;
  mask = mask | at::eye(6, at::kBool).view({1, 1, 6, 6});  // every query sees at least itself
  auto out = attention(q, k, v, GetParam(), true, mask);
  EXPECT_LT(relative_error(out, reference(q, k, v, mask)), 1e-5);
}

TEST_P(AttentionBackends, CudaMatchesReference) {
  SCALETRAIN_REQUIRE_CUDA();
  at::manual_seed(3);
  const bool flash = GetParam() == AttentionBackend::flash;  // its CUDA kernels take bf16 and fp16
  for (auto dtype : flash ? std::vector<at::ScalarType>{at::kBFloat16, at::kHalf}
                          : std::vector<at::ScalarType>{at::kFloat, at::kBFloat16}) {
    auto q = at::randn({2, 4, 64, 64}), k = at::randn({2, 4, 64, 64}), v = at::randn({2, 4, 64, 64});
    auto out = attention(q.to(at::kCUDA, dtype), k.to(at::kCUDA, dtype), v.to(at::kCUDA, dtype), GetParam(), true);
    // bf16 inputs: a few 1e-3 relative error; fp32 on GPU may use TF32-free paths: 1e-4.
    EXPECT_LT(relative_error(out.to(at::kFloat), reference(q, k, v, causal(64, 64))), dtype == at::kFloat ? 1e-4 : 2e-2);
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, AttentionBackends, ::testing::Values(AttentionBackend::math, AttentionBackend::sdpa,
                                                                         AttentionBackend::flash),
                         [](const auto& info) { return std::string(core::enum_name(info.param)); });

TEST(Attention, RejectsMismatchedShapes) {
  auto q = at::randn({1, 2, 4, 8}), k = at::randn({1, 2, 4, 6});
  EXPECT_THROW(attention(q, k, k, AttentionBackend::sdpa, true), c10::Error);
  EXPECT_THROW(attention(q.view({2, 4, 8}), q, q, AttentionBackend::math, true), c10::Error);
}

}  // namespace
}  // namespace scaletrain::model
