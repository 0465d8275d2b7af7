#pragma once
// FLOWROLL / DIMMATCH: a small custom language of requests and programs (grammar and examples in
// docs/dsl.md). FLOWROLL programs are pipelines over tables ("flowroll orders.csv | keep qty >= 5
// | sort price desc | take 3"); DIMMATCH rules match and rearrange tensor axes ("dimmatch b t c ->
// b c t"). Requests say the same thing in loose English, so a model must reorder clauses,
// canonicalise comparisons ("drop rows where qty is under 5" -> "keep qty >= 5") and copy names
// and numbers.
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "scaletrain/core/config.h"

namespace scaletrain::data {

enum class DslTask { flowroll, dimmatch };

// "flowroll" / "dimmatch" -> the task; anything else is a ConfigError naming `key`.
DslTask parse_dsl_task(std::string_view name, const std::string& key = "data.tasks");

struct DslExample {
  DslTask task;
  std::string request;
  std::string program;
};

// Small deterministic random source (splitmix64): the same seed gives the same stream on every
// platform, unlike the standard distributions.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  // Uniform in [0, n).
  uint64_t below(uint64_t n);
  // Uniform in [lo, hi].
  int64_t range(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(below(hi - lo + 1)); }
  bool chance(double p) { return static_cast<double>(next() >> 11) * 0x1.0p-53 < p; }
  template <typename T>
  const T& pick(const std::vector<T>& items) { return items[below(items.size())]; }

 private:
  uint64_t state_;
};

// Stable 64-bit hash (FNV-1a) used to split examples.
uint64_t stable_hash(std::string_view text);

// An endless, seeded stream of examples of the given tasks (chosen with equal probability).
class DslGenerator {
 public:
  DslGenerator(uint64_t seed, std::vector<DslTask> tasks);
  DslExample next();

 private:
  DslExample flowroll();
  DslExample dimmatch();
  Rng rng_;
  std::vector<DslTask> tasks_;
};

struct DslSplit {
  std::vector<DslExample> train;
  std::vector<DslExample> validation;
};

// Draws examples until both splits are full. A program goes to validation when its hash falls
// in the held-out bucket (1 in 10), so no validation program, nor any request for it, appears in
// training. Requests are distinct within and across splits.
DslSplit make_dsl_split(uint64_t seed, const std::vector<DslTask>& tasks, int64_t train_size,
                        int64_t validation_size);

// Checks a program against the grammar of docs/dsl.md, including DIMMATCH's axis rules.
// Returns "" when valid, otherwise what is wrong.
std::string check_program(std::string_view program);

}  // namespace scaletrain::data

template <>
struct scaletrain::core::EnumNames<scaletrain::data::DslTask> {
  static constexpr std::array<std::pair<scaletrain::data::DslTask, const char*>, 2> values = {
      {{scaletrain::data::DslTask::flowroll, "flowroll"},
       {scaletrain::data::DslTask::dimmatch, "dimmatch"}}};
};
