#pragma once
// Token datasets for language-model training. A dataset hands out the training batch of any step
// without keeping a cursor (`train_batch(step)` is a pure function of the seed and the step), so
// a resumed run sees exactly the batches it would have seen.
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "scaletrain/data/dsl.h"
#include "scaletrain/data/tokenizer.h"

namespace scaletrain::data {

// inputs: (batch, seq) int64 token ids; targets: (batch, seq) next-token ids, -100 where no loss
// is taken (prompt and padding).
struct Batch {
  at::Tensor inputs;
  at::Tensor targets;
  int64_t target_tokens = 0;  // targets that count in the loss
  int64_t tokens = 0;         // input tokens that are not padding
};

// A held-out request with its reference output, for exact match and generation metrics.
struct PromptExample {
  std::vector<int64_t> prompt;
  std::string reference;
  std::string request;
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual Batch train_batch(int64_t step, int64_t batch_size) const = 0;
  // Up to `max_batches` validation batches, the same every call.
  virtual std::vector<Batch> validation_batches(int64_t batch_size, int64_t max_batches) const = 0;
  // Held-out prompts with references (empty for plain token streams).
  virtual std::vector<PromptExample> prompt_examples(int64_t max_examples) const { return {}; }
  // Largest token id + 1 the dataset may produce.
  virtual int64_t vocab_size() const = 0;
  // Longest sequence (inputs) a batch can have.
  virtual int64_t max_sequence_length() const = 0;
  // Whether every training batch of one batch size has the same shape and counts every target
  // (what a step captured once in a CUDA graph needs).
  virtual bool fixed_batch_shape() const { return false; }
  virtual std::string describe() const = 0;
};

// Request -> program pairs: the prompt is the request and a newline, the target the program and
// the end token; loss only on the target. Batches are padded to their longest example.
class PairDataset : public Dataset {
 public:
  PairDataset(std::vector<DslExample> train, std::vector<DslExample> validation, uint64_t seed);
  Batch train_batch(int64_t step, int64_t batch_size) const override;
  std::vector<Batch> validation_batches(int64_t batch_size, int64_t max_batches) const override;
  std::vector<PromptExample> prompt_examples(int64_t max_examples) const override;
  int64_t vocab_size() const override { return ByteTokenizer::kVocabSize; }
  int64_t max_sequence_length() const override;
  std::string describe() const override;

  static std::vector<int64_t> prompt_tokens(const std::string& request);
  const std::vector<DslExample>& train() const { return train_; }
  const std::vector<DslExample>& validation() const { return validation_; }

 private:
  Batch make_batch(const std::vector<const DslExample*>& examples) const;
  // Indices [begin, end) of the shuffled order of `epoch`.
  std::vector<size_t> epoch_slice(int64_t epoch, size_t begin, size_t end) const;
  std::vector<DslExample> train_, validation_;
  uint64_t seed_;
  // The shuffle of the current epoch, computed once per epoch rather than once per batch.
  mutable std::mutex cache_mutex_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<size_t> cached_order_;
};

// Read-only token ids, owned by a vector or a memory-mapped file.
struct TokenSpan {
  const uint16_t* data = nullptr;
  size_t size = 0;
  std::shared_ptr<const void> owner;  // keeps `data` alive
  TokenSpan slice(size_t begin, size_t end) const { return TokenSpan{data + begin, end - begin, owner}; }
  static TokenSpan from_vector(std::vector<uint16_t> tokens);
};

// A flat token stream (bytes of a text file, or uint16 tokens of a nanoGPT .bin file): batches
// are random windows of `block_size` + 1 tokens; loss on every position.
class TokenStreamDataset : public Dataset {
 public:
  TokenStreamDataset(TokenSpan train, TokenSpan validation, int64_t block_size,
                     int64_t vocab_size, uint64_t seed, std::string description);
  Batch train_batch(int64_t step, int64_t batch_size) const override;
  std::vector<Batch> validation_batches(int64_t batch_size, int64_t max_batches) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  int64_t max_sequence_length() const override { return block_size_; }
  bool fixed_batch_shape() const override { return true; }
  std::string describe() const override { return description_; }

 private:
  Batch windows(const TokenSpan& tokens, const std::vector<int64_t>& starts) const;
  TokenSpan train_, validation_;
  int64_t block_size_, vocab_size_;
  uint64_t seed_;
  std::string description_;
};

// Reads a UTF-8 text file as bytes; the last `val_fraction` is the validation split.
// Throws DataError naming `key` (the config key that gave the path) when unreadable or too short.
std::unique_ptr<Dataset> load_text_dataset(const std::string& path, double val_fraction,
                                           int64_t block_size, uint64_t seed, const std::string& key);
// Memory-maps nanoGPT-style uint16 token files (raw little-endian, or llm.c's 256-int32 header);
// `val_path` empty: the last `val_fraction` of `path` is validation. Every token must be below
// `vocab_size`.
std::unique_ptr<Dataset> load_bin_dataset(const std::string& path, const std::string& val_path,
                                          double val_fraction, int64_t block_size,
                                          int64_t vocab_size, uint64_t seed);
// Writes tokens in the raw nanoGPT format (for tests and data preparation).
void write_bin_tokens(const std::string& path, const std::vector<uint16_t>& tokens);

}  // namespace scaletrain::data
