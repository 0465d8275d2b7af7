#include "cli/commands.h"

#include <map>

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>

#include "scaletrain/core/build_info.h"
#include "scaletrain/core/config.h"
#include "scaletrain/core/version.h"
#include "scaletrain/data/dsl.h"
#include "scaletrain/data/tokenizer.h"
#include "scaletrain/dist/process_group.h"
#include "scaletrain/train/config.h"
#include "scaletrain/train/run_folders.h"
#include "scaletrain/train/train_state.h"
#include "scaletrain/train/trainer.h"


namespace scaletrain::cli {
namespace {

train::RunConfig load_config(const ConfigArgs& args) { return train::RunConfig::load(args.config, args.overrides); }

void print_samples(const std::vector<train::GenerationSample>& samples) {
  for (const auto& s : samples) {
    fmt::print("  request:  {}\n  expected: {}\n  model:    {}   [{}]\n", s.request, s.reference, s.output,
               s.output == s.reference ? "exact" : "differs");
  }
}

std::string printable(const std::string& text) {
  std::string out;
  for (unsigned char c : text) out += (c >= 32 && c < 127) || c == '\n' ? static_cast<char>(c) : '.';
  return out;
}

void print_dsl_stats(const data::DslSplit& split) {
  for (const auto& [name, examples] : {std::pair{"train", &split.train}, std::pair{"val", &split.validation}}) {
    std::map<std::string, int64_t> per_task;
    size_t request_total = 0, program_total = 0, longest = 0;
    for (const auto& e : *examples) {
      ++per_task[core::enum_name(e.task)];
      request_total += e.request.size();
      program_total += e.program.size();
      longest = std::max(longest, e.request.size() + e.program.size() + 1);  // + newline; the end token is a target only
    }
    const double n = std::max<double>(1, static_cast<double>(examples->size()));
    fmt::print("{:<6} {:>7} examples", name, examples->size());
    for (const auto& [task, count] : per_task) fmt::print("  {} {}", task, count);
    fmt::print("  | mean request {:.1f} bytes, mean program {:.1f} bytes, longest input {} tokens\n",
               static_cast<double>(request_total) / n, static_cast<double>(program_total) / n, longest);
  }
}

}  // namespace

int run_train(const TrainArgs& args) {
  auto config = load_config(args.config);
  if (args.print_config) {
    fmt::print("{}", config.to_yaml());
    return 0;
  }
  const std::string out_dir = config.train.out_dir();
  // Verified before the (slower) dataset and model are built, so a bad checkpoint fails fast.
  const auto resume = train::find_resume_checkpoint(config, args.resume);
  // Under torchrun every rank runs this; rank 0 owns the run folder and prints the summary.
  const bool leader = dist::read_env_rendezvous().rank == 0;
  if (leader) train::prepare_run_folders(config, resume ? resume->step : 0);  // before the dataset and model are built
  train::Trainer trainer(std::move(config));
  if (!args.profile.empty()) {
    try {
      trainer.profile({args.profile_steps.at(0), args.profile_steps.at(1), args.profile});
    } catch (const std::invalid_argument& e) {
      throw core::UsageError(e.what());
    }
  }
  auto summary = trainer.fit(resume);
  if (!leader) return 0;
  fmt::print("{}", train::format_summary(summary));
  if (!out_dir.empty()) fmt::print("\nrun folder: {} (config.yaml, metrics.jsonl, summary.json, model.pt)\n", out_dir);
  return 0;
}

int run_eval(const EvalArgs& args) {
  const bool from_run = !args.run_dir.empty();
  const std::string config_path = from_run ? args.run_dir + "/config.yaml" : args.config.config;
  const std::string model_path = from_run ? args.run_dir + "/model.pt" : args.model;
  auto config = train::RunConfig::load(config_path, args.config.overrides);
  if (args.examples >= 0) config.eval.examples(args.examples);
  if (args.show >= 0) config.eval.show_samples(args.show);
  config.train.out_dir("");
  train::Trainer trainer(std::move(config));
  train::load_model(trainer.model(), model_path);
  auto result = trainer.evaluate(true);
  fmt::print("{}: {}\n", model_path, train::format_eval(result));
  print_samples(result.samples);
  return 0;
}

int run_data(const DataArgs& args) {
  auto config = load_config(args.config);
  const auto& options = config.data;
  if (options.source() == data::DataSource::dsl) {
    auto split = data::make_dsl_split(static_cast<uint64_t>(options.seed()), options.dsl_tasks(),
                                      options.train_examples(), options.val_examples());
    if (args.stats) {
      print_dsl_stats(split);
      return 0;
    }
    const auto& examples = args.split == "train" ? split.train : split.validation;
    for (size_t i = 0; i < examples.size() && static_cast<int64_t>(i) < args.count; ++i) {
      const auto& e = examples[i];
      if (args.format == "jsonl") {
        fmt::print("{}\n", nlohmann::ordered_json{{"split", args.split}, {"task", core::enum_name(e.task)},
                                                  {"request", e.request}, {"program", e.program}}
                               .dump());
      } else if (args.format == "tsv") {
        fmt::print("{}\t{}\n", e.request, e.program);
      } else {
        fmt::print("[{}] {}\n    => {}\n", core::enum_name(e.task), e.request, e.program);
      }
    }
    return 0;
  }
  auto dataset = data::load_dataset(options, config.model.block_size(), config.model.vocab_size());
  fmt::print("{}\n", dataset->describe());
  if (args.stats) return 0;
  data::ByteTokenizer tokenizer;
  std::vector<data::Batch> windows;
  if (args.split == "val") {
    windows = dataset->validation_batches(1, args.count);
  } else {
    for (int64_t i = 0; i < args.count; ++i) windows.push_back(dataset->train_batch(i, 1));
  }
  for (size_t i = 0; i < windows.size(); ++i) {
    auto tokens = windows[i].inputs[0].contiguous();
    std::vector<int64_t> ids(tokens.data_ptr<int64_t>(), tokens.data_ptr<int64_t>() + tokens.numel());
    if (options.source() == data::DataSource::text) {
      fmt::print("--- window {} ---\n{}\n", i, printable(tokenizer.decode(ids)));
    } else {
      ids.resize(std::min<size_t>(ids.size(), 32));
      fmt::print("window {}: {} ...\n", i, fmt::join(ids, " "));
    }
  }
  return 0;
}

int run_config(const ConfigCommandArgs& args) {
  if (args.reference) {
    train::RunConfig defaults;
    fmt::print("{}", core::reference_markdown(core::root_of(defaults)));
    return 0;
  }
  auto config = load_config(args.config);
  fmt::print("{}", config.to_yaml());
  return 0;
}

int run_info() {
  const auto info = core::build_info();
  fmt::print("scaletrain {}\n", info.version);
  fmt::print("torch (built against) {}\n", info.torch_version);
  fmt::print("CPU threads: {}\n", at::get_num_threads());
  fmt::print("CUDA kernels: {}\n", info.cuda ? "built for sm_" + info.cuda_architectures : std::string("not built"));
  const bool cuda = torch::cuda::is_available();
  fmt::print("CUDA devices: {}\n", cuda ? torch::cuda::device_count() : 0);
#ifdef SCALETRAIN_WITH_CUDA
  if (cuda) {
    for (int d = 0; d < static_cast<int>(torch::cuda::device_count()); ++d)
      fmt::print("  device {}: kernel image sm_{} runs\n", d, core::cuda_kernel_arch(d) / 10);
  }
#endif
  return 0;
}

}  // namespace scaletrain::cli
