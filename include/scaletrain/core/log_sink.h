#pragma once
// The logging sink: levels and the one function that writes a finished line. It includes no fmt
// and no torch header, so its implementation can use spdlog (built on Debian's fmt 9) while the
// rest of scaletrain formats with the fmt 12 headers shipped inside torch (see logging.h).
#include <string_view>

namespace scaletrain::core {

enum class LogLevel { trace, debug, info, warn, error, off };

// Parses "trace|debug|info|warn|error|off"; throws UsageError naming `what` otherwise.
LogLevel parse_log_level(std::string_view name, std::string_view what = "--log-level");
void set_log_level(LogLevel level);
LogLevel log_level();
bool log_enabled(LogLevel level);
// Writes one line to stderr with the time and the level.
void log_message(LogLevel level, std::string_view message);

}  // namespace scaletrain::core
