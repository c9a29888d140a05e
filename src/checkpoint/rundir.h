#pragma once
// The run folder: every path a run writes, in one place.
//   runs/<id>/config.yaml  metrics.jsonl  rank-N.log  status.json  checkpoints/step-NNNNNNNN/
//             ranks/rank-N.json (each rank's step, heartbeat time and memory)
#include <cstdint>
#include <string>

namespace kiln::checkpoint {

struct RunDir {
    std::string root;

    std::string config() const { return root + "/config.yaml"; }
    std::string metrics() const { return root + "/metrics.jsonl"; }
    std::string status() const { return root + "/status.json"; }
    std::string autotune() const { return root + "/autotune.json"; }  // the plan cache outcome
    std::string rank_log(int rank) const { return root + "/rank-" + std::to_string(rank) + ".log"; }
    std::string ranks() const { return root + "/ranks"; }
    std::string rank_status(int rank) const {
        return ranks() + "/rank-" + std::to_string(rank) + ".json";
    }
    std::string checkpoints() const { return root + "/checkpoints"; }
    std::string checkpoint(int64_t step) const;  // checkpoints/step-NNNNNNNN
    std::string latest() const { return checkpoints() + "/latest"; }
};

// "runs/20261128-193100-3f2a": time of day plus 4 random hex digits.
std::string new_run_path(const std::string& parent);

// Liveness. While its trainer lives, a run's status.json is touched (its mtime set to now)
// every kHeartbeatSeconds, and names the trainer's host and pid. A reader tells a run that died
// without a word (killed -9, its head or host gone) from one that runs by that heartbeat.
constexpr double kHeartbeatSeconds = 5;
// Beats missed before a run counts as lost: generous, for clocks of hosts on a shared folder.
constexpr double kMissedBeats = 6;

// The state a reader should show for status.json's `state`, given its modification time
// (`mtime_s`) and the reader's clock and host: "lost" for a "running" run whose process is gone
// from this host, or whose heartbeat is older than kMissedBeats beats; `state` otherwise.
std::string live_state(const std::string& state, const std::string& host, int64_t pid,
                       double mtime_s, double now_s);

}  // namespace kiln::checkpoint
