// Google Benchmark drivers for the pieces of a CPU training step: batch assembly, forward +
// backward per attention backend, and cached greedy decoding. Run:
//   ./build/benchmarks/cpp/scaletrain_bench --benchmark_filter=TrainStep
#include <benchmark/benchmark.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "scaletrain/data/dataset.h"
#include "scaletrain/data/dsl.h"
#include "scaletrain/model/generate.h"
#include "scaletrain/model/gpt.h"

namespace {

using namespace scaletrain;

const data::PairDataset& dataset() {
  static data::PairDataset instance = [] {
    auto split = data::make_dsl_split(1234, {data::DslTask::flowroll, data::DslTask::dimmatch}, 20000, 200);
    return data::PairDataset(std::move(split.train), std::move(split.validation), 1234);
  }();
  return instance;
}

model::GPTOptions demo_model(model::AttentionBackend backend) {
  model::GPTOptions o;
  o.n_layer(4).n_head(4).n_embd(128).block_size(224).attention(backend);
  return o;
}

void BM_DslBatch(benchmark::State& state) {
  int64_t step = 0;
  for (auto _ : state) benchmark::DoNotOptimize(dataset().train_batch(step++, 32));
}
BENCHMARK(BM_DslBatch);

// Forward + backward of the demo model on demo batches; arg 0 = math, 1 = sdpa.
void BM_TrainStep(benchmark::State& state) {
  auto backend = state.range(0) == 0 ? model::AttentionBackend::math : model::AttentionBackend::sdpa;
  model::GPT m(demo_model(backend));
  int64_t step = 0, tokens = 0;
  for (auto _ : state) {
    auto batch = dataset().train_batch(step++, 32);
    m->zero_grad();
    m->loss(m->forward(batch.inputs), batch.targets).backward();
    tokens += batch.tokens;
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.SetLabel(backend == model::AttentionBackend::math ? "math" : "sdpa");
}
BENCHMARK(BM_TrainStep)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);

void BM_GreedyGenerate(benchmark::State& state) {
  model::GPT m(demo_model(model::AttentionBackend::sdpa));
  auto examples = dataset().prompt_examples(state.range(0));
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& e : examples) prompts.push_back(e.prompt);
  model::GenerateOptions options;
  options.max_new_tokens = 48;
  options.eos_id = 1000;  // decode the full length
  for (auto _ : state) benchmark::DoNotOptimize(model::greedy_generate(m, prompts, options));
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(48 * prompts.size()),
                                               benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_GreedyGenerate)->Arg(64)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
