#include "scaletrain/model/generate.h"

#include <algorithm>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

namespace scaletrain::model {

std::vector<std::vector<int64_t>> greedy_generate(GPT& model, const std::vector<std::vector<int64_t>>& prompts,
                                                  const GenerateOptions& options) {
  std::vector<std::vector<int64_t>> outputs(prompts.size());
  if (prompts.empty()) return outputs;
  const int64_t batch = static_cast<int64_t>(prompts.size());
  const int64_t block = model->options().block_size();
  // Each sequence may grow until its last position reaches block_size - 1, as it would alone.
  std::vector<int64_t> budget(prompts.size());
  int64_t prompt_len = 0, steps = 0;
  for (size_t b = 0; b < prompts.size(); ++b) {
    const int64_t length = static_cast<int64_t>(prompts[b].size());
    TORCH_CHECK(length > 0, "greedy_generate: empty prompt");
    TORCH_CHECK(length < block, "greedy_generate: prompt of ", length, " tokens leaves no room in model.block_size = ",
                block);
    budget[b] = std::min(options.max_new_tokens, block - length);
    prompt_len = std::max(prompt_len, length);
    steps = std::max(steps, budget[b]);
  }
  if (steps <= 0) return outputs;
  const at::Device device = model->wte->weight.device();

  torch::NoGradGuard no_grad;
  EvalModeGuard eval_mode(*model);

  // Left-pad; remember where each prompt starts.
  auto tokens = at::full({batch, prompt_len}, options.pad_id, at::kLong);
  auto pad = at::empty({batch}, at::kLong);
  auto token_view = tokens.accessor<int64_t, 2>();
  auto pad_view = pad.accessor<int64_t, 1>();
  for (int64_t b = 0; b < batch; ++b) {
    const auto& p = prompts[b];
    const int64_t offset = prompt_len - static_cast<int64_t>(p.size());
    pad_view[b] = offset;
    for (size_t t = 0; t < p.size(); ++t) token_view[b][offset + static_cast<int64_t>(t)] = p[t];
  }
  tokens = tokens.to(device);
  pad = pad.to(device);
  const int64_t capacity = prompt_len + steps;
  auto columns = at::arange(capacity, at::TensorOptions().dtype(at::kLong).device(device));
  // valid[b, j]: key j holds a real token of sequence b (padding is never attended to).
  auto valid = columns.unsqueeze(0) >= pad.unsqueeze(1);

  KVCache cache = model->make_cache(batch, capacity);
  // Prefill: causal over the prompt, restricted to real tokens; a padding query sees itself so
  // its softmax stays finite (its output is never used).
  auto prompt_columns = columns.narrow(0, 0, prompt_len);
  auto causal = prompt_columns.unsqueeze(1) >= prompt_columns.unsqueeze(0);
  auto self = prompt_columns.unsqueeze(1) == prompt_columns.unsqueeze(0);
  auto mask = ((causal.unsqueeze(0) & valid.narrow(1, 0, prompt_len).unsqueeze(1)) | self.unsqueeze(0)).unsqueeze(1);
  auto positions = (prompt_columns.unsqueeze(0) - pad.unsqueeze(1)).clamp_min(0);
  auto logits = model->forward(tokens, ForwardContext{positions, mask, &cache});
  auto next = logits.select(1, prompt_len - 1).argmax(-1);

  std::vector<bool> done(prompts.size(), false);
  size_t finished = 0;
  for (int64_t step = 0; step < steps; ++step) {
    auto host = next.to(at::kCPU);
    auto view = host.accessor<int64_t, 1>();
    for (int64_t b = 0; b < batch; ++b) {
      if (done[b]) continue;
      if (view[b] == options.eos_id) {
        done[b] = true;
      } else {
        outputs[b].push_back(view[b]);
        done[b] = static_cast<int64_t>(outputs[b].size()) == budget[b];
      }
      finished += done[b];
    }
    if (finished == prompts.size()) break;
    const int64_t length = cache.length + 1;
    auto step_mask = valid.narrow(1, 0, length).view({batch, 1, 1, length});
    // Finished sequences keep running with their outputs ignored; their position is clamped so
    // it stays inside the rotary table.
    auto step_positions = (cache.length - pad).clamp_max(block - 1).view({batch, 1});
    logits = model->forward(next.view({batch, 1}), ForwardContext{step_positions, step_mask, &cache});
    next = logits.select(1, 0).argmax(-1);
  }
  return outputs;
}

}  // namespace scaletrain::model
