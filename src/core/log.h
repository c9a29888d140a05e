#pragma once
// Logging façade over spdlog. Every line carries a module tag: `[train] step 10 ...`.
// The console sink prints on rank 0 only; every rank can add its own file (rank-N.log).
#include <fmt/format.h>

#include <string>

namespace kiln::log {

enum class Level { debug, info, warn, error };

void init(int rank, Level level);        // console on rank 0, level for all sinks
void add_file(const std::string& path);  // append every line to this file too
void write(Level level, const char* module, const std::string& message);
bool enabled(Level level);                   // whether a line at `level` reaches any sink
Level parse_level(const std::string& name);  // "debug" | "info" | "warn" | "error"; throws

// Formats the line only when its level is enabled (debug lines sit on per-step paths).
template <typename... Args>
void at(Level level, const char* module, fmt::format_string<Args...> f, Args&&... args) {
    if (enabled(level))
        write(level, module, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void info(const char* module, fmt::format_string<Args...> f, Args&&... args) {
    at(Level::info, module, f, std::forward<Args>(args)...);
}
template <typename... Args>
void warn(const char* module, fmt::format_string<Args...> f, Args&&... args) {
    at(Level::warn, module, f, std::forward<Args>(args)...);
}
template <typename... Args>
void debug(const char* module, fmt::format_string<Args...> f, Args&&... args) {
    at(Level::debug, module, f, std::forward<Args>(args)...);
}

}  // namespace kiln::log
