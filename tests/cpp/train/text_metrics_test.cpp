// BLEU-4 and ROUGE-L on hand-computed cases (the Python tests also compare BLEU with sacrebleu).
#include <cmath>

#include <gtest/gtest.h>

#include "scaletrain/train/text_metrics.h"

namespace scaletrain::train {
namespace {

TEST(TextMetrics, BleuIdenticalIsOneAndDisjointIsZero) {
  EXPECT_DOUBLE_EQ(corpus_bleu4({"a b c d e"}, {"a b c d e"}), 1.0);
  EXPECT_DOUBLE_EQ(corpus_bleu4({"a b c d e"}, {"v w x y z"}), 0.0);
  EXPECT_DOUBLE_EQ(corpus_bleu4({"a b c"}, {"a b c"}), 0.0);  // no 4-grams: precision 0/0 counts as 0
}

TEST(TextMetrics, BleuHandComputed) {
  // candidate "a b c d x" vs reference "a b c d e f":
  // p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2; brevity exp(1 - 6/5).
  const double expected = std::exp(1.0 - 6.0 / 5.0) * std::pow(0.8 * 0.75 * (2.0 / 3.0) * 0.5, 0.25);
  EXPECT_NEAR(corpus_bleu4({"a b c d x"}, {"a b c d e f"}), expected, 1e-12);
  // Clipping: "a a a a a" vs "a a b c d": p1 = 2/5, p2 = 1/4, p3 = 0 -> 0.
  EXPECT_DOUBLE_EQ(corpus_bleu4({"a a a a a"}, {"a a b c d"}), 0.0);
  EXPECT_THROW(corpus_bleu4({"a"}, {}), std::invalid_argument);
}

TEST(TextMetrics, RougeL) {
  // LCS("a b c d", "a x c d e") = a c d = 3; P = 3/4, R = 3/5.
  EXPECT_NEAR(rouge_l("a b c d", "a x c d e"), 2 * 0.75 * 0.6 / (0.75 + 0.6), 1e-12);
  EXPECT_DOUBLE_EQ(rouge_l("same words", "same words"), 1.0);
  EXPECT_DOUBLE_EQ(rouge_l("", ""), 1.0);
  EXPECT_DOUBLE_EQ(rouge_l("a", ""), 0.0);
  EXPECT_DOUBLE_EQ(mean_rouge_l({"a b", "c"}, {"a b", "d"}), 0.5);
  EXPECT_DOUBLE_EQ(exact_match({"x", "y", "z", "w"}, {"x", "y", "q", "w "}), 0.5);
}

}  // namespace
}  // namespace scaletrain::train
