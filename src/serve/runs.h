#pragma once
// Run folders as the head node sees them: any folder under the runs folder (one or two levels
// down) with a status.json, metrics.jsonl or config.yaml, whoever started it (this head, `kiln
// launch`, Kubernetes, Slurm). Nothing outside the runs folder is ever read: a run name is one
// or two plain path components ([A-Za-z0-9][A-Za-z0-9._-]*), and the resolved folder (links
// followed) must lie inside the runs folder.
#include <cstdint>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace kiln::serve {

struct RunSummary {
    std::string name;
    nlohmann::json status = nlohmann::json::object();  // status.json, or {} before the first one
    nlohmann::json last = nlohmann::json::object();    // the newest metrics.jsonl line, or {}
    double updated = 0;                                // newest change of either (unix seconds)
};

class Runs {
public:
    explicit Runs(std::string root);  // throws Error when root cannot be made
    const std::string& root() const { return root_; }

    // The folder of a run; throws Error (a 4xx for the client) for a name that is not a run
    // folder under the root.
    std::string folder(const std::string& name) const;
    // Every run, newest first; rescanned at most once a second, files reread only on change.
    std::vector<RunSummary> list();
    // status, resolved config, per-rank status (pp_rank 0 where a rank file has none),
    // pipeline stages (per stage: ranks, mean compute_s and stage_wait_s) with the slowest one
    // named (null with one stage), checkpoints (step, size, complete).
    nlohmann::json detail(const std::string& name);
    // Complete metrics lines from byte `offset` (at most ~2 MiB of them): {"offset": next,
    // "lines": [...]}.
    nlohmann::json metrics(const std::string& name, int64_t offset);

private:
    struct Cached {
        int64_t status_mtime = -1, metrics_size = -1;
        RunSummary summary;
    };
    void refresh(const std::string& name, Cached& c);
    std::string root_, canonical_root_;
    std::mutex mutex_;
    double scanned_ = 0;
    std::vector<std::string> names_;
    std::map<std::string, Cached> cache_;
};

// The last `bytes` of a file ("" when it does not exist), starting at a line boundary.
std::string tail_of(const std::string& path, int64_t bytes);

// A file the head serves from a run folder, which whoever can write there may have replaced: a
// link (it could lead out of the runs folder) or anything but a regular file (a FIFO would
// block a thread) reads as absent.
class ServedFile {
public:
    explicit ServedFile(const std::string& path);
    ~ServedFile();
    ServedFile(const ServedFile&) = delete;
    ServedFile& operator=(const ServedFile&) = delete;
    bool ok() const { return fd_ >= 0; }
    int64_t size() const { return size_; }
    std::string read(int64_t from, int64_t bytes) const;  // at most `bytes` from `from`

private:
    int fd_ = -1;
    int64_t size_ = 0;
};
// The last non-empty line in the final 4 KiB of a file, trailing whitespace trimmed ("" if none).
std::string last_line(const std::string& path);

}  // namespace kiln::serve
