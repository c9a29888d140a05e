#pragma once
// Progress of long work: on a terminal, one line redrawn in place a few times a second; when
// stderr is not a terminal (logs, CI), a plain line every `log_interval_s` seconds.
#include <chrono>
#include <cstdint>
#include <string>

namespace kiln {

class Progress {
public:
    Progress(std::string label, int64_t total_bytes, double log_interval_s = 10.0);
    // done_bytes of total_bytes; `detail` is appended (e.g. "1,234 docs, 5.6M tokens").
    void update(int64_t done_bytes, const std::string& detail);
    void finish(const std::string& summary);  // the last line, always printed

private:
    using Clock = std::chrono::steady_clock;
    std::string label_;
    int64_t total_;
    double interval_;
    bool tty_;
    Clock::time_point start_, last_;
};

std::string human_count(double n);           // 1234567 -> "1.23M"
std::string human_duration(double seconds);  // "42 s", "3.5 min", "2.1 h", "4.9 days"; "-" if <= 0
double unix_seconds();                       // wall-clock time now, seconds since 1970
std::string host_name();                     // this machine's (gethostname)
// Seconds elapsed on the monotonic clock since t0.
double seconds_since(std::chrono::steady_clock::time_point t0);

}  // namespace kiln
