#include "serve/jobs.h"

#include <fcntl.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "serve/runs.h"

extern char** environ;

namespace kiln::serve {
namespace {

using json = nlohmann::json;

const State kStates[] = {State::pending, State::running, State::stopped, State::succeeded,
                         State::failed};

State parse_state(const std::string& name) {
    for (State s : kStates) {
        if (name == state_name(s))
            return s;
    }
    throw error("unknown job state {}", name);
}

std::string quoted(const std::string& word) {
    if (!word.empty() && word.find_first_of(" \t'\"") == std::string::npos)
        return word;
    return "'" + word + "'";
}

std::string join(const std::vector<std::string>& words) {
    std::string s = "kiln";
    for (const auto& w : words) {
        s += ' ';
        s += quoted(w);
    }
    return s;
}

// Unix seconds from a record's time: integer milliseconds (Ray's unit), a float of seconds
// (records written before kiln spoke Ray's units), or null (not yet).
double seconds_of(const json& v) {
    if (v.is_number_integer())
        return double(v.get<int64_t>()) / 1000;
    return v.is_number() ? v.get<double>() : 0;
}

json millis_or_null(double seconds) {
    return seconds > 0 ? json(int64_t(std::llround(seconds * 1000))) : json(nullptr);
}

Job job_from_json(const json& j) {
    Job job;
    job.id = j.at("job_id").get<std::string>();
    job.spec.entrypoint = j.at("argv").get<std::vector<std::string>>();
    job.spec.submission_id = j.value("submission_id", "");
    job.spec.ranks = j.at("ranks").get<int>();
    job.spec.cpus_per_rank = j.at("cpus_per_rank").get<int>();
    job.spec.gpus_per_rank = j.at("gpus_per_rank").get<int>();
    job.spec.priority = j.at("priority").get<int>();
    job.spec.max_failures = j.at("max_failures").get<int>();
    job.spec.metadata = j.at("metadata").get<std::map<std::string, std::string>>();
    if (const json& env = j.value("runtime_env", json::object()); env.is_object()) {
        job.spec.env_vars = env.value("env_vars", std::map<std::string, std::string>());
        job.spec.working_dir = env.value("working_dir", "");
    }
    const json& memory = j.value("entrypoint_memory", json());
    job.spec.memory_per_rank = memory.is_number_integer() ? memory.get<int64_t>() : 0;
    job.state = parse_state(j.at("status").get<std::string>());
    job.submitted = seconds_of(j.at("submitted"));
    job.started = seconds_of(j.at("start_time"));
    job.ended = seconds_of(j.at("end_time"));
    job.message = j.at("message").get<std::string>();
    job.exit_code = j.at("exit_code").get<int>();
    job.pid = j.at("pid").get<int>();
    job.gpus = j.at("gpus").get<std::string>();
    return job;
}

// Why a job failed, from the end of its log: the last error a rank reported ("[rank R] kiln:
// ..."), which says what to change, rather than the launcher's closing line after it; else
// the last line.
std::string failure_line(const std::string& tail) {
    std::string last;
    size_t end = tail.size();
    while (end > 0) {
        size_t start = tail.rfind('\n', end - 1);
        start = start == std::string::npos ? 0 : start + 1;
        std::string line = tail.substr(start, end - start);
        while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back())))
            line.pop_back();
        if (line.rfind("[rank ", 0) == 0 && line.find("] kiln: ") != std::string::npos)
            return line;
        if (last.empty())
            last = line;
        end = start == 0 ? 0 : start - 1;
    }
    return last;
}

void sql_check(sqlite3* db, int rc, const char* what) {
    if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW)
        throw error("jobs database: {} failed: {}", what, sqlite3_errmsg(db));
}

}  // namespace

const char* state_name(State s) {
    switch (s) {
        case State::pending:
            return "PENDING";
        case State::running:
            return "RUNNING";
        case State::stopped:
            return "STOPPED";
        case State::succeeded:
            return "SUCCEEDED";
        case State::failed:
            return "FAILED";
    }
    return "?";
}

bool terminal(State s) {
    return s == State::stopped || s == State::succeeded || s == State::failed;
}

json to_json(const Job& job) {
    const JobSpec& s = job.spec;
    json runtime_env = json::object();
    if (!s.env_vars.empty())
        runtime_env["env_vars"] = s.env_vars;
    if (!s.working_dir.empty())
        runtime_env["working_dir"] = s.working_dir;
    const bool over = terminal(job.state);
    json j;
    // Ray's JobDetails, with its types: times in integer milliseconds, null where Ray has none.
    j["type"] = "SUBMISSION";
    j["job_id"] = job.id;
    j["submission_id"] = job.id;
    j["driver_info"] = nullptr;
    j["status"] = state_name(job.state);
    j["entrypoint"] = join(s.entrypoint);
    j["message"] = job.message;
    j["error_type"] = nullptr;
    j["start_time"] = millis_or_null(job.started);
    j["end_time"] = millis_or_null(over ? job.ended : 0);
    j["metadata"] = s.metadata;
    j["runtime_env"] = runtime_env;
    j["driver_agent_http_address"] = nullptr;
    j["driver_node_id"] = nullptr;
    j["driver_exit_code"] = over && job.exit_code >= 0 ? json(job.exit_code) : json(nullptr);
    j["entrypoint_num_cpus"] = s.cpus_per_rank;
    j["entrypoint_num_gpus"] = s.gpus_per_rank;
    j["entrypoint_memory"] = s.memory_per_rank > 0 ? json(s.memory_per_rank) : json(nullptr);
    j["entrypoint_resources"] = nullptr;
    // kiln's own.
    j["argv"] = s.entrypoint;
    j["ranks"] = s.ranks;
    j["cpus_per_rank"] = s.cpus_per_rank;
    j["gpus_per_rank"] = s.gpus_per_rank;
    j["priority"] = s.priority;
    j["max_failures"] = s.max_failures;
    j["submitted"] = millis_or_null(job.submitted);
    j["exit_code"] = job.exit_code;
    j["pid"] = job.pid;
    j["gpus"] = job.gpus;
    return j;
}

Queue::Queue(QueueOptions options) : options_(std::move(options)) {
    fs::make_dirs(options_.runs);
    const std::string lock = options_.runs + "/head.lock";
    lock_fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (lock_fd_ < 0)
        throw error("cannot open {}: {}", lock, std::strerror(errno));
    if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
        std::string holder = fs::read_file(lock, 64);
        while (!holder.empty() && holder.back() == '\n')
            holder.pop_back();
        ::close(lock_fd_);
        throw error(
            "another kiln serve (process {}) holds the runs folder {}: two heads on one folder "
            "would run its jobs twice; stop it or give --runs another folder",
            holder.empty() ? "?" : holder, options_.runs);
    }
    std::string pid = std::to_string(::getpid()) + "\n";
    if (::ftruncate(lock_fd_, 0) != 0 || ::write(lock_fd_, pid.data(), pid.size()) < 0)
        log::warn("serve", "cannot write this head's process id into {}", lock);
    box_ = Sandbox::of(options_.runs, options_.data_roots);
    fence_ = std::make_unique<WriteFence>(box_);
    if (fence_->available())
        log::info("serve",
                  "jobs read and write files only inside {}; the kernel (Landlock) "
                  "fences their writes",
                  box_.describe());
    else
        log::warn("serve",
                  "jobs' file arguments must lie inside {}, but {}, so a config file "
                  "could still make a job write elsewhere",
                  box_.describe(), fence_->why());
    std::string path = options_.runs + "/jobs.sqlite";
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) {
        std::string why = db_ ? sqlite3_errmsg(db_) : "out of memory";
        sqlite3_close(db_);
        throw error("cannot open the jobs database {}: {}", path, why);
    }
    sqlite3_busy_timeout(db_, 5000);
    char* err = nullptr;
    int rc = sqlite3_exec(db_,
                          "PRAGMA journal_mode=WAL;"
                          "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                          " id TEXT UNIQUE NOT NULL, body TEXT NOT NULL);"
                          "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY,"
                          " value INTEGER NOT NULL);",
                          nullptr, nullptr, &err);
    if (rc != SQLITE_OK) {
        std::string why = err ? err : "?";
        sqlite3_free(err);
        sqlite3_close(db_);
        throw error("{} is not a kiln jobs database: {}", path, why);
    }
    sqlite3_stmt* st = nullptr;
    sqlite3_prepare_v2(db_, "SELECT value FROM counters WHERE name = 'next_job'", -1, &st, nullptr);
    if (sqlite3_step(st) == SQLITE_ROW)
        next_number_ = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_prepare_v2(db_, "SELECT body FROM jobs ORDER BY seq", -1, &st, nullptr);
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char* text = reinterpret_cast<const char*>(sqlite3_column_text(st, 0));
        try {
            Job job = job_from_json(json::parse(text));
            jobs_[job.id] = job;
        } catch (const std::exception& e) {
            log::warn("serve", "skipping a damaged job record in {}: {}", path, e.what());
        }
    }
    sqlite3_finalize(st);
    for (auto& [id, job] : jobs_) {
        if (job.state == State::running) {
            job.state = State::failed;
            job.ended = unix_seconds();
            job.message = fmt::format(
                "the head node stopped while this job was running (process {}); resubmit it "
                "to continue from its last checkpoint",
                job.pid);
            save(job);
        }
    }
    gpu_busy_.assign(size_t(options_.capacity.gpus), false);
    thread_ = std::thread([this] { loop(); });
}

Queue::~Queue() {
    {
        std::lock_guard lock(mutex_);
        quit_ = true;
    }
    wake_.notify_all();
    thread_.join();
    std::unique_lock lock(mutex_);
    for (auto& [id, job] : jobs_) {
        if (job.state == State::running)
            ::kill(-job.pid, SIGTERM);
    }
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::milliseconds(int64_t(options_.stop_grace_s * 1000));
    for (auto& [id, job] : jobs_) {
        if (job.state != State::running)
            continue;
        int status = 0;
        while (::waitpid(job.pid, &status, WNOHANG) == 0) {
            if (std::chrono::steady_clock::now() > deadline) {
                ::kill(-job.pid, SIGKILL);
                ::waitpid(job.pid, &status, 0);
                break;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        job.state = State::stopped;
        job.ended = unix_seconds();
        job.message = "stopped: the head node shut down while it ran";
        save(job);
    }
    sqlite3_close(db_);
    ::close(lock_fd_);  // the runs folder is free for another head
}

void Queue::save(const Job& job) {
    sqlite3_stmt* st = nullptr;
    sql_check(db_,
              sqlite3_prepare_v2(db_,
                                 "INSERT INTO jobs (id, body) VALUES (?1, ?2) ON CONFLICT(id) DO "
                                 "UPDATE SET body = excluded.body",
                                 -1, &st, nullptr),
              "prepare");
    std::string body = json_text(to_json(job));
    sqlite3_bind_text(st, 1, job.id.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, body.c_str(), -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    sql_check(db_, rc, "saving a job");
}

Capacity Queue::demand(const JobSpec& s) const {
    return {s.ranks * s.cpus_per_rank, s.ranks * s.gpus_per_rank};
}

Capacity Queue::used() const {
    std::lock_guard lock(mutex_);
    return used_;
}

Job Queue::submit(JobSpec spec) {
    Sandbox box = box_;
    if (!spec.working_dir.empty()) {
        spec.working_dir = box_.folder("runtime_env.working_dir", spec.working_dir);
        box.cwd = spec.working_dir;  // where the job's relative arguments point
    }
    box.check(spec.entrypoint);
    Capacity need = demand(spec);
    if (need.cpus > options_.capacity.cpus || need.gpus > options_.capacity.gpus) {
        throw error(
            "the job needs {} CPU slots and {} GPUs ({} ranks); the head's whole capacity is {} "
            "CPU slots and {} GPUs, so it could never start",
            need.cpus, need.gpus, spec.ranks, options_.capacity.cpus, options_.capacity.gpus);
    }
    Job job;
    {
        std::lock_guard lock(mutex_);
        if (spec.submission_id.empty()) {
            // An automatic id skips ids that clients chose (a submission_id of "job-0007" must
            // not block every automatic id after job-0006).
            while (jobs_.count(fmt::format("job-{:04d}", next_number_)))
                next_number_++;
            job.id = fmt::format("job-{:04d}", next_number_);
        } else {
            job.id = spec.submission_id;
        }
        if (jobs_.count(job.id))
            throw error("a job with submission_id \"{}\" exists already", job.id);
        next_number_++;
        sqlite3_stmt* st = nullptr;
        sqlite3_prepare_v2(db_, "INSERT OR REPLACE INTO counters VALUES ('next_job', ?1)", -1, &st,
                           nullptr);
        sqlite3_bind_int64(st, 1, next_number_);
        int rc = sqlite3_step(st);
        sqlite3_finalize(st);
        sql_check(db_, rc, "numbering a job");
        job.spec = std::move(spec);
        job.submitted = unix_seconds();
        job.message = fmt::format(
            "queued: it starts when {} CPU slots and {} GPUs are free and the jobs ahead of it "
            "have started",
            need.cpus, need.gpus);
        save(job);
        jobs_[job.id] = job;
    }
    wake_.notify_all();
    return job;
}

std::vector<Job> Queue::list() const {
    std::lock_guard lock(mutex_);
    std::vector<Job> out;
    for (const auto& [id, job] : jobs_)
        out.push_back(job);
    std::sort(out.begin(), out.end(),
              [](const Job& a, const Job& b) { return a.submitted < b.submitted; });
    return out;
}

std::optional<Job> Queue::get(const std::string& id) const {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it == jobs_.end())
        return std::nullopt;
    return it->second;
}

bool Queue::stop(const std::string& id) {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || terminal(it->second.state))
        return false;
    Job& job = it->second;
    if (job.state == State::pending) {
        job.state = State::stopped;
        job.ended = unix_seconds();
        job.message = "stopped by request before it started";
        save(job);
    } else if (job.stop_deadline == 0) {
        job.stop_deadline = unix_seconds() + options_.stop_grace_s;
        ::kill(-job.pid, SIGTERM);
    }
    wake_.notify_all();
    return true;
}

bool Queue::remove(const std::string& id) {
    std::lock_guard lock(mutex_);
    auto it = jobs_.find(id);
    if (it == jobs_.end())
        return false;
    if (!terminal(it->second.state))
        throw error("job {} is {}; stop it before deleting it", id, state_name(it->second.state));
    sqlite3_stmt* st = nullptr;
    sqlite3_prepare_v2(db_, "DELETE FROM jobs WHERE id = ?1", -1, &st, nullptr);
    sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    sql_check(db_, rc, "deleting a job");
    jobs_.erase(it);
    return true;
}

void Queue::loop() {
    std::unique_lock lock(mutex_);
    while (!quit_) {
        reap();
        admit();
        const double now = unix_seconds();
        for (auto& [id, job] : jobs_) {
            // A job that outlives its grace after SIGTERM gets SIGKILL (its whole group).
            if (job.state == State::running && job.stop_deadline > 0 && now > job.stop_deadline)
                ::kill(-job.pid, SIGKILL);
        }
        wake_.wait_for(lock, std::chrono::milliseconds(100));
    }
}

void Queue::reap() {
    for (auto& [id, job] : jobs_) {
        if (job.state != State::running)
            continue;
        int status = 0;
        if (::waitpid(job.pid, &status, WNOHANG) != job.pid)
            continue;
        job.ended = unix_seconds();
        job.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (job.stop_deadline > 0) {
            job.state = State::stopped;
            job.message = "stopped by request";
        } else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            job.state = State::succeeded;
            job.message = "finished";
        } else {
            job.state = State::failed;
            std::string line = excerpt(failure_line(tail_of(job_log(id), 1 << 16)), 400);
            job.message = fmt::format("exited with status {}{}{}", job.exit_code,
                                      line.empty() ? "" : ": ", line);
        }
        used_.cpus -= demand(job.spec).cpus;
        used_.gpus -= demand(job.spec).gpus;
        release_gpus(job);
        log::info("serve", "job {} {}: {}", id, state_name(job.state), job.message);
        save(job);
    }
}

void Queue::release_gpus(const Job& job) {
    size_t from = 0;
    while (from < job.gpus.size()) {
        size_t comma = job.gpus.find(',', from);
        if (comma == std::string::npos)
            comma = job.gpus.size();
        gpu_busy_[std::stoul(job.gpus.substr(from, comma - from))] = false;
        from = comma + 1;
    }
}

void Queue::admit() {
    std::vector<Job*> pending;
    for (auto& [id, job] : jobs_) {
        if (job.state == State::pending)
            pending.push_back(&job);
    }
    std::sort(pending.begin(), pending.end(), [](const Job* a, const Job* b) {
        if (a->spec.priority != b->spec.priority)
            return a->spec.priority > b->spec.priority;
        return a->submitted < b->submitted;
    });
    for (Job* job : pending) {
        Capacity need = demand(job->spec);
        if (used_.cpus + need.cpus > options_.capacity.cpus ||
            used_.gpus + need.gpus > options_.capacity.gpus)
            return;  // strict order: the jobs behind it wait too
        start(*job);
    }
}

void Queue::start(Job& job) {
    const std::string dir = job_dir(job.id);
    const JobSpec& s = job.spec;
    std::vector<std::string> argv = {options_.kiln,
                                     "launch",
                                     "-n",
                                     std::to_string(s.ranks),
                                     "--max-failures",
                                     std::to_string(s.max_failures),
                                     "--",
                                     options_.kiln};
    argv.insert(argv.end(), s.entrypoint.begin(), s.entrypoint.end());
    if (s.entrypoint[0] == "train" || s.entrypoint[0] == "compile") {
        argv.push_back("--set");
        argv.push_back("run.dir=" + dir);
    } else if (s.entrypoint[0] == "run") {
        argv.push_back("--out");
        argv.push_back(dir);
    }
    if (s.memory_per_rank > 0) {  // the job checks its memory plan against it before a step
        argv.push_back("--set");
        argv.push_back(fmt::format("train.memory_limit_gb={:.9g}",
                                   double(s.memory_per_rank) / double(int64_t(1) << 30)));
    }
    std::string log_path = job_log(job.id);
    try {
        fs::make_dirs(dir);
    } catch (const Error& e) {
        job.state = State::failed;
        job.message = e.what();
        save(job);
        return;
    }
    // The GPUs it gets (freed in reap()).
    job.gpus.clear();
    for (int need = demand(s).gpus, g = 0; need > 0 && g < int(gpu_busy_.size()); g++) {
        if (!gpu_busy_[size_t(g)]) {
            gpu_busy_[size_t(g)] = true;
            job.gpus += (job.gpus.empty() ? "" : ",") + std::to_string(g);
            need--;
        }
    }
    std::vector<std::string> env;
    for (char** e = environ; *e; e++) {
        std::string_view v(*e);
        if (v.rfind("OMP_NUM_THREADS=", 0) != 0 && v.rfind("CUDA_VISIBLE_DEVICES=", 0) != 0 &&
            v.rfind("KILN_JOB_ID=", 0) != 0)
            env.emplace_back(v);
    }
    env.push_back("OMP_NUM_THREADS=" + std::to_string(s.cpus_per_rank));
    env.push_back("CUDA_VISIBLE_DEVICES=" + job.gpus);
    env.push_back("KILN_JOB_ID=" + job.id);
    for (const auto& [name, value] : s.env_vars)  // checked: none of the above
        env.push_back(name + "=" + value);

    std::vector<char*> args, envp;
    for (auto& a : argv)
        args.push_back(a.data());
    args.push_back(nullptr);
    for (auto& e : env)
        envp.push_back(e.data());
    envp.push_back(nullptr);
    const std::string workdir = s.working_dir;
    pid_t pid = ::fork();
    if (pid == 0) {
        // Only async-signal-safe calls from here on: the server has other threads.
        ::setpgid(0, 0);
        sigset_t none;
        sigemptyset(&none);
        ::sigprocmask(SIG_SETMASK, &none, nullptr);  // the head blocks SIGTERM; jobs must not
        ::prctl(PR_SET_PDEATHSIG, SIGTERM);
        int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        int null = ::open("/dev/null", O_RDONLY);
        if (fd < 0 || null < 0)
            ::_exit(126);
        ::dup2(null, STDIN_FILENO);
        ::dup2(fd, STDOUT_FILENO);
        ::dup2(fd, STDERR_FILENO);
        if (!workdir.empty() && ::chdir(workdir.c_str()) != 0) {
            const char why[] = "kiln serve: cannot enter the job's runtime_env.working_dir\n";
            [[maybe_unused]] ssize_t n = ::write(STDERR_FILENO, why, sizeof why - 1);
            ::_exit(126);
        }
        if (!fence_->enter()) {
            const char why[] = "kiln serve: the kernel refused to fence this job's writes\n";
            [[maybe_unused]] ssize_t n = ::write(STDERR_FILENO, why, sizeof why - 1);
            ::_exit(126);
        }
        ::close_range(3, ~0U, 0);  // the listening socket and the database stay with the head
        ::execve(args[0], args.data(), envp.data());
        ::_exit(127);
    }
    if (pid < 0) {
        release_gpus(job);
        job.state = State::failed;
        job.message = fmt::format("cannot start a process: {}", std::strerror(errno));
        save(job);
        return;
    }
    ::setpgid(pid, pid);
    job.pid = pid;
    job.state = State::running;
    job.started = unix_seconds();
    job.message = "running";
    used_.cpus += demand(s).cpus;
    used_.gpus += demand(s).gpus;
    log::info("serve", "job {} started: {} ({} ranks)", job.id, join(s.entrypoint), s.ranks);
    save(job);
}

}  // namespace kiln::serve
