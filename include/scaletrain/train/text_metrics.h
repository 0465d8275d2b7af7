#pragma once
// Generation metrics over whitespace-separated tokens (programs are space-separated already).
#include <string>
#include <vector>

namespace scaletrain::train {

std::vector<std::string> whitespace_tokens(const std::string& text);

// Corpus BLEU-4 (Papineni et al. 2002): geometric mean of clipped 1- to 4-gram precisions summed
// over the corpus, times the brevity penalty; 0 when any precision is 0 (no smoothing). In [0, 1].
double corpus_bleu4(const std::vector<std::string>& candidates, const std::vector<std::string>& references);

// ROUGE-L F1 of one pair: longest common subsequence over tokens, harmonic mean of its precision
// and recall. In [0, 1]; 1 for two empty strings.
double rouge_l(const std::string& candidate, const std::string& reference);
// Mean ROUGE-L F1 over pairs.
double mean_rouge_l(const std::vector<std::string>& candidates, const std::vector<std::string>& references);

// Fraction of pairs that are byte-identical.
double exact_match(const std::vector<std::string>& candidates, const std::vector<std::string>& references);

}  // namespace scaletrain::train
