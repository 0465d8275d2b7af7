#include "scaletrain/data/data_options.h"

namespace scaletrain::data {

void DataOptions::visit(core::FieldVisitor& v) {
  v.choice("source", source(), "dsl (generated request->program pairs), text (UTF-8 file as bytes) or bin (uint16 tokens)");
  v.field("tasks", tasks(), "dsl: languages to generate", {"flowroll", "dimmatch"});
  v.field("seed", seed(), "seed of example generation and batch order", core::at_least(0));
  v.field("train_examples", train_examples(), "dsl: training pairs", core::between(1, 10'000'000));
  v.field("val_examples", val_examples(), "dsl: held-out pairs", core::between(1, 1'000'000));
  v.field("path", path(), "text/bin: file to train on");
  v.field("val_path", val_path(), "bin: separate validation file (optional)");
  v.field("val_fraction", val_fraction(), "text/bin: tail fraction held out when there is no val_path",
          core::Bounds{0.0, 0.5, true, false});
}

void DataOptions::validate() const {
  if (source() != DataSource::dsl && path().empty()) {
    throw core::ConfigError("data.path", std::string("data.path: required when data.source is ") +
                                             core::enum_name(source()) + ", got nothing");
  }
}

std::vector<DslTask> DataOptions::dsl_tasks() const {
  std::vector<DslTask> out;
  for (const auto& name : tasks()) out.push_back(parse_dsl_task(name));
  return out;
}

std::unique_ptr<Dataset> load_dataset(const DataOptions& options, int64_t block_size,
                                      int64_t vocab_size) {
  const auto seed = static_cast<uint64_t>(options.seed());
  switch (options.source()) {
    case DataSource::dsl: {
      auto split = make_dsl_split(seed, options.dsl_tasks(), options.train_examples(), options.val_examples());
      auto dataset = std::make_unique<PairDataset>(std::move(split.train), std::move(split.validation), seed);
      if (dataset->max_sequence_length() > block_size) {
        throw core::ConfigError("model.block_size",
                                "model.block_size: got " + std::to_string(block_size) +
                                    ", expected at least " + std::to_string(dataset->max_sequence_length()) +
                                    " (the longest request + program of the data)");
      }
      return dataset;
    }
    case DataSource::text:
      return load_text_dataset(options.path(), options.val_fraction(), block_size, seed, "data.path");
    case DataSource::bin:
      return load_bin_dataset(options.path(), options.val_path(), options.val_fraction(), block_size,
                              vocab_size, seed);
  }
  throw core::ConfigError("data.source", "data.source: unknown");
}

}  // namespace scaletrain::data
