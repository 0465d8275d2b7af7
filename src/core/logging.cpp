// The only translation unit that includes spdlog. It must not include torch headers or
// scaletrain/core/logging.h: torch ships fmt 12 headers that Debian's spdlog 1.10 (built on
// fmt 9) does not compile against.
#include <atomic>
#include <memory>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "scaletrain/core/error.h"
#include "scaletrain/core/log_sink.h"

namespace scaletrain::core {
namespace {

std::atomic<LogLevel> g_level{LogLevel::info};

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto made = std::make_shared<spdlog::logger>(
        "scaletrain", std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    made->set_pattern("[%H:%M:%S] %^%l%$ %v");
    made->set_level(spdlog::level::trace);
    return made;
  }();
  return *instance;
}

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::trace: return spdlog::level::trace;
    case LogLevel::debug: return spdlog::level::debug;
    case LogLevel::info: return spdlog::level::info;
    case LogLevel::warn: return spdlog::level::warn;
    case LogLevel::error: return spdlog::level::err;
    case LogLevel::off: return spdlog::level::off;
  }
  return spdlog::level::info;
}

constexpr const char* kLevelNames[] = {"trace", "debug", "info", "warn", "error", "off"};

}  // namespace

LogLevel parse_log_level(std::string_view name, std::string_view what) {
  for (int i = 0; i < 6; ++i) {
    if (name == kLevelNames[i]) return static_cast<LogLevel>(i);
  }
  throw UsageError(std::string(what) + ": got '" + std::string(name) +
                   "', expected one of trace, debug, info, warn, error, off");
}

void set_log_level(LogLevel level) { g_level.store(level); }
LogLevel log_level() { return g_level.load(); }
bool log_enabled(LogLevel level) {
  return level != LogLevel::off && static_cast<int>(level) >= static_cast<int>(g_level.load());
}

void log_message(LogLevel level, std::string_view message) {
  if (!log_enabled(level)) return;
  logger().log(to_spdlog(level), "{}", std::string(message));
  logger().flush();
}

}  // namespace scaletrain::core
