#pragma once
// Jobs of the head node: what a job is, where jobs are kept (SQLite, so a restarted head loses
// none), and the queue that starts them with gang admission.
//
// A job is a kiln subcommand with its arguments, a rank count and per-rank resources. It runs
// as `kiln launch -n RANKS -- kiln CMD ARGS...` in its own process group, with its output in
// RUNS/<id>/job.log; a `train` or `run` job writes its run folder at RUNS/<id>. The queue admits
// jobs in priority order (then submission order) and starts one only when all its ranks fit the
// free capacity: a job that does not fit waits, and so do the jobs behind it (no job ever starts
// partially, none is starved by smaller ones behind it).
#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "serve/jobspec.h"
#include "serve/sandbox.h"

struct sqlite3;

namespace kiln::serve {

// Ray's job states.
enum class State { pending, running, stopped, succeeded, failed };
const char* state_name(State s);  // "PENDING", ...
bool terminal(State s);

struct Job {
    std::string id;
    JobSpec spec;
    State state = State::pending;
    double submitted = 0, started = 0, ended = 0;  // unix seconds; 0: not yet (JSON: ms)
    std::string message;                           // why it ended, in one sentence
    int exit_code = -1;
    pid_t pid = 0;
    std::string gpus;          // CUDA_VISIBLE_DEVICES given to it
    double stop_deadline = 0;  // stopped by request: SIGKILL after this time (0: not stopped)
};
// A job as the API gives it: Ray's JobDetails (type, job_id, submission_id, status,
// entrypoint, message, error_type, start_time and end_time in integer unix milliseconds or
// null, metadata, runtime_env, driver_* ...) with kiln's fields beside (ranks, priority, argv,
// exit_code, pid, ...). It is also the record kept in the jobs database.
nlohmann::json to_json(const Job& job);

struct Capacity {
    int cpus = 1;
    int gpus = 0;
};

struct QueueOptions {
    std::string runs;  // the runs folder: job folders and the jobs database live here
    std::vector<std::string> data_roots;  // folders jobs may read and write besides (sandbox.h)
    Capacity capacity;
    std::string kiln;  // the binary jobs run (this one)
    double stop_grace_s = 15;
};

// The jobs table and the process side of jobs. All public calls are thread safe.
class Queue {
public:
    // Opens (or creates) RUNS/jobs.sqlite; jobs the database shows running belonged to a head
    // that stopped: they are marked FAILED, saying so. Starts the scheduling thread.
    explicit Queue(QueueOptions options);
    // Throws Error when another head holds the runs folder: two would start its pending jobs
    // twice and mark each other's running ones failed.
    ~Queue();  // stops running jobs (SIGTERM, then SIGKILL after the grace) and records it
    Queue(const Queue&) = delete;
    Queue& operator=(const Queue&) = delete;

    // Throws Error: duplicate id, demand over the whole capacity, a file argument or
    // working_dir outside the head's roots (relative arguments are relative to working_dir).
    Job submit(JobSpec spec);
    std::vector<Job> list() const;
    std::optional<Job> get(const std::string& id) const;
    // PENDING -> STOPPED at once; RUNNING -> SIGTERM to its process group (STOPPED when it
    // exits). False when the job was already over.
    bool stop(const std::string& id);
    // Removes a finished job from the table (its folder stays). Throws Error if still active.
    bool remove(const std::string& id);

    std::string job_dir(const std::string& id) const { return options_.runs + "/" + id; }
    std::string job_log(const std::string& id) const { return job_dir(id) + "/job.log"; }
    Capacity capacity() const { return options_.capacity; }
    Capacity used() const;

private:
    void loop();
    void reap();
    void admit();
    void start(Job& job);
    void release_gpus(const Job& job);
    void save(const Job& job);
    Capacity demand(const JobSpec& s) const;

    QueueOptions options_;
    Sandbox box_;                        // where jobs' file arguments may point
    std::unique_ptr<WriteFence> fence_;  // where jobs' processes may write
    sqlite3* db_ = nullptr;
    int lock_fd_ = -1;  // RUNS/head.lock, held (flock) while this head lives
    mutable std::mutex mutex_;
    std::condition_variable wake_;
    std::map<std::string, Job> jobs_;
    std::vector<bool> gpu_busy_;
    Capacity used_{0, 0};
    int64_t next_number_ = 1;
    bool quit_ = false;
    std::thread thread_;
};

}  // namespace kiln::serve
