// kiln serve, and its clients: kiln submit / status / logs / stop.
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <memory>
#include <thread>

#include "cli/commands.h"
#include "core/error.h"
#include "core/progress.h"
#include "kernels/backends.h"
#include "serve/client.h"
#include "serve/server.h"

namespace kiln::cli {
namespace {

using json = nlohmann::json;

struct Remote {
    std::string address = serve::default_address();
    std::string token;
};

void add_remote(CLI::App& app, Remote& r) {
    app.add_option("--address", r.address, "the head node (env KILN_ADDRESS)")
        ->capture_default_str();
    app.add_option("--token", r.token, "the head's token (env KILN_TOKEN)");
}

// Follows a job's log to stdout until the job ends; returns 0 when it succeeded.
int follow(const serve::Client& c, const std::string& id) {
    c.stream("/api/jobs/" + id + "/logs/tail", [](std::string_view text) {
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
    });
    json job = c.get("/api/jobs/" + id);
    std::fprintf(stderr, "job %s %s: %s\n", id.c_str(), job["status"].get<std::string>().c_str(),
                 job["message"].get<std::string>().c_str());
    return job["status"] == "SUCCEEDED" ? 0 : 1;
}

}  // namespace

Action add_serve(CLI::App& app) {
    auto o = std::make_shared<serve::ServeOptions>();
    o->capacity.cpus = int(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN)));
    o->capacity.gpus = kernels::cuda_devices();
    if (const char* t = std::getenv("KILN_TOKEN"))
        o->token = t;
    app.add_option("--host", o->host, "address to listen on")->capture_default_str();
    app.add_option("--port", o->port, "port to listen on")->capture_default_str();
    app.add_option("--token", o->token,
                   "secret every request must carry (env KILN_TOKEN); required off loopback");
    app.add_option("--runs", o->runs,
                   "runs folder: job folders, the jobs database, and any "
                   "run folders to show")
        ->capture_default_str();
    app.add_option("--data-root", o->data_roots,
                   "a folder jobs may read and write besides --runs (repeatable); a job's file "
                   "arguments must lie in one of them")
        ->check(CLI::ExistingDirectory);
    app.add_option("--cpus", o->capacity.cpus, "CPU slots the queue hands out (default: cores)")
        ->capture_default_str();
    app.add_option("--gpus", o->capacity.gpus, "GPUs the queue hands out (default: all)")
        ->capture_default_str();
    app.footer(
        "The dashboard is at http://HOST:PORT/; the jobs API at /api/jobs/ speaks Ray's Jobs "
        "REST API, as `ray job submit --address http://HOST:PORT -- kiln train ...` sends it; "
        "Prometheus metrics at /metrics. Jobs run kiln commands only, and read and write files "
        "only inside --runs and the --data-root folders (docs/operations.md, section 4).");
    return [o] {
        char self[4096];
        ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
        if (n <= 0)
            throw error("cannot find this program's own path in /proc/self/exe");
        o->kiln = std::string(self, size_t(n));
        return serve::serve(*o);
    };
}

Action add_submit(CLI::App& app) {
    struct Options {
        Remote remote;
        std::vector<std::string> command;
        int ranks = 1, cpus = 1, gpus = 0, priority = 0, max_failures = 0;
        std::string id, working_dir;
        std::vector<std::string> env;
        bool follow = false;
    };
    auto o = std::make_shared<Options>();
    add_remote(app, o->remote);
    app.add_option("-n,--ranks", o->ranks, "ranks (train only); all start together or none");
    app.add_option("--cpus-per-rank", o->cpus, "CPU slots each rank takes");
    app.add_option("--gpus-per-rank", o->gpus, "GPUs each rank takes");
    app.add_option("--priority", o->priority, "higher starts first");
    app.add_option("--max-failures", o->max_failures, "gang restarts from the last checkpoint");
    app.add_option("--id", o->id, "the job's id (default: job-NNNN)");
    app.add_option("--env", o->env, "NAME=VALUE set for every rank (repeatable; runtime_env)")
        ->allow_extra_args(false);  // one value each, so that `--` still ends the options
    app.add_option("--working-dir", o->working_dir,
                   "a folder on the head, inside its roots, where the job starts");
    app.add_flag("-f,--follow", o->follow, "print the job's log until it ends; exit as it did");
    app.add_option("command", o->command, "the kiln command, after --")->required();
    app.footer("Example: kiln submit -n 2 -- kiln train --set train.steps=1000");
    return [o] {
        serve::Client c(o->remote.address, o->remote.token);
        json body = {{"entrypoint", o->command},       {"ranks", o->ranks},
                     {"entrypoint_num_cpus", o->cpus}, {"entrypoint_num_gpus", o->gpus},
                     {"priority", o->priority},        {"max_failures", o->max_failures}};
        if (!o->id.empty())
            body["submission_id"] = o->id;
        json runtime_env = json::object();
        for (const std::string& e : o->env) {
            size_t eq = e.find('=');
            if (eq == std::string::npos)
                throw error("--env {} is not NAME=VALUE", e);
            runtime_env["env_vars"][e.substr(0, eq)] = e.substr(eq + 1);
        }
        if (!o->working_dir.empty())
            runtime_env["working_dir"] = o->working_dir;
        body["runtime_env"] = runtime_env;
        json r = c.post("/api/jobs/", body);
        std::string id = r["job_id"];
        std::printf("%s\n", id.c_str());
        std::fflush(stdout);
        return o->follow ? follow(c, id) : 0;
    };
}

Action add_status(CLI::App& app) {
    struct Options {
        Remote remote;
        std::string id;
        bool json_out = false;
    };
    auto o = std::make_shared<Options>();
    add_remote(app, o->remote);
    app.add_option("job", o->id, "one job (default: all)");
    app.add_flag("--json", o->json_out, "print the API's JSON");
    return [o] {
        serve::Client c(o->remote.address, o->remote.token);
        json jobs =
            o->id.empty() ? c.get("/api/jobs/") : json::array({c.get("/api/jobs/" + o->id)});
        if (o->json_out) {
            std::printf("%s\n", (o->id.empty() ? jobs : jobs[0]).dump(2).c_str());
            return 0;
        }
        std::printf("%-16s %-10s %5s %6s %8s  %s\n", "JOB", "STATE", "RANKS", "AGE", "RAN",
                    "ENTRYPOINT / MESSAGE");
        double now = unix_seconds();
        // Times are Ray's: unix milliseconds, null when not yet.
        auto seconds = [](const json& t) { return t.is_number() ? t.get<double>() / 1000 : 0.0; };
        for (const json& j : jobs) {
            double start = seconds(j["start_time"]), end = seconds(j["end_time"]);
            double ran = start > 0 ? (end > 0 ? end : now) - start : 0;
            std::printf("%-16s %-10s %5d %6s %8s  %s\n", j["job_id"].get<std::string>().c_str(),
                        j["status"].get<std::string>().c_str(), j["ranks"].get<int>(),
                        human_duration(now - seconds(j["submitted"])).c_str(),
                        human_duration(ran).c_str(), j["entrypoint"].get<std::string>().c_str());
            if (j["status"] != "RUNNING" && j["status"] != "PENDING")
                std::printf("%46s  %s\n", "", j["message"].get<std::string>().c_str());
        }
        return 0;
    };
}

Action add_logs(CLI::App& app) {
    struct Options {
        Remote remote;
        std::string id;
        bool follow = false;
    };
    auto o = std::make_shared<Options>();
    add_remote(app, o->remote);
    app.add_option("job", o->id, "the job")->required();
    app.add_flag("-f,--follow", o->follow, "keep printing until the job ends");
    return [o] {
        serve::Client c(o->remote.address, o->remote.token);
        if (o->follow)
            return follow(c, o->id);
        std::string logs = c.get("/api/jobs/" + o->id + "/logs")["logs"];
        std::fwrite(logs.data(), 1, logs.size(), stdout);
        return 0;
    };
}

Action add_stop(CLI::App& app) {
    struct Options {
        Remote remote;
        std::string id;
    };
    auto o = std::make_shared<Options>();
    add_remote(app, o->remote);
    app.add_option("job", o->id, "the job")->required();
    return [o] {
        serve::Client c(o->remote.address, o->remote.token);
        bool stopped = c.post("/api/jobs/" + o->id + "/stop", json::object())["stopped"];
        std::printf("%s\n", stopped ? "stopping" : "already over");
        return 0;
    };
}

}  // namespace kiln::cli
