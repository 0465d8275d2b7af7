#include "scaletrain/data/dsl.h"

#include <algorithm>
#include <map>
#include <set>
#include <sstream>
#include <unordered_set>

#include "scaletrain/core/error.h"

namespace scaletrain::data {

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t Rng::below(uint64_t n) {
  // Rejection sampling keeps the draw unbiased.
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = next();
  while (x >= limit);
  return x % n;
}

uint64_t stable_hash(std::string_view text) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : text) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Vocabulary

const std::vector<std::string> kSources = {"orders", "users", "sensors", "logs", "sales",
                                           "events", "metrics", "trips", "clicks", "jobs"};
const std::vector<std::string> kExtensions = {"csv", "json", "log"};
const std::vector<std::string> kFields = {"price", "qty", "age",  "score", "region", "city",
                                          "user",  "day", "temp", "load",  "hits",   "cost"};
const std::vector<std::string> kOperators = {">=", ">", "<", "<=", "==", "!="};

// English phrasings of "field OP number".
const std::map<std::string, std::vector<std::string>> kOperatorWords = {
    {">=", {"is at least", "is no less than", ">="}},
    {">", {"exceeds", "is above", "is more than"}},
    {"<", {"is below", "is under", "is less than"}},
    {"<=", {"is at most", "is no more than", "<="}},
    {"==", {"equals", "is exactly", "=="}},
    {"!=", {"is not", "differs from", "!="}}};
// Rows dropped where "f OP n" are the rows kept where "f negate(OP) n".
const std::map<std::string, std::string> kNegated = {{">=", "<"}, {">", "<="}, {"<", ">="},
                                                     {"<=", ">"}, {"==", "!="}, {"!=", "=="}};

// DIMMATCH axis names and their one-letter symbols; "heads"/"dim" only appear through splits.
const std::vector<std::pair<std::string, std::string>> kAxes = {
    {"batch", "b"}, {"time", "t"},  {"channels", "c"}, {"height", "y"}, {"width", "x"},
    {"tokens", "n"}, {"groups", "g"}, {"frames", "f"}};
const std::vector<std::string> kReducers = {"mean", "sum", "max"};
const std::vector<int64_t> kHeadCounts = {2, 4, 8, 12, 16};

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? separator : "") + items[i];
  return out;
}

std::string other_field(Rng& rng, const std::string& field) {
  std::string other;
  do other = rng.pick(kFields);
  while (other == field);
  return other;
}

}  // namespace

DslTask parse_dsl_task(std::string_view name, const std::string& key) {
  for (const auto& [task, task_name] : core::EnumNames<DslTask>::values)
    if (name == task_name) return task;
  throw core::ConfigError(key, key + ": got '" + std::string(name) + "', expected flowroll or dimmatch");
}

// ---------------------------------------------------------------------------------------------
// Generator

DslGenerator::DslGenerator(uint64_t seed, std::vector<DslTask> tasks)
    : rng_(seed), tasks_(std::move(tasks)) {
  if (tasks_.empty()) throw core::ConfigError("data.tasks", "data.tasks: expected at least one task");
}

DslExample DslGenerator::next() {
  return rng_.pick(tasks_) == DslTask::flowroll ? flowroll() : dimmatch();
}

DslExample DslGenerator::flowroll() {
  Rng& r = rng_;
  const std::string source = r.pick(kSources) + "." + r.pick(kExtensions);
  std::vector<std::string> stages{"flowroll " + source}, phrases;
  const int64_t count = r.range(1, 3);
  for (int64_t i = 0; i < count; ++i) {
    const std::string field = r.pick(kFields);
    switch (r.below(6)) {
      case 0: {  // filter
        const std::string op = r.pick(kOperators);
        const std::string n = std::to_string(r.range(0, 999));
        if (r.chance(0.3)) {
          phrases.push_back("drop rows where " + field + " " + r.pick(kOperatorWords.at(kNegated.at(op))) + " " + n);
        } else {
          static const std::vector<std::string> lead = {"keep rows where", "only where", "filter to"};
          phrases.push_back(r.pick(lead) + " " + field + " " + r.pick(kOperatorWords.at(op)) + " " + n);
        }
        stages.push_back("keep " + field + " " + op + " " + n);
        break;
      }
      case 1: {  // sort
        const bool descending = r.chance(0.5);
        phrases.push_back(r.chance(0.5)
                              ? "sort by " + field + (descending ? " descending" : " ascending")
                              : std::string(descending ? "highest " : "lowest ") + field + " first");
        stages.push_back("sort " + field + (descending ? " desc" : " asc"));
        break;
      }
      case 2: {  // limit
        const std::string n = std::to_string(r.range(1, 99));
        static const std::vector<std::string> forms = {"take #", "first # rows", "limit to #"};
        std::string phrase = r.pick(forms);
        phrase.replace(phrase.find('#'), 1, n);
        phrases.push_back(phrase);
        stages.push_back("take " + n);
        break;
      }
      case 3: {  // aggregate
        const std::string key = other_field(r, field);
        phrases.push_back(r.chance(0.5) ? "total " + field + " per " + key
                                        : "sum " + field + " grouped by " + key);
        stages.push_back("group " + key + " sum " + field);
        break;
      }
      case 4: {  // rolling window
        const std::string n = std::to_string(r.range(2, 30));
        phrases.push_back(r.chance(0.5) ? n + "-row rolling mean of " + field
                                        : "smooth " + field + " over " + n + " rows");
        stages.push_back("roll " + n + " mean " + field);
        break;
      }
      default: {  // rename
        const std::string to = other_field(r, field);
        phrases.push_back(r.chance(0.5) ? "rename " + field + " to " + to : "call " + field + " " + to);
        stages.push_back("rename " + field + " " + to);
        break;
      }
    }
  }
  const std::string body = join(phrases, ", then ");
  static const std::vector<std::string> verbs = {"from", "read", "load"};
  std::string request = r.chance(0.5) ? r.pick(verbs) + " " + source + ", " + body
                                      : body + ", all from " + source;
  return DslExample{DslTask::flowroll, std::move(request), join(stages, " | ")};
}

DslExample DslGenerator::dimmatch() {
  Rng& r = rng_;
  const uint64_t kind = r.below(5);
  // Distinct axes, 2 to 4 of them (3 to 4 for a merge, which needs a neighbour to keep).
  std::vector<std::pair<std::string, std::string>> pool = kAxes;
  const int64_t count = r.range(kind == 2 ? 3 : 2, 4);
  std::vector<std::string> names, symbols;
  for (int64_t i = 0; i < count; ++i) {
    const size_t at = r.below(pool.size());
    names.push_back(pool[at].first);
    symbols.push_back(pool[at].second);
    pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(at));
  }
  const std::string shape = "tensor (" + join(names, ", ") + "): ";
  const std::string lhs = join(symbols, " ");
  std::string request, rhs, suffix;
  switch (kind) {
    case 0: {  // permute two axes
      const size_t i = r.below(count);
      size_t j;
      do j = r.below(count);
      while (j == i);
      std::vector<std::string> out = symbols;
      std::swap(out[i], out[j]);
      request = shape + "swap " + names[i] + " and " + names[j];
      rhs = join(out, " ");
      break;
    }
    case 1: {  // split one axis into heads
      const size_t i = r.below(count);
      const int64_t heads = r.pick(kHeadCounts);
      const bool heads_first = r.chance(0.5);
      std::vector<std::string> split_lhs = symbols, out;
      split_lhs[i] = "(h d)";
      if (heads_first) out.push_back("h");
      for (size_t k = 0; k < symbols.size(); ++k) {
        if (k != i) out.push_back(symbols[k]);
        else if (heads_first) out.push_back("d");
        else out.insert(out.end(), {"h", "d"});
      }
      request = shape + "split " + names[i] + " into " + std::to_string(heads) + " heads" +
                (heads_first ? " first" : "");
      rhs = join(out, " ");
      suffix = " where h=" + std::to_string(heads);
      return DslExample{DslTask::dimmatch, request,
                        "dimmatch " + join(split_lhs, " ") + " -> " + rhs + suffix};
    }
    case 2: {  // merge two neighbours
      const size_t i = r.below(count - 1);
      std::vector<std::string> out(symbols.begin(), symbols.begin() + static_cast<std::ptrdiff_t>(i));
      out.push_back("(" + symbols[i] + " " + symbols[i + 1] + ")");
      out.insert(out.end(), symbols.begin() + static_cast<std::ptrdiff_t>(i) + 2, symbols.end());
      request = shape + "merge " + names[i] + " and " + names[i + 1];
      rhs = join(out, " ");
      break;
    }
    case 3: {  // reduce one axis
      const size_t i = r.below(count);
      const std::string reducer = r.pick(kReducers);
      std::vector<std::string> out = symbols;
      out.erase(out.begin() + static_cast<std::ptrdiff_t>(i));
      request = shape + reducer + " over " + names[i];
      rhs = join(out, " ");
      suffix = " reduce " + reducer;
      break;
    }
    default: {  // repeat along a new axis
      const auto& added = pool[r.below(pool.size())];
      const int64_t times = r.range(2, 64);
      const size_t at = r.below(count + 1);
      std::vector<std::string> out = symbols;
      out.insert(out.begin() + static_cast<std::ptrdiff_t>(at), added.second);
      request = shape + "repeat " + std::to_string(times) + " times along new " + added.first +
                " axis at " + std::to_string(at);
      rhs = join(out, " ");
      suffix = " where " + added.second + "=" + std::to_string(times);
      break;
    }
  }
  return DslExample{DslTask::dimmatch, request, "dimmatch " + lhs + " -> " + rhs + suffix};
}

DslSplit make_dsl_split(uint64_t seed, const std::vector<DslTask>& tasks, int64_t train_size,
                        int64_t validation_size) {
  DslGenerator generator(seed, tasks);
  DslSplit split;
  std::unordered_set<std::string> requests;
  // Stop if the language cannot supply enough distinct examples.
  const int64_t max_draws = 50 * (train_size + validation_size) + 1000;
  for (int64_t draws = 0; static_cast<int64_t>(split.train.size()) < train_size ||
                          static_cast<int64_t>(split.validation.size()) < validation_size;
       ++draws) {
    if (draws >= max_draws) {
      throw core::ConfigError("data.train_examples",
                              "data: could not draw " + std::to_string(train_size) + " train and " +
                                  std::to_string(validation_size) + " validation examples with distinct "
                                  "requests; expected smaller data.train_examples / data.val_examples");
    }
    DslExample example = generator.next();
    if (!requests.insert(example.request).second) continue;
    const bool held_out = stable_hash(example.program) % 10 == 0;
    auto& target = held_out ? split.validation : split.train;
    const int64_t limit = held_out ? validation_size : train_size;
    if (static_cast<int64_t>(target.size()) < limit) target.push_back(std::move(example));
  }
  return split;
}

}  // namespace scaletrain::data
