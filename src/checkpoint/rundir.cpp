#include "checkpoint/rundir.h"

#include <fmt/chrono.h>
#include <fmt/format.h>

#include <chrono>
#include <random>

namespace kiln::checkpoint {

std::string RunDir::checkpoint(int64_t step) const {
    return fmt::format("{}/step-{:08d}", checkpoints(), step);
}

std::string new_run_path(const std::string& parent) {
    auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    std::random_device rd;
    return fmt::format("{}/{:%Y%m%d-%H%M%S}-{:04x}", parent, fmt::localtime(now), rd() & 0xffff);
}

}  // namespace kiln::checkpoint
