#pragma once
// Evaluation: validation loss, and for datasets with held-out prompts, greedy decoding scored by
// exact match, BLEU-4, ROUGE-L and (for DSL programs) grammar validity.
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "scaletrain/data/dataset.h"
#include "scaletrain/model/gpt.h"
#include "scaletrain/train/options.h"

namespace scaletrain::train {

struct GenerationSample {
  std::string request;
  std::string reference;
  std::string output;
};

struct EvalResult {
  double loss = NAN;          // mean cross-entropy per target token
  int64_t loss_tokens = 0;
  int64_t examples = 0;       // decoded prompts; 0 when no generation ran
  double exact_match = NAN;   // fractions in [0, 1]
  double bleu4 = NAN;
  double rouge_l = NAN;
  double valid_programs = NAN;  // outputs the checker accepts (NaN without a checker)
  std::vector<GenerationSample> samples;
  double seconds = 0;
};

// Returns "" for a valid output, otherwise the reason (e.g. data::check_program).
using OutputChecker = std::function<std::string(const std::string&)>;

// Token-weighted mean loss over up to `options.loss_batches()` validation batches.
double validation_loss(model::GPT& model, const data::Dataset& dataset, const EvalOptions& options,
                       const c10::Device& device, int64_t* tokens = nullptr);

// Loss, and with `generate` the generation metrics over `options.examples()` held-out prompts.
EvalResult evaluate(model::GPT& model, const data::Dataset& dataset, const EvalOptions& options,
                    const c10::Device& device, bool generate, const OutputChecker& checker = {});

}  // namespace scaletrain::train
