#pragma once
// Byte-level tokenizer: token i < 256 is the byte i; two special tokens follow.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace scaletrain::data {

class ByteTokenizer {
 public:
  static constexpr int64_t kEos = 256;  // end of a sequence (the model stops generating here)
  static constexpr int64_t kPad = 257;  // filler after the end; never a training target
  static constexpr int64_t kVocabSize = 258;

  std::vector<int64_t> encode(std::string_view text) const;
  // Bytes up to the first end-of-sequence token; padding and other ids >= 256 are dropped.
  std::string decode(const std::vector<int64_t>& tokens) const;
  int64_t vocab_size() const { return kVocabSize; }
};

}  // namespace scaletrain::data
