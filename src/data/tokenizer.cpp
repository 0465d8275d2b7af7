#include "scaletrain/data/tokenizer.h"

namespace scaletrain::data {

std::vector<int64_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int64_t> tokens;
  tokens.reserve(text.size());
  for (unsigned char c : text) tokens.push_back(c);
  return tokens;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& tokens) const {
  std::string text;
  text.reserve(tokens.size());
  for (int64_t t : tokens) {
    if (t == kEos) break;
    if (t >= 0 && t < 256) text.push_back(static_cast<char>(t));
  }
  return text;
}

}  // namespace scaletrain::data
