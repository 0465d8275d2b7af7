// Configuration: YAML and --set overrides into typed structs. References: the values written in
// each test, and the documented message shape "<where>: <key>: got <value>, expected <what>".
#include <fstream>
#include <regex>

#include <gtest/gtest.h>

#include "scaletrain/core/config.h"
#include "scaletrain/train/config.h"
#include "test_util.h"

namespace scaletrain {
namespace {

using train::RunConfig;

RunConfig from_yaml(const std::string& text) {
  RunConfig config;
  core::apply_yaml(core::root_of(config), text, "test.yaml");
  config.validate();
  return config;
}

std::string error_of(const std::string& text) {
  try {
    from_yaml(text);
  } catch (const core::Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(Config, ReadsValuesAndKeepsDefaults) {
  RunConfig defaults;
  auto config = from_yaml("model:\n  n_layer: 6\n  attention: math\ntrain:\n  batch_size: 8\noptim:\n  lr: 1.5e-3\n"
                          "data:\n  tasks: [dimmatch]\n");
  EXPECT_EQ(config.model.n_layer(), 6);
  EXPECT_EQ(config.model.attention(), model::AttentionBackend::math);
  EXPECT_EQ(config.train.batch_size(), 8);
  EXPECT_DOUBLE_EQ(config.optim.lr(), 1.5e-3);
  EXPECT_EQ(config.data.tasks(), std::vector<std::string>{"dimmatch"});
  EXPECT_EQ(config.model.n_embd(), defaults.model.n_embd());
  EXPECT_EQ(config.train.max_steps(), defaults.train.max_steps());
}

TEST(Config, EmptyDocumentIsDefaults) {
  RunConfig defaults;
  auto config = from_yaml("");
  EXPECT_EQ(config.to_yaml(), defaults.to_yaml());
}

TEST(Config, UnknownKeySuggestsNearestName) {
  std::string message = error_of("train:\n  batchsize: 8\n");
  EXPECT_EQ(message, "test.yaml:2:3: train.batchsize: unknown key (did you mean 'train.batch_size'?)");
}

TEST(Config, UnknownKeyInWrongSectionPointsToRightOne) {
  EXPECT_EQ(error_of("model:\n  batch_size: 8\n"),
            "test.yaml:2:3: model.batch_size: unknown key (did you mean 'train.batch_size'?)");
}

TEST(Config, UnknownSection) {
  EXPECT_EQ(error_of("optimizer:\n  lr: 1\n"), "test.yaml:1:1: optimizer: unknown key (did you mean 'optim'?)");
}

TEST(Config, WrongTypeNamesValueAndExpectation) {
  EXPECT_EQ(error_of("train:\n  batch_size: eight\n"),
            "test.yaml:2:15: train.batch_size: got 'eight', expected an integer in [1, 1048576]");
  EXPECT_EQ(error_of("train:\n  batch_size: \"8\"\n"),
            "test.yaml:2:15: train.batch_size: got \"8\", expected an integer in [1, 1048576]");
  EXPECT_EQ(error_of("model:\n  bias: maybe\n"), "test.yaml:2:9: model.bias: got 'maybe', expected true or false");
  EXPECT_EQ(error_of("model:\n  attention: sdp\n"),
            "test.yaml:2:14: model.attention: got 'sdp', expected one of math, sdpa, flash (did you mean 'sdpa'?)");
  EXPECT_EQ(error_of("model: 5\n"),
            "test.yaml:1:8: model: got '5', expected a mapping of keys (vocab_size, pad_vocab_to, block_size, n_layer, "
            "n_head, n_embd, dropout, bias, tie_embeddings, attention, rope_base, activation_checkpointing, fused_ops, "
            "loss_chunk_rows)");
}

TEST(Config, OutOfRangeAndNonFinite) {
  EXPECT_EQ(error_of("train:\n  batch_size: -4\n"),
            "test.yaml:2:15: train.batch_size: got '-4', expected an integer in [1, 1048576]");
  EXPECT_EQ(error_of("optim:\n  lr: 0\n"), "test.yaml:2:7: optim.lr: got '0', expected a finite number > 0.0");
  EXPECT_EQ(error_of("optim:\n  lr: .nan\n"), "test.yaml:2:7: optim.lr: got '.nan', expected a finite number > 0.0");
  EXPECT_EQ(error_of("optim:\n  lr: 1e999\n"), "test.yaml:2:7: optim.lr: got '1e999', expected a finite number > 0.0");
  EXPECT_EQ(error_of("train:\n  max_steps: 99999999999999999999\n"),
            "test.yaml:2:14: train.max_steps: got '99999999999999999999', expected an integer >= 1");
  EXPECT_EQ(error_of("train:\n  max_steps:\n"), "test.yaml:2:3: train.max_steps: got nothing (null), expected an integer >= 1");
}

TEST(Config, ListFields) {
  EXPECT_EQ(error_of("data:\n  tasks: flowroll\n"),
            "test.yaml:2:10: data.tasks: got 'flowroll', expected a list of names from flowroll, dimmatch");
  EXPECT_EQ(error_of("data:\n  tasks: []\n"), "test.yaml:2:10: data.tasks: got an empty list, expected at least one name");
  EXPECT_EQ(error_of("data:\n  tasks: [flowroll, flowrol]\n"),
            "test.yaml:2:21: data.tasks[1]: got 'flowrol', expected one of flowroll, dimmatch (did you mean 'flowroll'?)");
  EXPECT_EQ(error_of("data:\n  tasks: [flowroll, flowroll]\n"),
            "test.yaml:2:21: data.tasks[1]: got 'flowroll', expected names without repeats");
}

TEST(Config, CrossFieldChecks) {
  EXPECT_EQ(error_of("model:\n  n_embd: 100\n  n_head: 3\n"), "model.n_head: got 3, expected a divisor of model.n_embd (100)");
  EXPECT_EQ(error_of("optim:\n  lr: 1e-4\n  min_lr: 1e-3\n"), "optim.min_lr: got 0.001, expected at most optim.lr (1e-04)");
  EXPECT_EQ(error_of("data:\n  source: text\n"), "data.path: required when data.source is text, got nothing");
  EXPECT_EQ(error_of("model:\n  fused_ops: false\n  loss_chunk_rows: 512\n"),
            "model.loss_chunk_rows: got 512, expected 0 with model.fused_ops false (the chunked loss runs the fused "
            "cross-entropy kernels)");
}

TEST(Config, MalformedYamlGivesPosition) {
  std::string message = error_of("model:\n  n_layer: [1, 2\n");
  EXPECT_TRUE(message.rfind("test.yaml:3:1: malformed YAML:", 0) == 0) << message;
  EXPECT_EQ(message.find('\n'), std::string::npos);
}

TEST(Config, DuplicateKeysAreErrors) {
  EXPECT_EQ(error_of("train:\n  batch_size: 1\n  batch_size: 2\n"),
            "test.yaml:3:3: train.batch_size: duplicate key (first at line 2)");
  EXPECT_EQ(error_of("train: {}\ntrain: {}\n"), "test.yaml:2:1: train: duplicate key (first at line 1)");
}

TEST(Config, RootMustBeMapping) {
  EXPECT_EQ(error_of("- a\n- b\n"),
            "test.yaml:1:1: got a list, expected a mapping of sections (model, data, optim, train, amp, eval, checkpoint)");
}

TEST(Config, OverridesApplyInOrderAndReportTheirOrigin) {
  RunConfig config;
  auto root = core::root_of(config);
  core::apply_override(root, "train.batch_size=16");
  core::apply_override(root, "data.tasks=[flowroll]");
  core::apply_override(root, "train.batch_size=4");
  core::apply_override(root, "train.out_dir=");
  EXPECT_EQ(config.train.batch_size(), 4);
  EXPECT_EQ(config.train.out_dir(), "");
  EXPECT_THROW(core::apply_override(root, "train.max_steps="), core::ConfigError);
  EXPECT_EQ(config.data.tasks(), std::vector<std::string>{"flowroll"});
  try {
    core::apply_override(root, "train.batch_sise=4");
    FAIL() << "no error";
  } catch (const core::ConfigError& e) {
    EXPECT_STREQ(e.what(), "--set train.batch_sise=4: train.batch_sise: unknown key (did you mean 'train.batch_size'?)");
    EXPECT_EQ(e.key(), "train.batch_sise");
  }
  for (const char* bad : {"train.batch_size", "=4", ".a=1", "a..b=1", "a b=1", "train.=3"}) {
    EXPECT_THROW(core::apply_override(root, bad), core::UsageError) << bad;
  }
}

TEST(Config, YamlRoundTripPreservesEveryValue) {
  auto config = from_yaml("model:\n  n_layer: 3\n  dropout: 0.125\n  rope_base: 500000\ntrain:\n  out_dir: \"my runs/#1\"\n"
                          "data:\n  path: \"yes\"\n  val_fraction: 0.2\noptim:\n  eps: 1.0e-10\n");
  std::string text = config.to_yaml();
  auto again = from_yaml(text);
  EXPECT_EQ(again.to_yaml(), text);
  EXPECT_EQ(again.train.out_dir(), "my runs/#1");
  EXPECT_EQ(again.data.path(), "yes");
  EXPECT_DOUBLE_EQ(again.optim.eps(), 1e-10);
  EXPECT_DOUBLE_EQ(again.model.rope_base(), 500000);
}

TEST(Config, AnyStringSurvivesTheRoundTrip) {
  for (const std::string tricky : {"runs/a:", "a: b", "#x", "x #y", "[", "{", "- x", "-", "yes", "No", "1e3", "+1",
                                   ".inf", "~", "", " spaced ", "tab\there", "quote\"s", "back\\slash", "line\nbreak",
                                   "\x01ctl", "caf\xc3\xa9", "null", "plain_name-1.2/x"}) {
    RunConfig config;
    config.train.out_dir(tricky);
    auto again = from_yaml(config.to_yaml());
    EXPECT_EQ(again.train.out_dir(), tricky) << config.to_yaml();
  }
  EXPECT_NE(error_of("train:\n  max_steps: +-5\n"), "no error");
}

TEST(Config, ReferenceListsEveryKey) {
  RunConfig config;
  auto root = core::root_of(config);
  std::string reference = core::reference_markdown(root);
  for (const auto& key : core::key_paths(root)) EXPECT_NE(reference.find(key), std::string::npos) << key;
}

TEST(Config, FileErrors) {
  testing::TempDir dir;
  try {
    RunConfig::load(dir.file("missing.yaml"));
    FAIL() << "no error";
  } catch (const core::ConfigError& e) {
    EXPECT_EQ(std::string(e.what()), "config file '" + dir.file("missing.yaml") + "': cannot open (No such file or directory)");
  }
  std::ofstream(dir.file("ok.yaml")) << "train:\n  max_steps: 7\n";
  EXPECT_EQ(RunConfig::load(dir.file("ok.yaml"), {"train.max_steps=9"}).train.max_steps(), 9);
}

TEST(Config, ClosestMatch) {
  EXPECT_EQ(core::closest_match("n_laeyr", {"n_layer", "n_head"}), "n_layer");
  EXPECT_EQ(core::closest_match("zzzzzz", {"n_layer", "n_head"}), "");
}

// Many generated bad configurations: each must fail with one clean line (a ConfigError or
// UsageError), never another exception or a crash.
TEST(Config, GeneratedBadConfigsFailCleanly) {
  RunConfig defaults;
  const auto keys = core::key_paths(core::root_of(defaults));
  std::vector<std::string> leaf_keys;
  for (const auto& key : keys)
    if (key.find('.') != std::string::npos) leaf_keys.push_back(key);
  const std::vector<std::string> bad_values = {"-1", "abc", "1.5.2", "[1, 2]", "{a: 1}", "\"12\"", ".inf", "-.inf",
                                               ".nan", "1e999", "", "~", "-99999999999999999999", "0x10"};
  std::vector<std::string> documents;
  auto nest = [](const std::string& key, const std::string& value) {
    auto dot = key.find('.');
    return key.substr(0, dot) + ":\n  " + key.substr(dot + 1) + ": " + value + "\n";
  };
  for (const auto& key : leaf_keys) {
    for (const auto& value : bad_values) {
      std::string doc = nest(key, value);
      // Some values are valid for some keys (strings take anything): keep those that fail.
      try {
        from_yaml(doc);
      } catch (...) {
        documents.push_back(doc);
      }
    }
    std::string name = key.substr(key.find('.') + 1);
    std::string typo = name.size() > 3 ? name.substr(0, name.size() - 1) + "x" : name + "x";
    documents.push_back(key.substr(0, key.find('.')) + ":\n  " + typo + ": 1\n");
  }
  for (const char* doc : {"model: [", "model:\n\tn_layer: 2", "]", "{{{", "model:\n  n_layer: 1\n n_head: 2",
                          "- 1\n- 2", "42", "\"text\"", "model:\n  ? [a, b]\n  : 1", "&a [*a]", "model: *undefined",
                          "train:\n  batch_size: 1\n  batch_size: -1", "model:\n  n_embd: 6\n  n_head: 4"}) {
    documents.push_back(doc);
  }
  ASSERT_GE(documents.size(), 200u);
  int clean = 0;
  for (const auto& doc : documents) {
    try {
      from_yaml(doc);
      ADD_FAILURE() << "accepted:\n" << doc;
    } catch (const core::Error& e) {
      std::string message = e.what();
      EXPECT_FALSE(message.empty());
      EXPECT_EQ(message.find('\n'), std::string::npos) << message;
      ++clean;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "unclean " << typeid(e).name() << ": " << e.what() << "\nfor:\n" << doc;
    }
  }
  EXPECT_EQ(clean, static_cast<int>(documents.size()));
}

}  // namespace
}  // namespace scaletrain
