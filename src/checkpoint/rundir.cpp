#include "checkpoint/rundir.h"

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <random>

#include "core/progress.h"

namespace kiln::checkpoint {

std::string RunDir::checkpoint(int64_t step) const {
    return fmt::format("{}/step-{:08d}", checkpoints(), step);
}

std::string new_run_path(const std::string& parent) {
    auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    std::random_device rd;
    return fmt::format("{}/{:%Y%m%d-%H%M%S}-{:04x}", parent, fmt::localtime(now), rd() & 0xffff);
}

std::string live_state(const std::string& state, const std::string& host, int64_t pid,
                       double mtime_s, double now_s) {
    if (state != "running")
        return state;
    const bool gone_from_here =
        host == host_name() && pid > 0 && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH;
    return gone_from_here || now_s - mtime_s > kMissedBeats * kHeartbeatSeconds ? "lost" : state;
}

}  // namespace kiln::checkpoint
