#pragma once
// Metrics as JSON Lines: one object per line, appended and flushed as training goes, so a
// crashed run keeps everything up to its last line.
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace scaletrain::train {

using MetricValue = std::variant<int64_t, double, std::string>;
using MetricsRecord = std::vector<std::pair<std::string, MetricValue>>;

// One JSON object on one line (non-finite numbers become null).
std::string to_json_line(const MetricsRecord& record);

class MetricsLog {
 public:
  MetricsLog() = default;  // writes nothing
  // Starts `path` afresh, or appends to it when `append` (a resumed run); throws IOError naming it.
  explicit MetricsLog(const std::string& path, bool append = false);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  MetricsLog(MetricsLog&& other) noexcept;
  MetricsLog& operator=(MetricsLog&& other) noexcept;

  void write(const MetricsRecord& record);

 private:
  std::FILE* file_ = nullptr;
  std::string path_;
};

}  // namespace scaletrain::train
