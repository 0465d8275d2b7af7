#pragma once
// Typed configuration: plain option structs describe their fields once, through `visit`, and the
// same description reads YAML, applies `--set key.path=value` overrides, prints the resolved
// configuration and writes the reference documentation.
//
//   struct OptimizerConfig {
//     TORCH_ARG(double, lr) = 3e-4;
//     void visit(core::FieldVisitor& v) { v.field("lr", lr(), "peak learning rate", greater_than(0)); }
//   };
//
// Every error is a ConfigError with one line: where the value came from (file:line:column or the
// --set argument), the dotted key, the value given and what is expected, with "did you mean" for
// near misses.
#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "scaletrain/core/error.h"

namespace scaletrain::core {

// Allowed range of a numeric field; both ends optional, each inclusive or exclusive.
struct Bounds {
  std::optional<double> min;
  std::optional<double> max;
  bool min_exclusive = false;
  bool max_exclusive = false;

  bool contains(double value) const;
  // "an integer >= 1", "a number in (0, 1]" ...
  std::string describe(bool integer) const;
};
inline Bounds at_least(double v) { return Bounds{v, std::nullopt, false, false}; }
inline Bounds greater_than(double v) { return Bounds{v, std::nullopt, true, false}; }
inline Bounds between(double lo, double hi) { return Bounds{lo, hi, false, false}; }
// lo <= value < hi
inline Bounds half_open(double lo, double hi) { return Bounds{lo, hi, false, true}; }
// lo < value <= hi
inline Bounds open_closed(double lo, double hi) { return Bounds{lo, hi, true, false}; }

// Maps an enum used in a config to its YAML names. Specialise with
//   static constexpr std::array<std::pair<E, const char*>, N> values = {...};
template <typename E>
struct EnumNames;

template <typename E>
const char* enum_name(E value) {
  for (const auto& [e, name] : EnumNames<E>::values)
    if (e == value) return name;
  return "?";
}

// Receives the fields of a config struct. Implementations read YAML, write YAML, list keys or
// print documentation; config structs only call the public members.
class FieldVisitor {
 public:
  virtual ~FieldVisitor() = default;

  virtual void field(const char* name, int64_t& value, const char* doc, Bounds bounds = {}) = 0;
  virtual void field(const char* name, double& value, const char* doc, Bounds bounds = {}) = 0;
  virtual void field(const char* name, bool& value, const char* doc) = 0;
  // `non_empty`: an empty string is rejected.
  virtual void field(const char* name, std::string& value, const char* doc,
                     bool non_empty = false) = 0;
  // A list of distinct names, each one of `choices` (any name when `choices` is empty),
  // at least one when `non_empty`.
  virtual void field(const char* name, std::vector<std::string>& value, const char* doc,
                     const std::vector<std::string>& choices, bool non_empty = true) = 0;

  // An enum field, written by name (see EnumNames).
  template <typename E>
  void choice(const char* name, E& value, const char* doc) {
    std::vector<std::string> names;
    for (const auto& entry : EnumNames<E>::values) names.emplace_back(entry.second);
    std::string current = enum_name(value);
    choice_field(name, current, names, doc);
    for (const auto& [e, n] : EnumNames<E>::values)
      if (current == n) value = e;
  }

  // A nested struct with its own `visit(FieldVisitor&)`.
  template <typename S>
  void section(const char* name, S& value, const char* doc) {
    if (begin_section(name, doc)) {
      value.visit(*this);
      end_section();
    }
  }

 protected:
  virtual void choice_field(const char* name, std::string& value,
                            const std::vector<std::string>& choices, const char* doc) = 0;
  // Returns false to skip the section (absent from the YAML being read).
  virtual bool begin_section(const char* name, const char* doc) = 0;
  virtual void end_section() = 0;
};

// Calls `visit` on the root struct of a configuration.
using VisitRoot = std::function<void(FieldVisitor&)>;

// Reads YAML text into the configuration; only keys present are changed. `origin` names the
// source in messages (a file path). Throws ConfigError.
void apply_yaml(const VisitRoot& root, std::string_view yaml_text, const std::string& origin);
// Reads a YAML file; a missing or unreadable file is a ConfigError naming the path.
void apply_yaml_file(const VisitRoot& root, const std::string& path);
// Applies one "key.path=value" override; the value is YAML ("8", "3e-4", "[a, b]", "true").
// Malformed syntax is a UsageError, a wrong key or value a ConfigError.
void apply_override(const VisitRoot& root, const std::string& assignment);
// The resolved configuration as YAML, every key, in declaration order.
std::string to_yaml(const VisitRoot& root);
// Every key as a Markdown table: key, type, default, allowed values, description.
std::string reference_markdown(const VisitRoot& root);
// All dotted key paths (for completion and suggestions).
std::vector<std::string> key_paths(const VisitRoot& root);
// Every leaf key with its value as YAML text ("model.n_layer" -> "2"), in declaration order.
std::vector<std::pair<std::string, std::string>> key_values(const VisitRoot& root);

// Shortest text that reads back as the same double, always with a '.' or exponent ("1.0").
std::string format_number(double value);

// Nearest candidate within a small edit distance, or "" (used for "did you mean").
std::string closest_match(std::string_view word, const std::vector<std::string>& candidates);

// Convenience wrappers for any struct with `void visit(FieldVisitor&)`.
template <typename T>
VisitRoot root_of(T& config) {
  return [&config](FieldVisitor& v) { config.visit(v); };
}

}  // namespace scaletrain::core
