#include "scaletrain/train/eval.h"

#include <chrono>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "scaletrain/data/tokenizer.h"
#include "scaletrain/model/generate.h"
#include "scaletrain/train/text_metrics.h"

namespace scaletrain::train {

double validation_loss(model::GPT& model, const data::Dataset& dataset, const EvalOptions& options,
                       const c10::Device& device, int64_t* tokens) {
  torch::NoGradGuard no_grad;
  model::EvalModeGuard eval_mode(*model);
  double total = 0;
  int64_t counted = 0;
  for (const auto& batch : dataset.validation_batches(options.batch_size(), options.loss_batches())) {
    auto summed = model->forward_loss(batch.inputs.to(device), batch.targets.to(device), model::LossReduction::sum);
    total += summed.item<double>();
    counted += batch.target_tokens;
  }
  if (tokens) *tokens = counted;
  return counted > 0 ? total / static_cast<double>(counted) : NAN;
}

EvalResult evaluate(model::GPT& model, const data::Dataset& dataset, const EvalOptions& options,
                    const c10::Device& device, bool generate, const OutputChecker& checker) {
  const auto start = std::chrono::steady_clock::now();
  EvalResult result;
  result.loss = validation_loss(model, dataset, options, device, &result.loss_tokens);
  const auto prompts = generate && options.examples() > 0 ? dataset.prompt_examples(options.examples())
                                                          : std::vector<data::PromptExample>{};
  if (!prompts.empty()) {
    data::ByteTokenizer tokenizer;
    model::GenerateOptions generation;
    generation.max_new_tokens = options.max_new_tokens();
    std::vector<std::string> outputs, references;
    for (size_t start_at = 0; start_at < prompts.size(); start_at += static_cast<size_t>(options.batch_size())) {
      const size_t end = std::min(prompts.size(), start_at + static_cast<size_t>(options.batch_size()));
      std::vector<std::vector<int64_t>> batch;
      for (size_t i = start_at; i < end; ++i) batch.push_back(prompts[i].prompt);
      for (const auto& tokens : model::greedy_generate(model, batch, generation))
        outputs.push_back(tokenizer.decode(tokens));
    }
    int64_t valid = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      references.push_back(prompts[i].reference);
      if (checker && checker(outputs[i]).empty()) ++valid;
      if (static_cast<int64_t>(result.samples.size()) < options.show_samples())
        result.samples.push_back({prompts[i].request, prompts[i].reference, outputs[i]});
    }
    result.examples = static_cast<int64_t>(prompts.size());
    result.exact_match = exact_match(outputs, references);
    result.bleu4 = corpus_bleu4(outputs, references);
    result.rouge_l = mean_rouge_l(outputs, references);
    if (checker) result.valid_programs = static_cast<double>(valid) / static_cast<double>(prompts.size());
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace scaletrain::train
