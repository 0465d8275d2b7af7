#pragma once
// Options of the training data (YAML section `data`) and the factory that loads a dataset.
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/arg.h>

#include "scaletrain/core/config.h"
#include "scaletrain/data/dataset.h"

namespace scaletrain::data {

// dsl: generated FLOWROLL/DIMMATCH request->program pairs; text: a UTF-8 file read as bytes;
// bin: nanoGPT uint16 token files.
enum class DataSource { dsl, text, bin };

struct DataOptions {
  TORCH_ARG(DataSource, source) = DataSource::dsl;
  // dsl: which languages to generate.
  TORCH_ARG(std::vector<std::string>, tasks) = std::vector<std::string>{"flowroll", "dimmatch"};
  // Seeds example generation (dsl) and batch order (all sources).
  TORCH_ARG(int64_t, seed) = 1234;
  TORCH_ARG(int64_t, train_examples) = 20000;
  TORCH_ARG(int64_t, val_examples) = 200;
  // text/bin: the file to train on; bin: val_path is an optional separate validation file.
  TORCH_ARG(std::string, path) = "";
  TORCH_ARG(std::string, val_path) = "";
  // text/bin without val_path: the tail fraction held out for validation.
  TORCH_ARG(double, val_fraction) = 0.1;

 public:  // TORCH_ARG leaves the section private
  void visit(core::FieldVisitor& v);
  void validate() const;
  std::vector<DslTask> dsl_tasks() const;
};

// Builds the dataset the options describe. `block_size` bounds windows (text/bin) and checks
// that every example fits (dsl); `vocab_size` bounds token ids. Throws DataError / ConfigError.
std::unique_ptr<Dataset> load_dataset(const DataOptions& options, int64_t block_size,
                                      int64_t vocab_size);

}  // namespace scaletrain::data

template <>
struct scaletrain::core::EnumNames<scaletrain::data::DataSource> {
  static constexpr std::array<std::pair<scaletrain::data::DataSource, const char*>, 3> values = {
      {{scaletrain::data::DataSource::dsl, "dsl"},
       {scaletrain::data::DataSource::text, "text"},
       {scaletrain::data::DataSource::bin, "bin"}}};
};
