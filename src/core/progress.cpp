#include "core/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

namespace kiln {

std::string human_count(double n) {
    if (n >= 1e9)
        return fmt::format("{:.2f}G", n / 1e9);
    if (n >= 1e6)
        return fmt::format("{:.2f}M", n / 1e6);
    if (n >= 1e3)
        return fmt::format("{:.1f}k", n / 1e3);
    return fmt::format("{:.0f}", n);
}

std::string human_duration(double s) {
    if (!(s > 0))
        return "-";
    if (s < 120)
        return fmt::format("{:.0f} s", s);
    if (s < 7200)
        return fmt::format("{:.1f} min", s / 60);
    if (s < 172800)
        return fmt::format("{:.1f} h", s / 3600);
    return fmt::format("{:.1f} days", s / 86400);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double unix_seconds() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

std::string host_name() {
    char name[256] = {0};
    gethostname(name, sizeof name - 1);
    return name;
}

Progress::Progress(std::string label, int64_t total_bytes, double log_interval_s)
    : label_(std::move(label)),
      total_(total_bytes),
      interval_(log_interval_s),
      tty_(::isatty(STDERR_FILENO) != 0),
      start_(Clock::now()),
      last_(start_) {}

void Progress::update(int64_t done_bytes, const std::string& detail) {
    auto now = Clock::now();
    double since_last = std::chrono::duration<double>(now - last_).count();
    if (since_last < (tty_ ? 0.25 : interval_))
        return;
    last_ = now;
    double elapsed = std::chrono::duration<double>(now - start_).count();
    double mbps = done_bytes / 1e6 / std::max(elapsed, 1e-9);
    std::string eta = "?";
    if (total_ > 0 && done_bytes > 0) {
        double left = elapsed * double(total_ - done_bytes) / double(done_bytes);
        eta = left < 0 ? "0s" : fmt::format("{:.0f}s", left);
    }
    std::string line = fmt::format("{}: {} | {:.1f} MB/s | {:.0f}% | ETA {}", label_, detail, mbps,
                                   total_ > 0 ? 100.0 * done_bytes / total_ : 0.0, eta);
    if (tty_) {
        std::fprintf(stderr, "\r%-100s", line.c_str());
    } else {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
    std::fflush(stderr);
}

void Progress::finish(const std::string& summary) {
    double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    std::fprintf(stderr, "%s%s: %s in %.1fs\n", tty_ ? "\r" : "", label_.c_str(), summary.c_str(),
                 elapsed);
    std::fflush(stderr);
}

}  // namespace kiln
