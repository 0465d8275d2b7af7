#pragma once
// Greedy decoding with a key/value cache, for a batch of prompts of different lengths.
#include <cstdint>
#include <vector>

#include "scaletrain/model/gpt.h"

namespace scaletrain::model {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  int64_t eos_id = 256;  // generation of a sequence stops after this token
  int64_t pad_id = 257;  // fills the left of shorter prompts
};

// Returns, for each prompt, the generated tokens without the end token. Prompts are left-padded;
// padding is masked out of attention and rotary positions start at each prompt's first token, so
// every sequence decodes exactly as it would alone. Runs under no_grad in eval mode and restores
// the model's training mode.
std::vector<std::vector<int64_t>> greedy_generate(GPT& model, const std::vector<std::vector<int64_t>>& prompts,
                                                  const GenerateOptions& options);

}  // namespace scaletrain::model
