#include "scaletrain/data/dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>

#include <ATen/ATen.h>

#include "scaletrain/core/error.h"
#include "scaletrain/core/fs.h"

namespace scaletrain::data {
namespace {

constexpr int64_t kIgnore = -100;

// Seed of the random draw for one step, decorrelated from neighbouring steps.
uint64_t step_seed(uint64_t seed, int64_t step) {
  Rng mix(seed ^ (0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(step + 1)));
  return mix.next();
}

// A shuffle of n items for one epoch.
std::vector<size_t> shuffled_epoch(uint64_t seed, int64_t epoch, size_t n) {
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  Rng rng(step_seed(seed, -2 - epoch));
  for (size_t i = n; i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
  return order;
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// PairDataset

PairDataset::PairDataset(std::vector<DslExample> train, std::vector<DslExample> validation,
                         uint64_t seed)
    : train_(std::move(train)), validation_(std::move(validation)), seed_(seed) {
  if (train_.empty()) throw core::DataError("pair dataset: no training examples");
}

std::vector<int64_t> PairDataset::prompt_tokens(const std::string& request) {
  return ByteTokenizer().encode(request + "\n");
}

Batch PairDataset::make_batch(const std::vector<const DslExample*>& examples) const {
  ByteTokenizer tokenizer;
  std::vector<std::vector<int64_t>> sequences;
  std::vector<size_t> prompt_lengths;
  size_t longest = 0;
  for (const DslExample* example : examples) {
    auto sequence = prompt_tokens(example->request);
    prompt_lengths.push_back(sequence.size());
    auto program = tokenizer.encode(example->program);
    sequence.insert(sequence.end(), program.begin(), program.end());
    sequence.push_back(ByteTokenizer::kEos);
    longest = std::max(longest, sequence.size() - 1);
    sequences.push_back(std::move(sequence));
  }
  const int64_t batch = static_cast<int64_t>(examples.size()), seq = static_cast<int64_t>(longest);
  auto inputs = at::full({batch, seq}, ByteTokenizer::kPad, at::kLong);
  auto targets = at::full({batch, seq}, kIgnore, at::kLong);
  auto in = inputs.accessor<int64_t, 2>();
  auto out = targets.accessor<int64_t, 2>();
  int64_t counted = 0, real = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const auto& s = sequences[b];
    real += static_cast<int64_t>(s.size()) - 1;
    for (size_t t = 0; t + 1 < s.size(); ++t) {
      in[b][t] = s[t];
      // The token after position t is a target once t reaches the newline ending the prompt.
      if (t + 1 >= prompt_lengths[b]) out[b][t] = s[t + 1], ++counted;
    }
  }
  return Batch{inputs, targets, counted, real};
}

std::vector<size_t> PairDataset::epoch_slice(int64_t epoch, size_t begin, size_t end) const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (epoch != cached_epoch_) {
    cached_order_ = shuffled_epoch(seed_, epoch, train_.size());
    cached_epoch_ = epoch;
  }
  return std::vector<size_t>(cached_order_.begin() + static_cast<std::ptrdiff_t>(begin),
                             cached_order_.begin() + static_cast<std::ptrdiff_t>(end));
}

Batch PairDataset::train_batch(int64_t step, int64_t batch_size) const {
  // Each epoch is a fresh shuffle cut into windows of kGroup batches; inside a window examples
  // are sorted by length before being cut into batches, so a batch pads little, and the batches
  // of a window come in shuffled order. Everything derives from (seed, step): no cursor.
  constexpr int64_t kGroup = 16;
  const int64_t n = static_cast<int64_t>(train_.size());
  if (batch_size > n) {
    throw core::ConfigError("train.batch_size", "train.batch_size: got " + std::to_string(batch_size) +
                                                    ", expected at most the " + std::to_string(n) + " training examples");
  }
  const int64_t per_epoch = n / batch_size;
  const int64_t epoch = step / per_epoch, index = step % per_epoch;
  const int64_t window = index / kGroup;
  const int64_t window_batches = std::min(kGroup, per_epoch - window * kGroup);
  const auto first = static_cast<size_t>(window * kGroup * batch_size);
  std::vector<size_t> members = epoch_slice(epoch, first, first + static_cast<size_t>(window_batches * batch_size));
  std::stable_sort(members.begin(), members.end(), [&](size_t a, size_t b) {
    return train_[a].request.size() + train_[a].program.size() < train_[b].request.size() + train_[b].program.size();
  });
  std::vector<int64_t> slots(static_cast<size_t>(window_batches));
  std::iota(slots.begin(), slots.end(), 0);
  Rng rng(step_seed(seed_, -1'000'000 - epoch * per_epoch - window));
  for (size_t i = slots.size(); i > 1; --i) std::swap(slots[i - 1], slots[rng.below(i)]);
  const int64_t slot = slots[static_cast<size_t>(index % kGroup)];
  std::vector<const DslExample*> picked;
  for (int64_t i = 0; i < batch_size; ++i) picked.push_back(&train_[members[static_cast<size_t>(slot * batch_size + i)]]);
  return make_batch(picked);
}

std::vector<Batch> PairDataset::validation_batches(int64_t batch_size, int64_t max_batches) const {
  std::vector<Batch> batches;
  for (size_t start = 0; start < validation_.size() && static_cast<int64_t>(batches.size()) < max_batches;
       start += batch_size) {
    std::vector<const DslExample*> picked;
    for (size_t i = start; i < std::min(validation_.size(), start + batch_size); ++i)
      picked.push_back(&validation_[i]);
    batches.push_back(make_batch(picked));
  }
  return batches;
}

std::vector<PromptExample> PairDataset::prompt_examples(int64_t max_examples) const {
  std::vector<PromptExample> examples;
  for (const auto& example : validation_) {
    if (static_cast<int64_t>(examples.size()) >= max_examples) break;
    examples.push_back({prompt_tokens(example.request), example.program, example.request});
  }
  return examples;
}

int64_t PairDataset::max_sequence_length() const {
  size_t longest = 0;
  for (const auto* split : {&train_, &validation_})
    for (const auto& e : *split) longest = std::max(longest, e.request.size() + 1 + e.program.size());
  return static_cast<int64_t>(longest);  // prompt + program + end token, minus the shift
}

std::string PairDataset::describe() const {
  std::ostringstream out;
  out << "request->program pairs: " << train_.size() << " train, " << validation_.size()
      << " validation, longest " << max_sequence_length() << " tokens";
  return out.str();
}

// ---------------------------------------------------------------------------------------------
// TokenStreamDataset

TokenSpan TokenSpan::from_vector(std::vector<uint16_t> tokens) {
  auto owned = std::make_shared<const std::vector<uint16_t>>(std::move(tokens));
  return TokenSpan{owned->data(), owned->size(), owned};
}

TokenStreamDataset::TokenStreamDataset(TokenSpan train, TokenSpan validation, int64_t block_size,
                                       int64_t vocab_size, uint64_t seed, std::string description)
    : train_(std::move(train)),
      validation_(std::move(validation)),
      block_size_(block_size),
      vocab_size_(vocab_size),
      seed_(seed),
      description_(std::move(description)) {}

Batch TokenStreamDataset::windows(const TokenSpan& tokens, const std::vector<int64_t>& starts) const {
  const int64_t batch = static_cast<int64_t>(starts.size());
  auto raw = at::empty({batch, block_size_ + 1}, at::kLong);
  auto view = raw.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t <= block_size_; ++t) {
      const uint16_t token = tokens.data[starts[b] + t];
      if (token >= vocab_size_) {
        throw core::DataError("token " + std::to_string(token) + " at offset " +
                              std::to_string(starts[b] + t) + " is >= model.vocab_size (" +
                              std::to_string(vocab_size_) + "): raise model.vocab_size");
      }
      view[b][t] = token;
    }
  }
  return Batch{raw.narrow(1, 0, block_size_).contiguous(), raw.narrow(1, 1, block_size_).contiguous(),
               batch * block_size_, batch * block_size_};
}

Batch TokenStreamDataset::train_batch(int64_t step, int64_t batch_size) const {
  Rng rng(step_seed(seed_, step));
  std::vector<int64_t> starts;
  for (int64_t b = 0; b < batch_size; ++b)
    starts.push_back(static_cast<int64_t>(rng.below(train_.size - block_size_)));
  return windows(train_, starts);
}

std::vector<Batch> TokenStreamDataset::validation_batches(int64_t batch_size, int64_t max_batches) const {
  // Consecutive, non-overlapping windows from the start of the validation split.
  std::vector<Batch> batches;
  const int64_t available = static_cast<int64_t>(validation_.size) - 1;
  int64_t start = 0;
  while (static_cast<int64_t>(batches.size()) < max_batches && start + block_size_ <= available) {
    std::vector<int64_t> starts;
    while (static_cast<int64_t>(starts.size()) < batch_size && start + block_size_ <= available) {
      starts.push_back(start);
      start += block_size_;
    }
    batches.push_back(windows(validation_, starts));
  }
  return batches;
}

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

// Splits `tokens` into train and validation and checks both are long enough for one window.
std::unique_ptr<Dataset> make_stream(TokenSpan train, TokenSpan validation, int64_t block_size,
                                     int64_t vocab_size, uint64_t seed, const std::string& what,
                                     const std::string& key) {
  for (const auto& [span, name] : {std::pair{&train, "training"}, std::pair{&validation, "validation"}}) {
    if (static_cast<int64_t>(span->size) <= block_size + 1) {
      throw core::DataError(key + ": " + what + ": the " + name + " split has " +
                            std::to_string(span->size) + " tokens, expected more than model.block_size + 1 = " +
                            std::to_string(block_size + 1));
    }
  }
  std::ostringstream description;
  description << what << ": " << train.size << " train tokens, " << validation.size << " validation tokens";
  return std::make_unique<TokenStreamDataset>(std::move(train), std::move(validation), block_size,
                                              vocab_size, seed, description.str());
}

std::pair<TokenSpan, TokenSpan> split_tail(const TokenSpan& all, double val_fraction) {
  const size_t val = static_cast<size_t>(static_cast<double>(all.size) * val_fraction);
  return {all.slice(0, all.size - val), all.slice(all.size - val, all.size)};
}

struct Mapping {
  void* address = MAP_FAILED;
  size_t length = 0;
  ~Mapping() {
    if (address != MAP_FAILED) munmap(address, length);
  }
};

TokenSpan map_bin_file(const std::string& path, const std::string& key) {
  const std::string where = key + " '" + path + "'";
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);  // a named pipe must not block: refused below
  if (fd < 0) throw core::DataError(where + ": cannot open (" + errno_text() + ")");
  struct stat info {};
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    throw core::DataError(where + ": not a regular file");
  }
  const size_t bytes = static_cast<size_t>(info.st_size);
  if (bytes == 0 || bytes % 2 != 0) {
    ::close(fd);
    throw core::DataError(where + ": " + std::to_string(bytes) +
                          " bytes, expected a non-empty file of uint16 tokens (an even size)");
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->address = mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (mapping->address == MAP_FAILED) throw core::DataError(where + ": mmap failed (" + errno_text() + ")");
  mapping->length = bytes;
  const auto* tokens = static_cast<const uint16_t*>(mapping->address);
  size_t count = bytes / 2;
  // llm.c files start with 256 int32: magic 20240520, version, token count.
  const auto* header = static_cast<const int32_t*>(mapping->address);
  if (bytes >= 1024 && header[0] == 20240520) {
    if (header[1] != 1)
      throw core::DataError(where + ": llm.c token file version " + std::to_string(header[1]) +
                            ", expected version 1 (uint16 tokens)");
    const size_t declared = static_cast<size_t>(header[2]);
    if (declared > (bytes - 1024) / 2)
      throw core::DataError(where + ": header declares " + std::to_string(declared) +
                            " tokens, the file holds " + std::to_string((bytes - 1024) / 2) + " (truncated?)");
    tokens += 512;
    count = declared;
  }
  return TokenSpan{tokens, count, mapping};
}

}  // namespace

std::unique_ptr<Dataset> load_text_dataset(const std::string& path, double val_fraction,
                                           int64_t block_size, uint64_t seed, const std::string& key) {
  std::string bytes;
  try {
    bytes = core::read_file(path);
  } catch (const core::IOError& e) {
    throw core::DataError(key + " " + e.what());
  }
  std::vector<uint16_t> tokens(bytes.begin(), bytes.end());
  for (auto& t : tokens) t = static_cast<uint16_t>(static_cast<unsigned char>(t));
  auto [train, validation] = split_tail(TokenSpan::from_vector(std::move(tokens)), val_fraction);
  return make_stream(std::move(train), std::move(validation), block_size,
                     ByteTokenizer::kVocabSize, seed, "text '" + path + "'", key);
}

std::unique_ptr<Dataset> load_bin_dataset(const std::string& path, const std::string& val_path,
                                          double val_fraction, int64_t block_size,
                                          int64_t vocab_size, uint64_t seed) {
  TokenSpan all = map_bin_file(path, "data.path");
  TokenSpan train, validation;
  if (val_path.empty()) {
    std::tie(train, validation) = split_tail(all, val_fraction);
  } else {
    train = all;
    validation = map_bin_file(val_path, "data.val_path");
  }
  return make_stream(std::move(train), std::move(validation), block_size, vocab_size, seed,
                     "tokens '" + path + "'", "data.path");
}

void write_bin_tokens(const std::string& path, const std::vector<uint16_t>& tokens) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(reinterpret_cast<const char*>(tokens.data()),
             static_cast<std::streamsize>(tokens.size() * sizeof(uint16_t)));
  file.close();
  if (!file) throw core::IOError("'" + path + "': write failed");
}

}  // namespace scaletrain::data
