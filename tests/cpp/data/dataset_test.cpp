// Datasets and the byte tokenizer. References: the raw bytes / token arrays the tests write, and
// hand-built expected batches.
#include <fstream>
#include <map>
#include <numeric>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "scaletrain/core/error.h"
#include "scaletrain/data/data_options.h"
#include "scaletrain/data/dataset.h"
#include "scaletrain/data/tokenizer.h"
#include "test_util.h"

namespace scaletrain::data {
namespace {

TEST(Tokenizer, BytesRoundTripAndEosStopsDecoding) {
  ByteTokenizer t;
  std::string text = "flowroll a.csv | keep qty >= 5\n\xc3\xa9";
  auto ids = t.encode(text);
  ASSERT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[0], 'f');
  EXPECT_EQ(ids.back(), 0xa9);
  EXPECT_EQ(t.decode(ids), text);
  ids.insert(ids.begin() + 8, ByteTokenizer::kEos);
  EXPECT_EQ(t.decode(ids), "flowroll");
  EXPECT_EQ(t.decode({'a', ByteTokenizer::kPad, 'b'}), "ab");
}

TEST(PairDataset, BatchMasksPromptAndPadding) {
  std::vector<DslExample> train = {{DslTask::flowroll, "ab", "xyz"}, {DslTask::flowroll, "c", "q"}};
  PairDataset ds(train, train, 0);
  auto batch = ds.validation_batches(2, 1).at(0);
  // "ab\nxyz<eos>": inputs a b \n x y z; targets: - - x y z <eos> (prompt targets ignored).
  const int64_t E = ByteTokenizer::kEos, P = ByteTokenizer::kPad;
  std::vector<int64_t> in0 = {'a', 'b', '\n', 'x', 'y', 'z'}, out0 = {-100, -100, 'x', 'y', 'z', E};
  std::vector<int64_t> in1 = {'c', '\n', 'q', P, P, P}, out1 = {-100, 'q', E, -100, -100, -100};
  auto row = [](const at::Tensor& t, int64_t r) {
    auto c = t[r].contiguous();
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  };
  EXPECT_EQ(row(batch.inputs, 0), in0);
  EXPECT_EQ(row(batch.targets, 0), out0);
  EXPECT_EQ(row(batch.inputs, 1), in1);
  EXPECT_EQ(row(batch.targets, 1), out1);
  EXPECT_EQ(batch.target_tokens, 6);
  EXPECT_EQ(batch.tokens, 9);
}

TEST(PairDataset, EpochVisitsEveryExampleOnceWithLittlePadding) {
  auto split = make_dsl_split(9, {DslTask::flowroll, DslTask::dimmatch}, 2048, 16);
  PairDataset ds(split.train, split.validation, 3);
  std::map<std::string, int> seen;
  int64_t real = 0, padded = 0;
  for (int64_t step = 0; step < 2048 / 32; ++step) {
    auto batch = ds.train_batch(step, 32);
    real += batch.tokens;
    padded += batch.inputs.numel();
    for (int64_t r = 0; r < 32; ++r) {
      auto row = batch.inputs[r];
      std::string text;
      for (int64_t t = 0; t < row.size(0) && row[t].item<int64_t>() != '\n'; ++t) text += static_cast<char>(row[t].item<int64_t>());
      ++seen[text];
    }
  }
  EXPECT_EQ(seen.size(), 2048u);
  for (const auto& [request, count] : seen) EXPECT_EQ(count, 1) << request;
  EXPECT_GT(static_cast<double>(real) / static_cast<double>(padded), 0.85);  // length grouping works
  // Pure function of the step: the same batch again, another step differs.
  EXPECT_TRUE(at::equal(ds.train_batch(5, 32).inputs, ds.train_batch(5, 32).inputs));
  EXPECT_FALSE(ds.train_batch(5, 32).inputs.sizes() == ds.train_batch(6, 32).inputs.sizes() &&
               at::equal(ds.train_batch(5, 32).inputs, ds.train_batch(6, 32).inputs));
  EXPECT_THROW(ds.train_batch(0, 4096), core::ConfigError);
}

TEST(PairDataset, BlockSizeTooSmallIsAConfigError) {
  DataOptions options;
  options.train_examples(100).val_examples(10);
  try {
    load_dataset(options, 32, 258);
    FAIL() << "no error";
  } catch (const core::ConfigError& e) {
    EXPECT_EQ(e.key(), "model.block_size");
    EXPECT_NE(std::string(e.what()).find("model.block_size: got 32, expected at least"), std::string::npos);
  }
}

TEST(TokenStream, TextWindowsAreSlicesOfTheFile) {
  testing::TempDir dir;
  std::string text;
  for (int i = 0; i < 400; ++i) text += "line " + std::to_string(i) + ": the quick brown fox\n";
  std::ofstream(dir.file("corpus.txt"), std::ios::binary) << text;
  auto ds = load_text_dataset(dir.file("corpus.txt"), 0.1, 16, 1, "data.path");
  const size_t train_len = text.size() - static_cast<size_t>(static_cast<double>(text.size()) * 0.1);
  auto batch = ds->train_batch(0, 8);
  ASSERT_EQ(batch.inputs.sizes(), (at::IntArrayRef{8, 16}));
  for (int64_t r = 0; r < 8; ++r) {
    std::string window;
    for (int64_t t = 0; t < 16; ++t) window += static_cast<char>(batch.inputs[r][t].item<int64_t>());
    auto at = text.substr(0, train_len).find(window);
    ASSERT_NE(at, std::string::npos) << window;
    for (int64_t t = 0; t < 16; ++t) EXPECT_EQ(batch.targets[r][t].item<int64_t>(), static_cast<unsigned char>(text[at + t + 1]));
  }
  auto val = ds->validation_batches(4, 1).at(0);
  std::string first;
  for (int64_t t = 0; t < 16; ++t) first += static_cast<char>(val.inputs[0][t].item<int64_t>());
  EXPECT_EQ(first, text.substr(train_len, 16));
}

TEST(TokenStream, BinFilesRawAndWithLlmcHeader) {
  testing::TempDir dir;
  std::vector<uint16_t> tokens(5000);
  std::iota(tokens.begin(), tokens.end(), 0);
  write_bin_tokens(dir.file("train.bin"), tokens);
  auto ds = load_bin_dataset(dir.file("train.bin"), "", 0.1, 32, 50304, 0);
  auto batch = ds->train_batch(3, 4);
  for (int64_t r = 0; r < 4; ++r) {
    // Consecutive ids: each window counts up by one, targets are inputs + 1.
    auto row = batch.inputs[r];
    EXPECT_TRUE(at::equal(row, at::arange(row[0].item<int64_t>(), row[0].item<int64_t>() + 32, at::kLong)));
    EXPECT_TRUE(at::equal(batch.targets[r], row + 1));
    EXPECT_LT(row[31].item<int64_t>(), 4500);  // inside the training split
  }
  // llm.c layout: 256 int32 header (magic, version 1, count), then uint16 tokens.
  {
    std::ofstream out(dir.file("llmc.bin"), std::ios::binary);
    std::vector<int32_t> header(256, 0);
    header[0] = 20240520, header[1] = 1, header[2] = 3000;
    out.write(reinterpret_cast<const char*>(header.data()), 1024);
    out.write(reinterpret_cast<const char*>(tokens.data()), 3000 * 2);
  }
  auto llmc = load_bin_dataset(dir.file("llmc.bin"), dir.file("train.bin"), 0.1, 32, 50304, 0);
  EXPECT_EQ(llmc->describe(), "tokens '" + dir.file("llmc.bin") + "': 3000 train tokens, 5000 validation tokens");
  auto first = llmc->train_batch(0, 1).inputs[0];
  EXPECT_TRUE(at::equal(first, at::arange(first[0].item<int64_t>(), first[0].item<int64_t>() + 32, at::kLong)));
}

TEST(TokenStream, BadFilesNameTheKey) {
  testing::TempDir dir;
  auto message = [&](auto&& load) -> std::string {
    try {
      load();
    } catch (const core::DataError& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_EQ(message([&] { load_bin_dataset(dir.file("none.bin"), "", 0.1, 8, 100, 0); }),
            "data.path '" + dir.file("none.bin") + "': cannot open (No such file or directory)");
  std::ofstream(dir.file("odd.bin"), std::ios::binary) << "abc";
  EXPECT_EQ(message([&] { load_bin_dataset(dir.file("odd.bin"), "", 0.1, 8, 100, 0); }),
            "data.path '" + dir.file("odd.bin") + "': 3 bytes, expected a non-empty file of uint16 tokens (an even size)");
  write_bin_tokens(dir.file("big.bin"), std::vector<uint16_t>(400, 300));
  auto ds = load_bin_dataset(dir.file("big.bin"), "", 0.1, 8, 100, 0);
  const std::string bad_token = message([&] { ds->train_batch(0, 1); });
  EXPECT_EQ(bad_token.rfind("token 300 at offset ", 0), 0u) << bad_token;
  EXPECT_NE(bad_token.find(" is >= model.vocab_size (100): raise model.vocab_size"), std::string::npos) << bad_token;
  write_bin_tokens(dir.file("short.bin"), std::vector<uint16_t>(20, 1));
  EXPECT_NE(message([&] { load_bin_dataset(dir.file("short.bin"), "", 0.1, 8, 100, 0); }).find("the validation split has 2 tokens"),
            std::string::npos);
  EXPECT_EQ(message([&] { load_text_dataset(dir.path(), 0.1, 8, 0, "data.path"); }).rfind("data.path '", 0), 0u);
}

}  // namespace
}  // namespace scaletrain::data
