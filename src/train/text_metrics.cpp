#include "scaletrain/train/text_metrics.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>
#include <stdexcept>

namespace scaletrain::train {
namespace {

void check_pairs(const std::vector<std::string>& candidates, const std::vector<std::string>& references) {
  if (candidates.size() != references.size())
    throw std::invalid_argument("metrics: " + std::to_string(candidates.size()) + " candidates but " +
                                std::to_string(references.size()) + " references");
}

std::map<std::vector<std::string>, int64_t> ngram_counts(const std::vector<std::string>& tokens, size_t n) {
  std::map<std::vector<std::string>, int64_t> counts;
  for (size_t i = 0; i + n <= tokens.size(); ++i)
    ++counts[std::vector<std::string>(tokens.begin() + static_cast<std::ptrdiff_t>(i),
                                      tokens.begin() + static_cast<std::ptrdiff_t>(i + n))];
  return counts;
}

}  // namespace

std::vector<std::string> whitespace_tokens(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> tokens;
  for (std::string token; in >> token;) tokens.push_back(token);
  return tokens;
}

double corpus_bleu4(const std::vector<std::string>& candidates, const std::vector<std::string>& references) {
  check_pairs(candidates, references);
  int64_t matches[4] = {0, 0, 0, 0}, totals[4] = {0, 0, 0, 0};
  int64_t candidate_length = 0, reference_length = 0;
  for (size_t i = 0; i < candidates.size(); ++i) {
    auto candidate = whitespace_tokens(candidates[i]);
    auto reference = whitespace_tokens(references[i]);
    candidate_length += static_cast<int64_t>(candidate.size());
    reference_length += static_cast<int64_t>(reference.size());
    for (size_t n = 1; n <= 4; ++n) {
      auto reference_counts = ngram_counts(reference, n);
      for (const auto& [gram, count] : ngram_counts(candidate, n)) {
        auto it = reference_counts.find(gram);
        matches[n - 1] += std::min(count, it == reference_counts.end() ? 0 : it->second);
        totals[n - 1] += count;
      }
    }
  }
  double log_precision = 0;
  for (int n = 0; n < 4; ++n) {
    if (matches[n] == 0 || totals[n] == 0) return 0.0;
    log_precision += std::log(static_cast<double>(matches[n]) / static_cast<double>(totals[n])) / 4.0;
  }
  const double brevity = candidate_length >= reference_length
                             ? 1.0
                             : std::exp(1.0 - static_cast<double>(reference_length) / static_cast<double>(candidate_length));
  return brevity * std::exp(log_precision);
}

double rouge_l(const std::string& candidate, const std::string& reference) {
  auto c = whitespace_tokens(candidate), r = whitespace_tokens(reference);
  if (c.empty() && r.empty()) return 1.0;
  if (c.empty() || r.empty()) return 0.0;
  std::vector<size_t> previous(r.size() + 1, 0), current(r.size() + 1, 0);
  for (size_t i = 1; i <= c.size(); ++i) {
    for (size_t j = 1; j <= r.size(); ++j)
      current[j] = c[i - 1] == r[j - 1] ? previous[j - 1] + 1 : std::max(previous[j], current[j - 1]);
    std::swap(previous, current);
  }
  const double lcs = static_cast<double>(previous[r.size()]);
  if (lcs == 0) return 0.0;
  const double precision = lcs / static_cast<double>(c.size()), recall = lcs / static_cast<double>(r.size());
  return 2 * precision * recall / (precision + recall);
}

double mean_rouge_l(const std::vector<std::string>& candidates, const std::vector<std::string>& references) {
  check_pairs(candidates, references);
  if (candidates.empty()) return 0.0;
  double total = 0;
  for (size_t i = 0; i < candidates.size(); ++i) total += rouge_l(candidates[i], references[i]);
  return total / static_cast<double>(candidates.size());
}

double exact_match(const std::vector<std::string>& candidates, const std::vector<std::string>& references) {
  check_pairs(candidates, references);
  if (candidates.empty()) return 0.0;
  int64_t same = 0;
  for (size_t i = 0; i < candidates.size(); ++i) same += candidates[i] == references[i];
  return static_cast<double>(same) / static_cast<double>(candidates.size());
}

}  // namespace scaletrain::train
