// check_program: the grammar of docs/dsl.md as code. Programs are in canonical form (single
// spaces), which is also what exact match compares.
#include <algorithm>
#include <cctype>
#include <set>
#include <map>
#include <tuple>

#include "scaletrain/data/dsl.h"

namespace scaletrain::data {
namespace {

std::vector<std::string> split_on(std::string_view text, std::string_view separator) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t at = text.find(separator, start);
    parts.emplace_back(text.substr(start, at == std::string_view::npos ? std::string_view::npos : at - start));
    if (at == std::string_view::npos) return parts;
    start = at + separator.size();
  }
}

bool is_identifier(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return std::islower(static_cast<unsigned char>(c)) || c == '_'; });
}

// Decimal without sign or leading zeros, at least `min`.
bool is_count(const std::string& s, int64_t min = 0) {
  if (s.empty() || s.size() > 9 || !std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c) != 0; })) return false;
  if (s.size() > 1 && s[0] == '0') return false;
  return std::stoll(s) >= min;
}

std::string check_stage(const std::vector<std::string>& w) {
  static const std::set<std::string> ops = {">=", ">", "<", "<=", "==", "!="};
  const std::string& verb = w.empty() ? std::string() : w[0];
  if (verb == "keep") {
    if (w.size() == 4 && is_identifier(w[1]) && ops.count(w[2]) && is_count(w[3])) return "";
    return "expected 'keep FIELD OP NUMBER' with OP one of >= > < <= == !=";
  }
  if (verb == "sort") {
    if (w.size() == 3 && is_identifier(w[1]) && (w[2] == "asc" || w[2] == "desc")) return "";
    return "expected 'sort FIELD asc|desc'";
  }
  if (verb == "take") {
    if (w.size() == 2 && is_count(w[1], 1)) return "";
    return "expected 'take COUNT' with COUNT >= 1";
  }
  if (verb == "group") {
    if (w.size() == 4 && is_identifier(w[1]) && w[2] == "sum" && is_identifier(w[3]) && w[1] != w[3]) return "";
    return "expected 'group KEY sum FIELD' with two different fields";
  }
  if (verb == "roll") {
    if (w.size() == 4 && is_count(w[1], 2) && w[2] == "mean" && is_identifier(w[3])) return "";
    return "expected 'roll WINDOW mean FIELD' with WINDOW >= 2";
  }
  if (verb == "rename") {
    if (w.size() == 3 && is_identifier(w[1]) && is_identifier(w[2]) && w[1] != w[2]) return "";
    return "expected 'rename FIELD NEW' with two different names";
  }
  return "unknown stage '" + verb + "' (keep, sort, take, group, roll, rename)";
}

std::string check_flowroll(std::string_view program) {
  auto stages = split_on(program, " | ");
  auto head = split_on(stages[0], " ");
  if (head.size() != 2) return "flowroll: expected 'flowroll SOURCE.EXT' before the first '|'";
  auto dot = head[1].find('.');
  static const std::set<std::string> extensions = {"csv", "json", "log"};
  if (dot == std::string::npos || !is_identifier(head[1].substr(0, dot)) ||
      !extensions.count(head[1].substr(dot + 1)))
    return "flowroll: source '" + head[1] + "' is not NAME.csv, NAME.json or NAME.log";
  for (size_t i = 1; i < stages.size(); ++i) {
    std::string problem = check_stage(split_on(stages[i], " "));
    if (!problem.empty()) return "flowroll: stage " + std::to_string(i) + " '" + stages[i] + "': " + problem;
  }
  return "";
}

// One side of a DIMMATCH rule: axes are single letters, groups "(a b ...)" of two or more.
struct Side {
  std::vector<std::vector<char>> axes;  // a group is one entry with several letters
};

std::string parse_side(const std::string& text, Side& side) {
  size_t i = 0;
  while (i < text.size()) {
    if (text[i] == '(') {
      std::vector<char> group;
      ++i;
      while (i < text.size() && text[i] != ')') {
        if (std::islower(static_cast<unsigned char>(text[i]))) group.push_back(text[i]);
        else if (text[i] != ' ') return std::string("unexpected '") + text[i] + "' in a group";
        ++i;
      }
      if (i == text.size()) return "unclosed '('";
      if (group.size() < 2) return "a group needs at least two axes";
      side.axes.push_back(group);
      ++i;
    } else if (std::islower(static_cast<unsigned char>(text[i]))) {
      side.axes.push_back({text[i]});
      ++i;
    } else {
      return std::string("unexpected '") + text[i] + "'";
    }
    if (i < text.size()) {
      if (text[i] != ' ') return "axes must be single letters separated by spaces";
      ++i;
    }
  }
  if (side.axes.empty()) return "no axes";
  return "";
}

std::string check_dimmatch(std::string_view program) {
  std::string rest(program.substr(std::string_view("dimmatch ").size()));
  std::string reducer;
  if (auto at = rest.find(" reduce "); at != std::string::npos) {
    reducer = rest.substr(at + 8);
    rest.resize(at);
    if (reducer != "mean" && reducer != "sum" && reducer != "max")
      return "dimmatch: reducer '" + reducer + "' is not mean, sum or max";
  }
  std::map<char, std::string> bound;
  if (auto at = rest.find(" where "); at != std::string::npos) {
    for (const auto& binding : split_on(rest.substr(at + 7), " ")) {
      if (binding.size() < 3 || !std::islower(static_cast<unsigned char>(binding[0])) || binding[1] != '=' ||
          !is_count(binding.substr(2), 1))
        return "dimmatch: binding '" + binding + "' is not AXIS=SIZE with SIZE >= 1";
      if (!bound.emplace(binding[0], binding.substr(2)).second)
        return std::string("dimmatch: axis '") + binding[0] + "' bound twice";
    }
    rest.resize(at);
  }
  auto sides = split_on(rest, " -> ");
  if (sides.size() != 2) return "dimmatch: expected 'LEFT -> RIGHT'";
  Side left, right;
  for (auto [text, side, name] : {std::tuple{&sides[0], &left, "left"}, std::tuple{&sides[1], &right, "right"}}) {
    std::string problem = parse_side(*text, *side);
    if (!problem.empty()) return std::string("dimmatch: ") + name + " side: " + problem;
  }
  auto letters = [](const Side& side, std::set<char>& out, std::set<char>& grouped) -> char {
    for (const auto& axis : side.axes)
      for (char c : axis) {
        if (!out.insert(c).second) return c;
        if (axis.size() > 1) grouped.insert(c);
      }
    return 0;
  };
  std::set<char> in, out, in_grouped, out_grouped;
  if (char c = letters(left, in, in_grouped)) return std::string("dimmatch: axis '") + c + "' repeats on the left";
  if (char c = letters(right, out, out_grouped)) return std::string("dimmatch: axis '") + c + "' repeats on the right";
  for (char c : out)
    if (!in.count(c) && !bound.count(c))
      return std::string("dimmatch: new axis '") + c + "' on the right needs a size in 'where'";
  bool dropped = false;
  for (char c : in) dropped |= !out.count(c);
  if (dropped && reducer.empty()) return "dimmatch: axes vanish on the right without 'reduce'";
  if (!dropped && !reducer.empty()) return "dimmatch: 'reduce' given but no axis is reduced";
  for (const auto& [c, size] : bound)
    if (in.count(c) && !in_grouped.count(c))
      return std::string("dimmatch: '") + c + "' is bound but is a whole axis on the left";
  for (const auto& [c, size] : bound)
    if (!in.count(c) && !out.count(c)) return std::string("dimmatch: bound axis '") + c + "' is not used";
  return "";
}

}  // namespace

std::string check_program(std::string_view program) {
  if (program.rfind("flowroll ", 0) == 0) return check_flowroll(program);
  if (program.rfind("dimmatch ", 0) == 0) return check_dimmatch(program);
  return "a program starts with 'flowroll ' or 'dimmatch '";
}

}  // namespace scaletrain::data
