#include "serve/runs.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include "checkpoint/rundir.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/progress.h"

namespace kiln::serve {
namespace {

namespace stdfs = std::filesystem;
using json = nlohmann::json;

bool plain_component(const std::string& c) {
    if (c.empty() || c.size() > 128 || !std::isalnum(static_cast<unsigned char>(c[0])))
        return false;
    return std::all_of(c.begin(), c.end(), [](char ch) {
        return std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '_' || ch == '-';
    });
}

bool is_run(const stdfs::path& p) {
    std::error_code ec;
    return stdfs::exists(p / "status.json", ec) || stdfs::exists(p / "metrics.jsonl", ec) ||
           stdfs::exists(p / "config.yaml", ec);
}

// mtime in ns and size, or -1s when missing.
std::pair<int64_t, int64_t> stat_of(const std::string& path) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0)
        return {-1, -1};
    return {int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec, int64_t(st.st_size)};
}

constexpr int64_t kMaxSmallFile = 1 << 20;  // status, rank and config files read whole

std::string read_small(const std::string& path) {
    ServedFile f(path);
    return f.ok() ? f.read(0, kMaxSmallFile) : "";
}

// A run's JSON file as an object: {} where it is missing, unreadable or not an object.
json read_json(const std::string& path) {
    json j = json::parse(read_small(path), nullptr, false);
    return j.is_object() ? j : json::object();
}

// status.json as a reader should show it, its mtime being the trainer's heartbeat: "lost" in
// place of "running" once the trainer is gone (checkpoint::live_state), and why.
json judged(json status, int64_t mtime_ns) {
    if (!status.is_object() || !status.contains("state") || !status["state"].is_string())
        return status;
    const std::string state = status["state"];
    const std::string host =
        status.contains("host") && status["host"].is_string() ? status["host"] : "";
    const int64_t pid = status.contains("pid") && status["pid"].is_number_integer()
                            ? status["pid"].get<int64_t>()
                            : 0;
    const double now = unix_seconds(), beat = double(mtime_ns) / 1e9;
    if (checkpoint::live_state(state, host, pid, beat, now) == state)
        return status;
    status["state"] = "lost";
    status["message"] = fmt::format(
        "its trainer (pid {} on {}) stopped without a word {} ago: killed, or its host went away",
        pid, host.empty() ? "an unnamed host" : host, human_duration(now - beat));
    return status;
}

// Fills in each rank's pipeline stage where its file lacks one (files from before pipeline
// parallelism: stage 0) and adds per stage its rank count and the mean compute_s and
// stage_wait_s of the ranks that report them. The stage whose ranks wait least is the slowest,
// since its neighbours wait for it; it is named once there are two stages or more and each has
// reported a wait (from its first step on), else "slowest_stage" is null.
void add_stages(json& detail) {
    struct Sums {
        int ranks = 0, timed = 0, waited = 0;
        double compute_s = 0, wait_s = 0;
    };
    std::map<int64_t, Sums> by_stage;  // [pp_rank]
    for (json& r : detail["ranks"]) {
        if (!r.is_object())
            continue;
        if (!r.contains("pp_rank") || !r["pp_rank"].is_number_integer())
            r["pp_rank"] = 0;
        Sums& s = by_stage[r["pp_rank"].get<int64_t>()];
        s.ranks++;
        if (r.contains("compute_s") && r["compute_s"].is_number()) {
            s.timed++;
            s.compute_s += r["compute_s"].get<double>();
        }
        if (r.contains("stage_wait_s") && r["stage_wait_s"].is_number()) {
            s.waited++;
            s.wait_s += r["stage_wait_s"].get<double>();
        }
    }
    json stages = json::array();
    bool all_waited = by_stage.size() > 1;
    for (const auto& [stage, s] : by_stage) {
        json st = {{"pp_rank", stage}, {"ranks", s.ranks}};
        if (s.timed > 0)
            st["compute_s"] = s.compute_s / s.timed;
        if (s.waited > 0)
            st["stage_wait_s"] = s.wait_s / s.waited;
        all_waited = all_waited && s.waited > 0;
        stages.push_back(std::move(st));
    }
    detail["stages"] = stages;
    detail["slowest_stage"] = nullptr;
    if (!all_waited)
        return;
    auto wait_of = [](const std::pair<const int64_t, Sums>& e) {
        return e.second.wait_s / e.second.waited;
    };
    auto slowest =
        std::min_element(by_stage.begin(), by_stage.end(),
                         [&](const auto& a, const auto& b) { return wait_of(a) < wait_of(b); });
    // Its neighbours: the stages just before and after it among those that reported.
    std::vector<double> neighbour_waits;
    if (slowest != by_stage.begin())
        neighbour_waits.push_back(wait_of(*std::prev(slowest)));
    if (std::next(slowest) != by_stage.end())
        neighbour_waits.push_back(wait_of(*std::next(slowest)));
    double neighbour_wait_s = 0;
    for (double w : neighbour_waits)
        neighbour_wait_s += w / double(neighbour_waits.size());
    detail["slowest_stage"] = {{"pp_rank", slowest->first},
                               {"stage_wait_s", wait_of(*slowest)},
                               {"neighbour_wait_s", neighbour_wait_s}};
}

}  // namespace

ServedFile::ServedFile(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    struct stat st {};
    if (fd_ >= 0 && (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode))) {
        ::close(fd_);
        fd_ = -1;
    }
    size_ = fd_ >= 0 ? int64_t(st.st_size) : 0;
}

ServedFile::~ServedFile() {
    if (fd_ >= 0)
        ::close(fd_);
}

std::string ServedFile::read(int64_t from, int64_t bytes) const {
    std::string text;
    bytes = std::min(bytes, size_ - from);
    if (fd_ < 0 || from < 0 || bytes <= 0)
        return text;
    text.resize(size_t(bytes));
    size_t got = 0;
    while (got < text.size()) {
        ssize_t n = ::pread(fd_, text.data() + got, text.size() - got, off_t(from) + off_t(got));
        if (n <= 0)
            break;
        got += size_t(n);
    }
    text.resize(got);
    return text;
}

std::string tail_of(const std::string& path, int64_t bytes) {
    ServedFile f(path);
    if (!f.ok())
        return "";
    int64_t from = std::max<int64_t>(0, f.size() - bytes);
    std::string text = f.read(from, f.size() - from);
    if (from > 0) {
        size_t nl = text.find('\n');
        text.erase(0, nl == std::string::npos ? text.size() : nl + 1);
    }
    return text;
}

std::string last_line(const std::string& path) {
    std::string tail = tail_of(path, 4096);
    while (!tail.empty() && std::isspace(static_cast<unsigned char>(tail.back())))
        tail.pop_back();
    size_t nl = tail.rfind('\n');
    return nl == std::string::npos ? tail : tail.substr(nl + 1);
}

Runs::Runs(std::string root) : root_(std::move(root)) {
    fs::make_dirs(root_);
    canonical_root_ = stdfs::canonical(root_).string();
}

std::string Runs::folder(const std::string& name) const {
    std::vector<std::string> parts;
    size_t from = 0;
    while (from <= name.size()) {
        size_t slash = name.find('/', from);
        if (slash == std::string::npos)
            slash = name.size();
        parts.push_back(name.substr(from, slash - from));
        from = slash + 1;
    }
    bool ok = parts.size() <= 2 && std::all_of(parts.begin(), parts.end(), plain_component);
    if (!ok)
        throw error(
            "run name \"{}\" is not a run under the runs folder (one or two plain folder names)",
            name.substr(0, 200));
    std::error_code ec;
    stdfs::path real = stdfs::canonical(stdfs::path(root_) / name, ec);
    if (ec || !is_run(real))
        throw error("no run named \"{}\" in {}", name, root_);
    std::string r = real.string();
    if (r.rfind(canonical_root_ + "/", 0) != 0)
        throw error("run \"{}\" leads outside the runs folder", name);
    return r;
}

void Runs::refresh(const std::string& name, Cached& c) {
    checkpoint::RunDir run{root_ + "/" + name};
    auto [status_mtime, status_size] = stat_of(run.status());
    auto [metrics_mtime, metrics_size] = stat_of(run.metrics());
    if (status_mtime != c.status_mtime) {
        c.status_mtime = status_mtime;
        c.summary.status = read_json(run.status());
    }
    if (metrics_size != c.metrics_size) {
        c.metrics_size = metrics_size;
        json last = json::parse(last_line(run.metrics()), nullptr, false);
        c.summary.last = last.is_object() ? last : json::object();
    }
    c.summary.name = name;
    c.summary.updated = double(std::max(status_mtime, metrics_mtime)) / 1e9;
}

std::vector<RunSummary> Runs::list() {
    std::lock_guard lock(mutex_);
    double now = unix_seconds();
    if (now - scanned_ > 1.0) {
        scanned_ = now;
        names_.clear();
        std::error_code ec;
        for (const auto& e : stdfs::directory_iterator(root_, ec)) {
            std::string top = e.path().filename().string();
            if (!e.is_directory(ec) || !plain_component(top))
                continue;
            if (is_run(e.path()))
                names_.push_back(top);
            for (const auto& sub : stdfs::directory_iterator(e.path(), ec)) {
                std::string leaf = sub.path().filename().string();
                if (sub.is_directory(ec) && plain_component(leaf) && leaf != "checkpoints" &&
                    leaf != "ranks" && is_run(sub.path()))
                    names_.push_back(top + "/" + leaf);
            }
        }
    }
    std::vector<RunSummary> out;
    for (const auto& name : names_) {
        try {  // listed only where it may be read: not through a link out of the runs folder
            folder(name);
        } catch (const Error&) {
            continue;
        }
        Cached& c = cache_[name];
        refresh(name, c);
        out.push_back(c.summary);
        out.back().status = judged(c.summary.status, c.status_mtime);
    }
    std::sort(out.begin(), out.end(),
              [](const RunSummary& a, const RunSummary& b) { return a.updated > b.updated; });
    return out;
}

json Runs::detail(const std::string& name) {
    checkpoint::RunDir run{folder(name)};
    json j;
    j["name"] = name;
    j["status"] = judged(read_json(run.status()), stat_of(run.status()).first);
    j["config"] = read_small(run.config());
    json ranks = json::array();
    std::error_code ec;
    std::vector<stdfs::path> files;
    if (!stdfs::is_symlink(run.ranks(), ec)) {
        for (const auto& e : stdfs::directory_iterator(run.ranks(), ec))
            files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
        if (f.extension() == ".json")
            ranks.push_back(read_json(f.string()));
    }
    j["ranks"] = ranks;
    add_stages(j);
    json checkpoints = json::array();
    std::vector<std::string> steps;
    for (const auto& e : stdfs::directory_iterator(run.checkpoints(), ec)) {
        std::string leaf = e.path().filename().string();
        if (e.is_directory(ec) && leaf.rfind("step-", 0) == 0 &&
            leaf.find(".tmp") == std::string::npos)
            steps.push_back(leaf);
    }
    std::sort(steps.rbegin(), steps.rend());
    std::string latest = read_small(run.latest());
    latest = latest.substr(0, latest.find('\n'));
    for (const auto& leaf : steps) {
        stdfs::path dir = stdfs::path(run.checkpoints()) / leaf;
        int64_t bytes = 0;
        // Links (out of the run, perhaps) are not followed, as for `ranks`.
        if (!stdfs::is_symlink(dir, ec)) {
            for (const auto& f : stdfs::directory_iterator(dir, ec)) {
                if (f.is_regular_file(ec) && !f.is_symlink(ec))
                    bytes += int64_t(f.file_size(ec));
            }
        }
        checkpoints.push_back({{"name", leaf},
                               {"step", std::atoll(leaf.c_str() + 5)},
                               {"bytes", bytes},
                               {"complete", stdfs::exists(dir / "manifest.json", ec)},
                               {"latest", leaf == latest}});
    }
    j["checkpoints"] = checkpoints;
    return j;
}

json Runs::metrics(const std::string& name, int64_t offset) {
    checkpoint::RunDir run{folder(name)};
    ServedFile in(run.metrics());
    json lines = json::array();
    if (!in.ok())
        return {{"offset", 0}, {"lines", lines}};
    int64_t size = in.size();
    if (offset < 0 || offset > size)
        offset = 0;  // the file was replaced: start over
    std::string text = in.read(offset, std::min<int64_t>(size - offset, 2 << 20));
    size_t end = text.rfind('\n');
    if (end == std::string::npos)
        return {{"offset", offset}, {"lines", lines}};
    size_t from = 0;
    while (from <= end) {
        size_t nl = text.find('\n', from);
        json line = json::parse(text.begin() + long(from), text.begin() + long(nl), nullptr, false);
        if (line.is_object())
            lines.push_back(std::move(line));
        from = nl + 1;
    }
    return {{"offset", offset + int64_t(end) + 1}, {"lines", lines}};
}

}  // namespace kiln::serve
