#include "core/log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include "core/error.h"

namespace kiln::log {
namespace {

std::shared_ptr<spdlog::logger>& logger() {
    static std::shared_ptr<spdlog::logger> instance = [] {
        auto l = std::make_shared<spdlog::logger>(
            "kiln", std::make_shared<spdlog::sinks::stderr_sink_mt>());
        l->set_pattern("%H:%M:%S %v");
        return l;
    }();
    return instance;
}

spdlog::level::level_enum to_spdlog(Level level) {
    switch (level) {
        case Level::debug:
            return spdlog::level::debug;
        case Level::info:
            return spdlog::level::info;
        case Level::warn:
            return spdlog::level::warn;
        case Level::error:
            return spdlog::level::err;
    }
    return spdlog::level::info;
}

}  // namespace

void init(int rank, Level level) {
    auto& l = logger();
    l->sinks().clear();
    if (rank == 0) {
        l->sinks().push_back(std::make_shared<spdlog::sinks::stderr_sink_mt>());
    }
    l->set_level(to_spdlog(level));
    l->set_pattern("%H:%M:%S %v");
}

void add_file(const std::string& path) {
    auto sink = std::make_shared<spdlog::sinks::basic_file_sink_mt>(path);
    sink->set_pattern("%Y-%m-%dT%H:%M:%S.%e %l %v");
    logger()->sinks().push_back(sink);
    logger()->flush_on(spdlog::level::debug);  // what passes the level, at once
}

void write(Level level, const char* module, const std::string& message) {
    logger()->log(to_spdlog(level), "[{}] {}", module, message);
}

bool enabled(Level level) {
    return logger()->should_log(to_spdlog(level));
}

Level parse_level(const std::string& name) {
    if (name == "debug")
        return Level::debug;
    if (name == "info")
        return Level::info;
    if (name == "warn")
        return Level::warn;
    if (name == "error")
        return Level::error;
    throw error("log level '{}' is not one of debug, info, warn, error", name);
}

}  // namespace kiln::log
