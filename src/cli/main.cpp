// `scaletrain`: train | eval | data | config | info. Bad input exits with code 2 and one line.
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>
#include <fmt/format.h>

#include "cli/commands.h"
#include "scaletrain/core/config.h"
#include "scaletrain/core/error.h"
#include "scaletrain/core/log_sink.h"
#include "scaletrain/core/version.h"

namespace {

using namespace scaletrain;

// --config options and their values, checked after parsing: an empty path (usually an unset
// shell variable) must not silently mean "the defaults".
std::vector<std::pair<const CLI::Option*, const std::string*>> config_options;

void add_config_options(CLI::App* command, cli::ConfigArgs& args, bool required) {
  auto* option = command->add_option("-c,--config", args.config, "YAML configuration file (see configs/)");
  if (required) option->required();
  config_options.emplace_back(option, &args.config);
  command->add_option("--set", args.overrides, "override one key: --set train.max_steps=200 (repeatable)")
      ->type_name("KEY=VALUE")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
}

// CLI11 converts an integer that overflows int64 without complaint: a count must be a whole
// number that fits, checked on the text before the conversion.
const CLI::Validator kCount(
    [](std::string& text) -> std::string {
      int64_t value = 0;
      const char* end = text.data() + text.size();
      const auto [ptr, ec] = std::from_chars(text.data(), end, value);
      if (ec == std::errc::result_out_of_range) return "got " + text + ", expected at most 9223372036854775807";
      if (ec != std::errc() || ptr != end || value < 0) return "got '" + text + "', expected a whole number >= 0";
      return "";
    },
    "COUNT");

int run(int argc, char** argv) {
  CLI::App app{"scaletrain: fast, small LLM training on LibTorch", "scaletrain"};
  app.set_version_flag("--version", std::string("scaletrain ") + SCALETRAIN_VERSION);
  app.require_subcommand(1);
  app.fallthrough();  // --log-level may also follow the command
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")->capture_default_str();

  cli::TrainArgs train;
  auto* train_cmd = app.add_subcommand("train", "train a GPT from a YAML configuration");
  add_config_options(train_cmd, train.config, true);
  train_cmd->add_flag("--print-config", train.print_config, "print the resolved configuration and exit");
  train_cmd->add_option("--resume", train.resume,
                        "none, auto (the newest valid checkpoint in checkpoint.dir) or a checkpoint folder")
      ->type_name("auto|none|PATH")
      ->capture_default_str();
  train_cmd->add_option("--profile", train.profile,
                        "write a kernel profile (CUDA kernels by name: count, total ms) of --profile-steps to this JSON file")
      ->type_name("PATH");
  train_cmd->add_option("--profile-steps", train.profile_steps, "first step and number of steps profiled")
      ->delimiter(',')
      ->expected(2)
      ->type_name("FIRST,COUNT")
      ->capture_default_str();
  train_cmd->footer("Example: scaletrain train --config configs/tiny_cpu.yaml --set train.max_steps=100\n"
                    "         scaletrain train --config run.yaml --set checkpoint.every=100 --resume auto");

  cli::EvalArgs eval;
  auto* eval_cmd = app.add_subcommand("eval", "evaluate a trained model: loss, exact match, BLEU-4, ROUGE-L");
  eval_cmd->add_option("--run", eval.run_dir, "run folder written by `scaletrain train` (config.yaml, model.pt)");
  add_config_options(eval_cmd, eval.config, false);
  eval_cmd->add_option("--model", eval.model, "model.pt to evaluate with --config");
  eval_cmd->add_option("--examples", eval.examples, "held-out prompts to decode (default: eval.examples)")
      ->check(kCount);
  eval_cmd->add_option("--show", eval.show, "decoded samples to print (default: eval.show_samples)")
      ->check(kCount);
  eval_cmd->footer("Example: scaletrain eval --run runs/tiny_cpu --show 5");

  cli::DataArgs data;
  auto* data_cmd = app.add_subcommand("data", "print examples of the configured data (FLOWROLL/DIMMATCH by default)");
  add_config_options(data_cmd, data.config, false);
  data_cmd->add_option("--split", data.split, "train or val")->check(CLI::IsMember({"train", "val"}))->capture_default_str();
  data_cmd->add_option("-n,--count", data.count, "examples to print")->check(kCount)->capture_default_str();
  data_cmd->add_option("--format", data.format, "text, jsonl or tsv")
      ->check(CLI::IsMember({"text", "jsonl", "tsv"}))
      ->capture_default_str();
  data_cmd->add_flag("--stats", data.stats, "print sizes and lengths instead of examples");
  data_cmd->footer("Example: scaletrain data --split val -n 3 --format jsonl");

  cli::ConfigCommandArgs config;
  auto* config_cmd = app.add_subcommand("config", "validate a configuration and print it resolved, or the key reference");
  add_config_options(config_cmd, config.config, false);
  config_cmd->add_flag("--reference", config.reference, "print every key with type, default and meaning (Markdown)");

  auto* info_cmd = app.add_subcommand("info", "print version, torch, CUDA build and devices");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // An unknown command word reads better than CLI11's "A subcommand is required".
    if (app.get_subcommands().empty()) {
      std::vector<std::string> commands;
      for (const auto* sub : app.get_subcommands({})) commands.push_back(sub->get_name());
      for (int i = 1; i < argc; ++i) {
        std::string word = argv[i];
        if (word == "--log-level") {
          ++i;
          continue;
        }
        if (word.empty() || word[0] == '-') continue;
        std::string near = core::closest_match(word, commands);
        throw core::UsageError("unknown command '" + word + "' (expected train, eval, data, config or info" +
                               (near.empty() ? "" : "; did you mean '" + near + "'?") + ")");
      }
    }
    std::string where = "scaletrain";
    for (const auto* sub : app.get_subcommands()) where += " " + sub->get_name();
    throw core::UsageError(std::string(e.what()) + " (see `" + where + " --help`)");
  }
  for (const auto& [option, value] : config_options) {
    if (option->count() > 0 && value->empty())
      throw core::UsageError("--config: got an empty path (an unset shell variable?), expected a YAML file");
  }
  core::set_log_level(core::parse_log_level(log_level));

  if (train_cmd->parsed()) return cli::run_train(train);
  if (eval_cmd->parsed()) {
    if (eval.run_dir.empty() == eval.model.empty() || (!eval.run_dir.empty() && !eval.config.config.empty()))
      throw core::UsageError("scaletrain eval: expected either --run DIR or --config FILE --model FILE");
    if (!eval.model.empty() && eval.config.config.empty())
      throw core::UsageError("scaletrain eval: --model needs --config (the configuration it was trained with)");
    return cli::run_eval(eval);
  }
  if (data_cmd->parsed()) return cli::run_data(data);
  if (config_cmd->parsed()) return cli::run_config(config);
  if (info_cmd->parsed()) return cli::run_info();
  return 2;
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const scaletrain::core::Error& e) {
    fmt::print(stderr, "error: {}\n", first_line(e.what()));
    return 2;
  } catch (const c10::Error& e) {
    fmt::print(stderr, "error: {}\n", first_line(e.what_without_backtrace()));
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "internal error: {}\n", first_line(e.what()));
    return 1;
  }
}
