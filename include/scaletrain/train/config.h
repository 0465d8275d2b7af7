#pragma once
// The whole configuration of a run, as read from YAML (see configs/ and docs/config.md).
#include <string>
#include <vector>

#include "scaletrain/amp/amp_options.h"
#include "scaletrain/data/data_options.h"
#include "scaletrain/model/gpt_options.h"
#include "scaletrain/train/options.h"

namespace scaletrain::train {

struct RunConfig {
  model::GPTOptions model;
  data::DataOptions data;
  OptimizerOptions optim;
  TrainerOptions train;
  amp::AmpOptions amp;
  EvalOptions eval;
  CheckpointOptions checkpoint;

  void visit(core::FieldVisitor& v);
  // Cross-section checks; throws ConfigError naming the key.
  void validate() const;
  std::string to_yaml();
  // checkpoint.dir, or <train.out_dir>/checkpoints when it is empty; "" when both are empty.
  std::string checkpoint_dir() const;

  // Defaults, then the file (if `path` is not empty), then each "key=value" override, then
  // validate().
  static RunConfig load(const std::string& path, const std::vector<std::string>& overrides = {});
};

}  // namespace scaletrain::train
