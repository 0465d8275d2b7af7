#include "scaletrain/core/config.h"

#include "scaletrain/core/fs.h"

#include <algorithm>
#include <charconv>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <yaml-cpp/yaml.h>

namespace scaletrain::core {
namespace {

// ---------------------------------------------------------------------------------------------
// Text helpers

std::string join(const std::vector<std::string>& items, const char* separator = ", ") {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += separator;
    out += items[i];
  }
  return out;
}

// True when `s` can be written without quotes and reads back as the same string: letters,
// digits and "_./+-" only, not starting with '-', and not a YAML number, boolean or null.
bool looks_like_plain_yaml_scalar(const std::string& s) {
  if (s.empty() || s.front() == '-') return false;
  for (unsigned char c : s)
    if (!std::isalnum(c) && c != '_' && c != '.' && c != '/' && c != '+' && c != '-') return false;
  std::string lower = s;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  static const std::set<std::string> special = {"true", "false", "yes", "no", "on", "off", "null",
                                                ".inf", "+.inf", ".nan", "y", "n"};
  if (special.count(lower)) return false;
  // Anything that starts like a number must be quoted to stay a string.
  return !(std::isdigit(static_cast<unsigned char>(s.front())) || s.front() == '+' || s.front() == '.');
}

std::string yaml_string(const std::string& s) {
  if (looks_like_plain_yaml_scalar(s)) return s;
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\x%02x", c);
          out += escaped;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string join_path(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// Optimal string alignment distance (Levenshtein with transpositions).
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

std::string last_segment(const std::string& path) {
  auto dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

// ---------------------------------------------------------------------------------------------
// Scalar parsing (strict: YAML 1.2 core schema, no quoted numbers, no NaN/inf)

bool parse_int64(const std::string& text, int64_t& out) {
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  if (begin != end && *begin == '+') ++begin;
  if (begin == end || (*begin == '-' && begin != text.data())) return false;  // "+-5"
  auto [ptr, ec] = std::from_chars(begin, end, out);
  return ec == std::errc() && ptr == end;
}

// Returns 0 for not a number, 1 for a number that overflows int64, 2 for parsed.
int parse_integer(const std::string& text, int64_t& out) {
  if (parse_int64(text, out)) return 2;
  size_t start = (!text.empty() && (text[0] == '+' || text[0] == '-')) ? 1 : 0;
  bool digits = start < text.size() &&
                std::all_of(text.begin() + start, text.end(), [](char c) { return c >= '0' && c <= '9'; });
  return digits ? 1 : 0;
}

bool parse_finite_double(const std::string& text, double& out) {
  // Accept [+-]digits[.digits][e[+-]digits] or [+-].digits[...]: no hex, no inf/nan words.
  size_t i = 0, n = text.size();
  if (i < n && (text[i] == '+' || text[i] == '-')) ++i;
  size_t int_digits = 0, frac_digits = 0;
  while (i < n && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, ++int_digits;
  if (i < n && text[i] == '.') {
    ++i;
    while (i < n && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, ++frac_digits;
  }
  if (int_digits + frac_digits == 0) return false;
  if (i < n && (text[i] == 'e' || text[i] == 'E')) {
    ++i;
    if (i < n && (text[i] == '+' || text[i] == '-')) ++i;
    size_t exp_digits = 0;
    while (i < n && std::isdigit(static_cast<unsigned char>(text[i]))) ++i, ++exp_digits;
    if (exp_digits == 0) return false;
  }
  if (i != n) return false;
  out = std::strtod(text.c_str(), nullptr);
  return std::isfinite(out);
}

// ---------------------------------------------------------------------------------------------
// Visitors

// Lists every dotted key path; also keeps the leaf names of each section for suggestions.
class KeyCollector final : public FieldVisitor {
 public:
  std::vector<std::string> keys;

  void field(const char* name, int64_t&, const char*, Bounds) override { add(name); }
  void field(const char* name, double&, const char*, Bounds) override { add(name); }
  void field(const char* name, bool&, const char*) override { add(name); }
  void field(const char* name, std::string&, const char*, bool) override { add(name); }
  void field(const char* name, std::vector<std::string>&, const char*,
             const std::vector<std::string>&, bool) override {
    add(name);
  }

 protected:
  void choice_field(const char* name, std::string&, const std::vector<std::string>&,
                    const char*) override {
    add(name);
  }
  bool begin_section(const char* name, const char*) override {
    add(name);
    prefix_.push_back(keys.back());
    return true;
  }
  void end_section() override { prefix_.pop_back(); }

 private:
  void add(const char* name) { keys.push_back(join_path(prefix_.empty() ? "" : prefix_.back(), name)); }
  std::vector<std::string> prefix_;
};

class YamlReader final : public FieldVisitor {
 public:
  YamlReader(YAML::Node root, std::string origin, bool has_positions, std::vector<std::string> all_keys)
      : origin_(std::move(origin)), has_positions_(has_positions), all_keys_(std::move(all_keys)) {
    if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
    if (!root.IsMap()) {
      fail(root, "", describe_node(root), "a mapping of sections (" + sections_of("") + ")");
    }
    check_duplicate_keys(root, "");
    stack_.push_back(Frame{root, "", {}});
  }

  // Checks the root mapping for unknown sections; call after visiting.
  void finish() { check_unknown_keys(stack_.back()); }

  void field(const char* name, int64_t& value, const char*, Bounds bounds) override {
    auto node = lookup(name);
    if (!node) return;
    std::string expected = bounds.describe(true);
    int64_t parsed = 0;
    int kind = is_plain_scalar(*node) ? parse_integer(node->Scalar(), parsed) : 0;
    if (kind != 2 || !bounds.contains(static_cast<double>(parsed)))
      fail(*node, path(name), describe_node(*node), expected);
    value = parsed;
  }

  void field(const char* name, double& value, const char*, Bounds bounds) override {
    auto node = lookup(name);
    if (!node) return;
    double parsed = 0;
    bool ok = is_plain_scalar(*node) && parse_finite_double(node->Scalar(), parsed);
    if (!ok || !bounds.contains(parsed))
      fail(*node, path(name), describe_node(*node), bounds.describe(false));
    value = parsed;
  }

  void field(const char* name, bool& value, const char*) override {
    auto node = lookup(name);
    if (!node) return;
    std::string text = is_plain_scalar(*node) ? node->Scalar() : "";
    std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
    if (text != "true" && text != "false")
      fail(*node, path(name), describe_node(*node), "true or false");
    value = text == "true";
  }

  void field(const char* name, std::string& value, const char*, bool non_empty) override {
    auto node = lookup(name);
    if (!node) return;
    const std::string expected = non_empty ? "a non-empty string" : "a string";
    if (!node->IsScalar() || (non_empty && node->Scalar().empty()))
      fail(*node, path(name), describe_node(*node), expected);
    check_tag(*node, path(name), "!!str", expected);
    value = node->Scalar();
  }

  void field(const char* name, std::vector<std::string>& value, const char*,
             const std::vector<std::string>& choices, bool non_empty) override {
    auto node = lookup(name);
    if (!node) return;
    std::string key = path(name);
    std::string expected = "a list of " + (choices.empty() ? std::string("names") : "names from " + join(choices));
    if (!node->IsSequence()) fail(*node, key, describe_node(*node), expected);
    check_tag(*node, key, "!!seq", expected);
    if (non_empty && node->size() == 0) fail(*node, key, "an empty list", "at least one name");
    std::vector<std::string> parsed;
    for (size_t i = 0; i < node->size(); ++i) {
      YAML::Node item = (*node)[i];
      std::string item_key = key + "[" + std::to_string(i) + "]";
      if (!item.IsScalar() || item.Scalar().empty())
        fail(item, item_key, describe_node(item), "a name");
      check_tag(item, item_key, "!!str", "a name");
      check_choice(item, item_key, item.Scalar(), choices);
      if (std::find(parsed.begin(), parsed.end(), item.Scalar()) != parsed.end())
        fail(item, item_key, describe_node(item), "names without repeats");
      parsed.push_back(item.Scalar());
    }
    value = std::move(parsed);
  }

 protected:
  void choice_field(const char* name, std::string& value, const std::vector<std::string>& choices,
                    const char*) override {
    auto node = lookup(name);
    if (!node) return;
    if (!node->IsScalar()) fail(*node, path(name), describe_node(*node), "one of " + join(choices));
    check_tag(*node, path(name), "!!str", "one of " + join(choices));
    check_choice(*node, path(name), node->Scalar(), choices);
    value = node->Scalar();
  }

  bool begin_section(const char* name, const char*) override {
    auto node = lookup(name);
    if (!node || node->IsNull()) return false;
    std::string key = path(name);
    if (!node->IsMap())
      fail(*node, key, describe_node(*node), "a mapping of keys (" + sections_of(key) + ")");
    check_tag(*node, key, "!!map", "a mapping of keys (" + sections_of(key) + ")");
    check_duplicate_keys(*node, key);
    stack_.push_back(Frame{*node, key, {}});
    return true;
  }

  void end_section() override {
    check_unknown_keys(stack_.back());
    stack_.pop_back();
  }

 private:
  struct Frame {
    YAML::Node node;
    std::string path;
    std::vector<std::string> known;
  };

  std::optional<YAML::Node> lookup(const char* name) {
    Frame& frame = stack_.back();
    frame.known.emplace_back(name);
    for (auto it = frame.node.begin(); it != frame.node.end(); ++it) {
      if (it->first.IsScalar() && it->first.Scalar() == name) {
        last_key_mark_ = it->first.Mark();
        return it->second;
      }
    }
    return std::nullopt;
  }

  std::string path(const char* name) const { return join_path(stack_.back().path, name); }

  static bool is_plain_scalar(const YAML::Node& node) {
    // yaml-cpp tags quoted scalars "!" and plain ones "?": "8" in quotes is a string, and so is
    // !!str 8; any other explicit tag (!!float, !custom) is not a number either.
    return node.IsScalar() && node.Tag() == "?";
  }

  // The tag written in the file ("!!str", "!custom"), or "" for none.
  static std::string explicit_tag(const YAML::Node& node) {
    const std::string& tag = node.Tag();
    if (tag.empty() || tag == "?" || tag == "!") return "";
    const std::string core = "tag:yaml.org,2002:";
    return tag.rfind(core, 0) == 0 ? "!!" + tag.substr(core.size()) : tag;
  }

  // Strings, names and lists accept no tag or YAML's own for their kind (!!str, !!seq, !!map).
  void check_tag(const YAML::Node& node, const std::string& key, const char* allowed, const std::string& expected) {
    const std::string tag = explicit_tag(node);
    if (!tag.empty() && tag != allowed) fail(node, key, describe_node(node), expected + " (no tag " + tag + ")");
  }

  static std::string describe_node(const YAML::Node& node) {
    const std::string tag = node.IsDefined() ? explicit_tag(node) : "";
    const std::string prefix = tag.empty() ? "" : tag + " ";
    if (!node.IsDefined() || node.IsNull()) return prefix + "nothing (null)";
    if (node.IsSequence()) return prefix + "a list";
    if (node.IsMap()) return prefix + "a mapping";
    std::string text = node.Scalar();
    if (text.size() > 60) text = text.substr(0, 57) + "...";
    for (char& c : text)
      if (c == '\n' || c == '\r') c = ' ';
    return prefix + (node.Tag() == "!" ? "\"" + text + "\"" : "'" + text + "'");
  }

  // The keys a section accepts, for messages.
  std::string sections_of(const std::string& section) const {
    std::vector<std::string> names;
    for (const auto& key : all_keys_) {
      auto dot = key.rfind('.');
      std::string parent = dot == std::string::npos ? "" : key.substr(0, dot);
      if (parent == section) names.push_back(last_segment(key));
    }
    return join(names);
  }

  void check_choice(const YAML::Node& node, const std::string& key, const std::string& text,
                    const std::vector<std::string>& choices) {
    if (choices.empty() || std::find(choices.begin(), choices.end(), text) != choices.end()) return;
    std::string expected = "one of " + join(choices);
    std::string near = closest_match(text, choices);
    if (!near.empty()) expected += " (did you mean '" + near + "'?)";
    fail(node, key, describe_node(node), expected);
  }

  // yaml-cpp keeps both of two equal keys; a config must say each key once.
  void check_duplicate_keys(const YAML::Node& map, const std::string& path) {
    std::map<std::string, int> first_line;
    for (auto it = map.begin(); it != map.end(); ++it) {
      if (!it->first.IsScalar()) continue;
      auto [at, fresh] = first_line.emplace(it->first.Scalar(), it->first.Mark().line + 1);
      if (!fresh) {
        std::string key = join_path(path, it->first.Scalar());
        throw ConfigError(key, location(it->first) + key + ": duplicate key (first at line " + std::to_string(at->second) + ")");
      }
    }
  }

  void check_unknown_keys(const Frame& frame) {
    for (auto it = frame.node.begin(); it != frame.node.end(); ++it) {
      if (!it->first.IsScalar()) fail(it->first, frame.path, "a complex key", "plain key names");
      const std::string& name = it->first.Scalar();
      if (std::find(frame.known.begin(), frame.known.end(), name) != frame.known.end()) continue;
      std::string key = join_path(frame.path, name);
      // Suggest, in order: the same name in another section ("model.batch_size" ->
      // "train.batch_size"), a near sibling, a near name elsewhere, else list the siblings.
      std::string hint;
      std::vector<std::string> leaves;
      for (const auto& candidate : all_keys_) leaves.push_back(last_segment(candidate));
      std::string near = closest_match(name, frame.known);
      auto same = std::find(leaves.begin(), leaves.end(), name);
      if (same != leaves.end()) {
        hint = "did you mean '" + all_keys_[static_cast<size_t>(same - leaves.begin())] + "'?";
      } else if (!near.empty()) {
        hint = "did you mean '" + join_path(frame.path, near) + "'?";
      } else if (std::string elsewhere = closest_match(name, leaves); !elsewhere.empty()) {
        auto at = std::find(leaves.begin(), leaves.end(), elsewhere);
        hint = "did you mean '" + all_keys_[static_cast<size_t>(at - leaves.begin())] + "'?";
      } else {
        hint = "known keys here: " + join(frame.known);
      }
      throw ConfigError(key, location(it->first) + key + ": unknown key (" + hint + ")");
    }
  }

  std::string location(const YAML::Node& node) const {
    std::string loc = origin_;
    if (has_positions_) {
      // A null value has no position of its own: point at its key.
      YAML::Mark mark = node.IsDefined() && !node.IsNull() ? node.Mark() : last_key_mark_;
      if (mark.line >= 0) loc += ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
    }
    return loc + ": ";
  }

  [[noreturn]] void fail(const YAML::Node& node, const std::string& key, const std::string& got,
                         const std::string& expected) const {
    std::string where = key.empty() ? "" : key + ": ";
    throw ConfigError(key, location(node) + where + "got " + got + ", expected " + expected);
  }

  std::string origin_;
  bool has_positions_;
  std::vector<std::string> all_keys_;
  std::vector<Frame> stack_;
  YAML::Mark last_key_mark_ = YAML::Mark::null_mark();
};

// Writes each leaf value as YAML text and hands it to leaf(); sections to begin/end.
class ValueWriter : public FieldVisitor {
 public:
  void field(const char* name, int64_t& value, const char*, Bounds) override {
    leaf(name, std::to_string(value));
  }
  void field(const char* name, double& value, const char*, Bounds) override {
    leaf(name, format_number(value));
  }
  void field(const char* name, bool& value, const char*) override {
    leaf(name, value ? "true" : "false");
  }
  void field(const char* name, std::string& value, const char*, bool) override {
    leaf(name, yaml_string(value));
  }
  void field(const char* name, std::vector<std::string>& value, const char*,
             const std::vector<std::string>&, bool) override {
    std::vector<std::string> items;
    for (const auto& v : value) items.push_back(yaml_string(v));
    leaf(name, "[" + join(items) + "]");
  }

 protected:
  void choice_field(const char* name, std::string& value, const std::vector<std::string>&,
                    const char*) override {
    leaf(name, value);
  }
  virtual void leaf(const char* name, const std::string& value) = 0;
};

class YamlWriter final : public ValueWriter {
 public:
  std::ostringstream out;

 protected:
  bool begin_section(const char* name, const char*) override {
    out << indent() << name << ":\n";
    ++depth_;
    return true;
  }
  void end_section() override { --depth_; }
  void leaf(const char* name, const std::string& value) override {
    out << indent() << name << ": " << value << "\n";
  }

 private:
  std::string indent() const { return std::string(2 * depth_, ' '); }
  int depth_ = 0;
};

// Every leaf as (dotted key path, YAML value text).
class KeyValueCollector final : public ValueWriter {
 public:
  std::vector<std::pair<std::string, std::string>> values;

 protected:
  bool begin_section(const char* name, const char*) override {
    prefix_.push_back(join_path(prefix_.empty() ? "" : prefix_.back(), name));
    return true;
  }
  void end_section() override { prefix_.pop_back(); }
  void leaf(const char* name, const std::string& value) override {
    values.emplace_back(join_path(prefix_.empty() ? "" : prefix_.back(), name), value);
  }

 private:
  std::vector<std::string> prefix_;
};

class ReferenceWriter final : public FieldVisitor {
 public:
  std::ostringstream out;
  ReferenceWriter() {
    out << "| key | type | default | description |\n|---|---|---|---|\n";
  }

  void field(const char* name, int64_t& value, const char* doc, Bounds bounds) override {
    row(name, bounds.describe(true), std::to_string(value), doc);
  }
  void field(const char* name, double& value, const char* doc, Bounds bounds) override {
    row(name, bounds.describe(false), format_number(value), doc);
  }
  void field(const char* name, bool& value, const char* doc) override {
    row(name, "true or false", value ? "true" : "false", doc);
  }
  void field(const char* name, std::string& value, const char* doc, bool non_empty) override {
    row(name, non_empty ? "a non-empty string" : "a string", value.empty() ? "\"\"" : value, doc);
  }
  void field(const char* name, std::vector<std::string>& value, const char* doc,
             const std::vector<std::string>& choices, bool) override {
    row(name, "list of " + (choices.empty() ? std::string("names") : join(choices, " | ")),
        "[" + join(value) + "]", doc);
  }

 protected:
  void choice_field(const char* name, std::string& value, const std::vector<std::string>& choices,
                    const char* doc) override {
    row(name, join(choices, " \\| "), value, doc);
  }
  bool begin_section(const char* name, const char* doc) override {
    prefix_.push_back(join_path(prefix_.empty() ? "" : prefix_.back(), name));
    out << "| **" << prefix_.back() << "** | section | | " << doc << " |\n";
    return true;
  }
  void end_section() override { prefix_.pop_back(); }

 private:
  void row(const char* name, const std::string& type, const std::string& value, const char* doc) {
    std::string shown_type = type;
    size_t pos = 0;
    while ((pos = shown_type.find('|', pos)) != std::string::npos) {
      if (pos == 0 || shown_type[pos - 1] != '\\') shown_type.insert(pos++, "\\");
      ++pos;
    }
    out << "| `" << join_path(prefix_.empty() ? "" : prefix_.back(), name) << "` | " << shown_type
        << " | `" << value << "` | " << doc << " |\n";
  }
  std::vector<std::string> prefix_;
};

[[noreturn]] void malformed(const std::string& origin, const YAML::Mark& mark, const std::string& what) {
  std::string where = origin;
  if (mark.line >= 0) where += ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
  throw ConfigError("", where + ": malformed YAML: " + what);
}

// Byte offset of the first byte that is not part of well-formed UTF-8, or npos.
size_t first_invalid_utf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto byte = static_cast<unsigned char>(text[i]);
    size_t length = byte < 0x80 ? 1 : (byte >> 5) == 0x6 ? 2 : (byte >> 4) == 0xe ? 3 : (byte >> 3) == 0x1e ? 4 : 0;
    if (length == 0 || i + length > text.size()) return i;
    uint32_t code = length == 1 ? byte : byte & (0x7f >> length);
    for (size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next >> 6) != 0x2) return i;
      code = (code << 6) | (next & 0x3f);
    }
    // Overlong forms, UTF-16 surrogates and values past U+10FFFF are not UTF-8.
    static constexpr uint32_t kSmallest[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (code < kSmallest[length] || (code >= 0xd800 && code <= 0xdfff) || code > 0x10ffff) return i;
    i += length;
  }
  return std::string_view::npos;
}

YAML::Mark mark_of_offset(std::string_view text, size_t offset) {
  YAML::Mark mark;
  mark.pos = static_cast<int>(offset);
  mark.line = static_cast<int>(std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(offset), '\n'));
  const size_t line_start = text.rfind('\n', offset == 0 ? 0 : offset - 1);
  mark.column = static_cast<int>(line_start == std::string_view::npos || offset == 0 ? offset : offset - line_start - 1);
  return mark;
}

// yaml-cpp ends a quoted scalar that is never closed at the end of the text without an error.
// A quoted scalar's mark is its opening quote: it must have a closing one. `seen` holds the
// collections already walked (by text position): an alias (`&a [*a]`) may make the tree a cycle.
void check_quotes_closed(const YAML::Node& node, std::string_view text, const std::string& origin,
                         std::set<int>& seen) {
  if (node.IsMap() || node.IsSequence()) {
    if (!seen.insert(node.Mark().pos).second) return;
    if (node.IsMap()) {
      for (auto it = node.begin(); it != node.end(); ++it) {
        check_quotes_closed(it->first, text, origin, seen);
        check_quotes_closed(it->second, text, origin, seen);
      }
    } else {
      for (const auto& item : node) check_quotes_closed(item, text, origin, seen);
    }
    return;
  }
  const YAML::Mark mark = node.Mark();
  if (!node.IsScalar() || mark.pos < 0 || static_cast<size_t>(mark.pos) >= text.size()) return;
  const char quote = text[static_cast<size_t>(mark.pos)];
  if (quote != '"' && quote != '\'') return;
  for (size_t i = static_cast<size_t>(mark.pos) + 1; i < text.size(); ++i) {
    if (quote == '"' && text[i] == '\\') {
      ++i;  // an escape: the next character is not the closing quote
    } else if (text[i] == quote) {
      if (quote == '\'' && i + 1 < text.size() && text[i + 1] == '\'') {
        ++i;  // '' is a quote inside a single-quoted scalar
      } else {
        return;
      }
    }
  }
  malformed(origin, mark, std::string("a ") + (quote == '"' ? "double" : "single") + "-quoted string is never closed");
}

YAML::Node parse_yaml(std::string_view text, const std::string& origin) {
  if (const size_t bad = first_invalid_utf8(text); bad != std::string_view::npos) {
    char byte[8];
    std::snprintf(byte, sizeof(byte), "0x%02x", static_cast<unsigned char>(text[bad]));
    malformed(origin, mark_of_offset(text, bad), std::string("byte ") + byte + " is not UTF-8 (expected UTF-8 text)");
  }
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(std::string(text));
  } catch (const YAML::Exception& e) {
    malformed(origin, e.mark, e.msg);
  }
  if (documents.size() > 1) {
    malformed(origin, documents[1].Mark(),
              "a second document (after '---'); expected one configuration per file");
  }
  YAML::Node root = documents.empty() ? YAML::Node() : documents.front();
  std::set<int> seen;
  check_quotes_closed(root, text, origin, seen);
  return root;
}

void read_node(const VisitRoot& root, const YAML::Node& node, const std::string& origin,
               bool has_positions) {
  YamlReader reader(node, origin, has_positions, key_paths(root));
  root(reader);
  reader.finish();
}

}  // namespace

std::string format_number(double value) {
  char buffer[64];
  auto [end, ec] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  std::string text(buffer, ec == std::errc() ? end : buffer);
  // Keep floats recognisable as floats in YAML ("1" -> "1.0").
  if (text.find_first_of(".eEn") == std::string::npos) text += ".0";
  return text;
}

bool Bounds::contains(double value) const {
  if (min && (min_exclusive ? value <= *min : value < *min)) return false;
  if (max && (max_exclusive ? value >= *max : value > *max)) return false;
  return true;
}

std::string Bounds::describe(bool integer) const {
  std::string what = integer ? "an integer" : "a finite number";
  auto show = [&](double v) { return integer ? std::to_string(static_cast<int64_t>(v)) : format_number(v); };
  if (min && max) {
    return what + " in " + (min_exclusive ? "(" : "[") + show(*min) + ", " + show(*max) +
           (max_exclusive ? ")" : "]");
  }
  if (min) return what + (min_exclusive ? " > " : " >= ") + show(*min);
  if (max) return what + (max_exclusive ? " < " : " <= ") + show(*max);
  return what;
}

std::string closest_match(std::string_view word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = std::max<size_t>(2, word.size() / 3) + 1;
  for (const auto& candidate : candidates) {
    size_t d = edit_distance(word, candidate);
    if (d < best_distance) best_distance = d, best = candidate;
  }
  if (!best.empty() || word.size() < 3) return best;
  // A shortened or lengthened name ("optimizer" for "optim").
  for (const auto& candidate : candidates) {
    if (candidate.size() >= 3 && (candidate.rfind(word, 0) == 0 || word.rfind(candidate, 0) == 0)) return candidate;
  }
  return "";
}

std::vector<std::string> key_paths(const VisitRoot& root) {
  KeyCollector collector;
  root(collector);
  return collector.keys;
}

void apply_yaml(const VisitRoot& root, std::string_view yaml_text, const std::string& origin) {
  read_node(root, parse_yaml(yaml_text, origin), origin, true);
}

void apply_yaml_file(const VisitRoot& root, const std::string& path) {
  std::string text;
  try {
    text = read_file(path);
  } catch (const IOError& e) {
    throw ConfigError("", std::string("config file ") + e.what());
  }
  apply_yaml(root, text, path);
}

void apply_override(const VisitRoot& root, const std::string& assignment) {
  auto eq = assignment.find('=');
  std::string key = eq == std::string::npos ? "" : assignment.substr(0, eq);
  bool key_ok = !key.empty() && key.front() != '.' && key.back() != '.' &&
                key.find("..") == std::string::npos &&
                std::all_of(key.begin(), key.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.'; });
  if (!key_ok) {
    throw UsageError("--set '" + assignment +
                     "': expected KEY=VALUE with a dotted key, e.g. train.batch_size=16");
  }
  std::string value_text = assignment.substr(eq + 1);
  std::string origin = "--set " + assignment;
  // "key=" sets an empty string (e.g. train.out_dir= to write no run folder).
  YAML::Node value = value_text.empty() ? YAML::Node(std::string()) : parse_yaml(value_text, origin);
  // Build {a: {b: {c: value}}} and read it like a file.
  std::vector<std::string> parts;
  std::stringstream split(key);
  for (std::string part; std::getline(split, part, '.');) parts.push_back(part);
  YAML::Node node = value;
  for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
    YAML::Node parent(YAML::NodeType::Map);
    parent[*it] = node;
    node = parent;
  }
  read_node(root, node, origin, false);
}

std::vector<std::pair<std::string, std::string>> key_values(const VisitRoot& root) {
  KeyValueCollector collector;
  root(collector);
  return collector.values;
}

std::string to_yaml(const VisitRoot& root) {
  YamlWriter writer;
  root(writer);
  return writer.out.str();
}

std::string reference_markdown(const VisitRoot& root) {
  ReferenceWriter writer;
  root(writer);
  return writer.out.str();
}

}  // namespace scaletrain::core
