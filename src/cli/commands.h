#pragma once
// The subcommands of the `scaletrain` executable. Each returns the process exit code; input
// errors propagate as core::Error and become exit code 2 in main().
#include <string>
#include <vector>

namespace scaletrain::cli {

struct ConfigArgs {
  std::string config;                  // --config
  std::vector<std::string> overrides;  // --set key.path=value
};

struct TrainArgs {
  ConfigArgs config;
  bool print_config = false;
  std::string resume = "none";  // --resume: none | auto | a checkpoint folder
  std::string profile;                          // --profile: JSON path ("" = off)
  std::vector<int64_t> profile_steps = {5, 10};  // --profile-steps FIRST,COUNT
};
int run_train(const TrainArgs& args);

struct EvalArgs {
  ConfigArgs config;
  std::string run_dir;  // --run: config.yaml and model.pt of a finished run
  std::string model;    // --model: a model.pt (with --config)
  int64_t examples = -1;
  int64_t show = -1;
};
int run_eval(const EvalArgs& args);

struct DataArgs {
  ConfigArgs config;
  std::string split = "train";  // train | val
  int64_t count = 5;
  std::string format = "text";  // text | jsonl | tsv
  bool stats = false;
};
int run_data(const DataArgs& args);

struct ConfigCommandArgs {
  ConfigArgs config;
  bool reference = false;
};
int run_config(const ConfigCommandArgs& args);

int run_info();

}  // namespace scaletrain::cli
