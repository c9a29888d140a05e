// kiln serve over real HTTP, against a real server process: the jobs API, gang admission,
// a head restart, bad input, and the dashboard rendered by headless Chromium.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "checkpoint/rundir.h"
#include "core/fs.h"
#include "core/progress.h"
#include "fixture.h"
#include "launch/supervisor.h"
#include "serve/jobs.h"

namespace kiln {
namespace {

using json = nlohmann::json;
using kiln::testing::TempDir;

// A micro model that trains a step in well under a second.
const std::string kMicro =
    "kiln train --set model.dim=64 --set model.n_layers=2 --set model.n_heads=4 "
    "--set model.n_kv_heads=2 --set model.vocab_size=256 --set train.seq_len=32 "
    "--set train.micro_batch=4 --set train.log_every=1 --set train.peak_gflops=100";

// A `kiln serve` process on a free port; SIGTERM at destruction.
struct Server {
    pid_t pid = -1;
    int port = 0;
    std::string runs, log;

    Server(const std::string& runs_dir, std::vector<std::string> extra = {}, int port_ = 0)
        : port(port_ ? port_ : launch::free_port()), runs(runs_dir), log(runs_dir + ".serve.log") {
        std::vector<std::string> args = {kiln::testing::kiln_binary(),
                                         "serve",
                                         "--port",
                                         std::to_string(port),
                                         "--runs",
                                         runs,
                                         "--cpus",
                                         "2"};
        args.insert(args.end(), extra.begin(), extra.end());
        pid = ::fork();
        if (pid == 0) {
            int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
            ::dup2(fd, 1);
            ::dup2(fd, 2);
            std::vector<char*> argv;
            for (auto& a : args)
                argv.push_back(a.data());
            argv.push_back(nullptr);
            ::execv(argv[0], argv.data());
            ::_exit(127);
        }
        for (int i = 0; i < 100; i++) {
            if (auto r = client().Get("/healthz"); r && r->status == 200)
                return;
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        ADD_FAILURE() << "kiln serve did not come up: " << fs::read_file(log);
    }
    ~Server() { stop(SIGTERM); }
    int stop(int sig) {
        if (pid <= 0)
            return -1;
        ::kill(pid, sig);
        int status = 0;
        ::waitpid(pid, &status, 0);
        pid = -1;
        return status;
    }
    httplib::Client client(const std::string& token = "") const {
        httplib::Client c("127.0.0.1", port);
        c.set_read_timeout(30, 0);
        if (!token.empty())
            c.set_bearer_token_auth(token.c_str());
        return c;
    }
    json get(const std::string& path) const {
        auto r = client().Get(path.c_str());
        EXPECT_TRUE(r) << path;
        if (!r)
            return json();
        EXPECT_EQ(r->status, 200) << path << ": " << r->body;
        return json::parse(r->body, nullptr, false);
    }
    // Metrics lines of a run so far (0 before its folder exists).
    size_t lines(const std::string& run) const {
        auto r = client().Get(("/api/run/metrics?name=" + run).c_str());
        if (!r || r->status != 200)
            return 0;
        return json::parse(r->body)["lines"].size();
    }
    std::string submit(const json& body) const {
        auto r = client().Post("/api/jobs/", body.dump(), "application/json");
        EXPECT_TRUE(r);
        if (!r)
            return "";
        EXPECT_EQ(r->status, 200) << r->body;
        return json::parse(r->body).value("job_id", "");
    }
    // Polls until the job reaches a final state (or `state`); returns the job.
    json wait(const std::string& id, const std::string& state = "", double timeout_s = 120) const {
        auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
        json j;
        while (std::chrono::steady_clock::now() < deadline) {
            j = get("/api/jobs/" + id);
            std::string s = j.value("status", "");
            if (s == state ||
                (state.empty() && (s == "SUCCEEDED" || s == "FAILED" || s == "STOPPED")))
                return j;
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        ADD_FAILURE() << "job " << id << " never reached " << (state.empty() ? "an end" : state)
                      << ": " << j.dump();
        return j;
    }
};

json job(const std::string& entrypoint, int ranks = 1) {
    return {{"entrypoint", entrypoint}, {"ranks", ranks}};
}

TEST(Serve, SubmitListLogsStop) {
    TempDir dir;
    Server s(dir / "runs");
    std::string id = s.submit(job(kMicro + " --set train.steps=3"));
    EXPECT_EQ(id, "job-0001");
    json done = s.wait(id);
    EXPECT_EQ(done["status"], "SUCCEEDED") << done.dump();
    EXPECT_GT(done["end_time"].get<double>(), done["start_time"].get<double>());

    json all = s.get("/api/jobs/");
    ASSERT_EQ(all.size(), 1u);
    EXPECT_EQ(all[0]["job_id"], id);
    std::string logs = s.get("/api/jobs/" + id + "/logs")["logs"];
    EXPECT_NE(logs.find("step"), std::string::npos) << logs;
    // The run folder is the job's, and the runs API sees it.
    json run = s.get("/api/run?name=" + id);
    EXPECT_EQ(run["status"]["state"], "finished");
    EXPECT_EQ(run["ranks"].size(), 1u);
    EXPECT_EQ(run["checkpoints"].size(), 1u);
    json m = s.get("/api/run/metrics?name=" + id);
    EXPECT_EQ(m["lines"].size(), 3u);
    json more = s.get("/api/run/metrics?name=" + id +
                      "&offset=" + std::to_string(m["offset"].get<int64_t>()));
    EXPECT_EQ(more["lines"].size(), 0u);

    // A long job, followed while it runs, then stopped.
    std::string long_id = s.submit(job(kMicro + " --set train.steps=100000"));
    s.wait(long_id, "RUNNING");
    // Eight followers at once, the most the head serves (each holds a server thread); a ninth is
    // turned away, and the API still answers.
    std::string streamed;
    std::vector<std::thread> followers;
    std::atomic<int> streaming{0};
    for (int f = 0; f < 8; f++) {
        followers.emplace_back([&, f] {
            bool counted = false;  // each follower counts once, at its first bytes
            s.client().Get(("/api/jobs/" + long_id + "/logs/tail").c_str(),
                           [&](const char* data, size_t n) {
                               if (f == 0)
                                   streamed.append(data, n);
                               if (n > 0 && !counted) {
                                   counted = true;
                                   streaming++;
                               }
                               return true;
                           });
        });
    }
    for (int i = 0; i < 600 && (s.lines(long_id) < 2 || streaming < 8); i++)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(streaming, 8) << "not every follower got bytes";
    // Should the ninth be let in, it is cut off at its headers rather than followed for ever.
    int ninth_status = 0;
    std::string ninth_body;
    s.client().Get(
        ("/api/jobs/" + long_id + "/logs/tail").c_str(),
        [&](const httplib::Response& head) { return (ninth_status = head.status) != 200; },
        [&](const char* data, size_t n) { return ninth_body.append(data, n), true; });
    EXPECT_EQ(ninth_status, 503) << ninth_body;
    EXPECT_NE(ninth_body.find("8 log followers are open"), std::string::npos) << ninth_body;
    EXPECT_EQ(s.get("/api/jobs/").size(), 2u);
    auto r = s.client().Post(("/api/jobs/" + long_id + "/stop").c_str(), "", "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(json::parse(r->body)["stopped"], true);
    json stopped = s.wait(long_id);
    EXPECT_EQ(stopped["status"], "STOPPED");
    for (auto& f : followers)
        f.join();  // the streams end with the job
    EXPECT_NE(streamed.find("step"), std::string::npos) << streamed;

    // Prometheus sees both runs.
    auto metrics = s.client().Get("/metrics");
    ASSERT_TRUE(metrics);
    EXPECT_NE(metrics->body.find("kiln_jobs{state=\"SUCCEEDED\"} 1"), std::string::npos)
        << metrics->body;
    EXPECT_NE(metrics->body.find("kiln_train_step{run=\"" + id + "\"} 3"), std::string::npos);
    EXPECT_NE(metrics->body.find("kiln_train_loss{run=\"" + long_id + "\"}"), std::string::npos);

    // Delete removes a finished job from the table.
    auto del = s.client().Delete(("/api/jobs/" + id).c_str());
    ASSERT_TRUE(del);
    EXPECT_EQ(del->status, 200);
    EXPECT_EQ(s.get("/api/jobs/").size(), 1u);
}

TEST(Serve, GangAdmissionNeverStartsAJobPartially) {
    TempDir dir;
    Server s(dir / "runs");  // 2 CPU slots
    std::string a = s.submit(job(kMicro + " --set train.steps=8", 2));
    std::string b = s.submit(job(kMicro + " --set train.steps=8", 2));
    // While a runs, b waits whole: it holds no slot and has no process.
    s.wait(a, "RUNNING");
    json pending = s.get("/api/jobs/" + b);
    EXPECT_EQ(pending["status"], "PENDING");
    EXPECT_EQ(pending["pid"], 0);
    json ja = s.wait(a), jb = s.wait(b);
    EXPECT_EQ(ja["status"], "SUCCEEDED") << ja.dump();
    EXPECT_EQ(jb["status"], "SUCCEEDED") << jb.dump();
    EXPECT_GE(jb["start_time"].get<double>(), ja["end_time"].get<double>());
    // A job bigger than the whole capacity is refused at once.
    auto r = s.client().Post("/api/jobs/", job(kMicro, 3).dump(), "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 400);
    EXPECT_NE(r->body.find("could never start"), std::string::npos) << r->body;
    // Priority: with the slots busy, a later high-priority job starts before an earlier one.
    std::string busy = s.submit(job(kMicro + " --set train.steps=6", 2));
    std::string low = s.submit(job(kMicro + " --set train.steps=2", 2));
    json high_body = job(kMicro + " --set train.steps=2", 2);
    high_body["priority"] = 5;
    std::string high = s.submit(high_body);
    s.wait(busy);
    json jl = s.wait(low), jh = s.wait(high);
    EXPECT_LE(jh["start_time"].get<double>(), jl["start_time"].get<double>());
    EXPECT_GE(jl["start_time"].get<double>(), jh["end_time"].get<double>());
}

// A trainer killed without a word (SIGKILL, an OOM kill, its host gone) leaves status.json
// saying "running". Readers judge it by the trainer's pid on this host and by the file's
// heartbeat elsewhere, and show it "lost".
TEST(Serve, ARunWhoseTrainerDiedSilentlyReadsLost) {
    TempDir dir;
    Server s(dir / "runs");
    std::string id = s.submit(job(kMicro + " --set train.steps=100000"));
    s.wait(id, "RUNNING");
    json status = json::object();
    for (int i = 0; i < 600 && status.value("state", "") != "running"; i++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        auto r = s.client().Get(("/api/run?name=" + id).c_str());  // 404 until the folder exists
        if (r && r->status == 200)
            status = json::parse(r->body)["status"];
        if (!status.is_object())
            status = json::object();
    }
    ASSERT_EQ(status.value("state", ""), "running") << status.dump();
    EXPECT_EQ(status["host"], host_name());
    auto running = [&](const std::string& run) {
        std::string m = s.client().Get("/metrics")->body;
        size_t at = m.find("kiln_train_running{run=\"" + run + "\"} ");
        return at == std::string::npos ? -1 : m[m.find("} ", at) + 2] - '0';
    };
    EXPECT_EQ(running(id), 1);
    ASSERT_EQ(::kill(pid_t(status["pid"].get<int64_t>()), SIGKILL), 0);
    s.wait(id);
    json after = s.get("/api/run?name=" + id)["status"];
    EXPECT_EQ(after["state"], "lost") << after.dump();
    EXPECT_NE(after.value("message", "").find("stopped without a word"), std::string::npos);
    EXPECT_EQ(s.get("/api/runs")[0]["status"]["state"], "lost");
    EXPECT_EQ(running(id), 0);

    // A run on another host: alive while its heartbeat is fresh, lost once it is old.
    const std::string elsewhere = s.runs + "/elsewhere";
    fs::make_dirs(elsewhere);
    fs::write_file_replace(
        elsewhere + "/status.json",
        R"({"state":"running","step":7,"steps":100,"pid":1,"host":"kiln-other-host"})");
    EXPECT_EQ(s.get("/api/run?name=elsewhere")["status"]["state"], "running");
    for (int i = 0; i < 50 && running("elsewhere") < 0; i++)  // the list is rescanned each second
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(running("elsewhere"), 1);
    const double beat =
        unix_seconds() - checkpoint::kMissedBeats * checkpoint::kHeartbeatSeconds - 5;
    const timespec old{time_t(beat), 0};
    const timespec times[2] = {old, old};
    ASSERT_EQ(::utimensat(AT_FDCWD, (elsewhere + "/status.json").c_str(), times, 0), 0);
    json lost = s.get("/api/run?name=elsewhere")["status"];
    EXPECT_EQ(lost["state"], "lost");
    EXPECT_NE(lost.value("message", "").find("pid 1 on kiln-other-host"), std::string::npos)
        << lost.dump();
    EXPECT_EQ(running("elsewhere"), 0);
}

TEST(Serve, RestartKeepsEveryJob) {
    TempDir dir;
    std::string done, running, queued;
    int port = 0;
    {
        Server s(dir / "runs");
        port = s.port;
        done = s.submit(job(kMicro + " --set train.steps=2"));
        s.wait(done);
        running = s.submit(job(kMicro + " --set train.steps=100000", 2));
        s.wait(running, "RUNNING");
        queued = s.submit(job(kMicro + " --set train.steps=2"));
        // A second head on the same folder would mark the running job failed and start the
        // queued one again: it refuses to start, in one sentence.
        std::string out = dir / "second.txt";
        int rc = kiln::testing::run(kiln::testing::kiln_binary() + " serve --port " +
                                    std::to_string(launch::free_port()) + " --runs " +
                                    (dir / "runs") + " >" + out + " 2>&1");
        EXPECT_NE(rc, 0);
        EXPECT_NE(fs::read_file(out).find("another kiln serve (process " + std::to_string(s.pid) +
                                          ") holds the runs folder"),
                  std::string::npos)
            << fs::read_file(out);
        // Nor does a head on another folder share the port: its requests would go to either.
        rc = kiln::testing::run(kiln::testing::kiln_binary() + " serve --port " +
                                std::to_string(port) + " --runs " + (dir / "other") + " >" + out +
                                " 2>&1");
        EXPECT_NE(rc, 0);
        EXPECT_NE(fs::read_file(out).find(fmt::format("cannot listen on 127.0.0.1:{}", port)),
                  std::string::npos)
            << fs::read_file(out);
        // The head dies without a chance to clean up.
        s.stop(SIGKILL);
    }
    Server s(dir / "runs", {}, port);
    json all = s.get("/api/jobs/");
    ASSERT_EQ(all.size(), 3u);
    EXPECT_EQ(s.get("/api/jobs/" + done)["status"], "SUCCEEDED");
    json lost = s.get("/api/jobs/" + running);
    EXPECT_EQ(lost["status"], "FAILED");
    EXPECT_NE(lost["message"].get<std::string>().find("head node stopped"), std::string::npos)
        << lost.dump();
    // The queued job was not forgotten either: the new head runs it.
    EXPECT_EQ(s.wait(queued)["status"], "SUCCEEDED");
    // New ids continue after the old ones.
    EXPECT_EQ(s.submit(job(kMicro + " --set train.steps=1")), "job-0004");
}

TEST(Serve, BadInputGetsAClearFourHundred) {
    TempDir dir;
    Server s(dir / "runs");
    auto post = [&](const std::string& body) {
        auto r = s.client().Post("/api/jobs/", body, "application/json");
        EXPECT_TRUE(r);
        return r ? std::make_pair(r->status, r->body) : std::make_pair(0, std::string());
    };
    auto expect = [&](std::pair<int, std::string> r, int status, const std::string& words) {
        EXPECT_EQ(r.first, status) << r.second;
        EXPECT_NE(r.second.find(words), std::string::npos) << r.second;
    };
    expect(post("{\"entrypoint\": "), 400, "not valid JSON");
    // A value nested 100,000 deep (200 KB) in a numeric field once crashed the head while the
    // error message was formatted; now it is refused, and the head lives on.
    expect(post(R"({"entrypoint": "kiln train", "ranks": )" + std::string(100000, '[') +
                std::string(100000, ']') + "}"),
           400, "nests deeper than 16 levels");
    expect(post(R"({"entrypoint": "kiln train", "ranks": [[1]]})"), 400, "must be an integer");
    expect(post("[1, 2]"), 400, "must be a JSON object");
    expect(post(R"({"entrypoint": "kiln train", "colour": "red"})"), 400,
           "unknown field \\\"colour\\\"");
    expect(post(R"({"entrypoint": "rm -rf /"})"), 400, "is not a kiln command");
    expect(post(R"({"entrypoint": "kiln train; rm -rf /"})"), 400, "shell character");
    expect(post(R"({"entrypoint": "kiln serve"})"), 400, "is not a kiln command");
    expect(post(R"({"entrypoint": "kiln train", "ranks": "two"})"), 400, "must be an integer");
    expect(post(R"({"entrypoint": "kiln train --set run.dir=/etc"})"), 400, "its own folder");
    expect(post(R"({"entrypoint": "kiln data", "ranks": 2})"), 400, "only train");

    auto get = [&](const std::string& path) {
        auto r = s.client().Get(path.c_str());
        EXPECT_TRUE(r);
        return r ? std::make_pair(r->status, r->body) : std::make_pair(0, std::string());
    };
    for (const char* path :
         {"/api/run/log?name=../../etc&rank=0", "/api/run/log?name=..%2F..%2Fetc",
          "/api/run?name=%2Fetc", "/api/run?name=a/../../etc", "/api/run/metrics?name=.",
          "/api/run/log?name=a/b/c"}) {
        auto r = get(path);
        EXPECT_EQ(r.first, 400) << path << ": " << r.second;
        EXPECT_NE(r.second.find("not a run"), std::string::npos) << path << ": " << r.second;
    }
    // A link inside the runs folder that leads out of it is refused too.
    std::filesystem::create_directories(dir / "outside");
    std::ofstream(dir / "outside/config.yaml") << "secret\n";
    std::filesystem::create_directory_symlink(dir / "outside", dir / "runs/escape");
    expect(get("/api/run?name=escape"), 400, "outside the runs folder");
    // So is a file in a run folder that is a link out of it, and a FIFO never blocks a reply.
    std::filesystem::create_directories(dir / "runs/linked/ranks");
    std::ofstream(dir / "runs/linked/status.json") << R"({"state": "running"})";
    std::ofstream(dir / "outside/rank.json") << R"({"secret": 1})";
    std::filesystem::create_symlink(dir / "outside/config.yaml", dir / "runs/linked/config.yaml");
    std::filesystem::create_symlink(dir / "outside/config.yaml", dir / "runs/linked/job.log");
    std::filesystem::create_symlink(dir / "outside/rank.json", dir / "runs/linked/ranks/r0.json");
    ASSERT_EQ(::mkfifo((dir / "runs/linked/rank-0.log").c_str(), 0644), 0);
    auto linked = get("/api/run?name=linked");
    EXPECT_EQ(linked.first, 200) << linked.second;
    EXPECT_EQ(linked.second.find("secret"), std::string::npos) << linked.second;
    for (const char* path : {"/api/run/log?name=linked", "/api/run/log?name=linked&rank=0"}) {
        auto log = get(path);
        EXPECT_EQ(log.first, 200) << path;
        EXPECT_EQ(log.second, "") << path;
    }
    expect(get("/api/jobs/nope"), 404, "no job named");
    // Bytes that are not UTF-8, quoted back in the error, once aborted the head: they come back
    // as U+FFFD.
    expect(get("/%FF"), 404, "no such endpoint");
    expect(get("/api/jobs/%FF%FE"), 404,
           "no such endpoint: GET /api/jobs/\xEF\xBF\xBD\xEF\xBF\xBD");
    expect(get("/api/run?name=%FF"), 400, "not a run");
    // Only runs that may be read are listed: not the link out of the folder above.
    for (const json& run : s.get("/api/runs"))
        EXPECT_NE(run.value("name", ""), "escape") << run.dump();
    // A checkpoint folder that is a link is not looked into.
    std::filesystem::create_directories(dir / "runs/linked/checkpoints");
    std::ofstream(dir / "outside/rank-00000.safetensors") << std::string(1000, 'x');
    std::filesystem::create_directory_symlink(dir / "outside",
                                              dir / "runs/linked/checkpoints/step-00000001");
    linked = get("/api/run?name=linked");
    ASSERT_EQ(linked.first, 200) << linked.second;
    const json steps = json::parse(linked.second)["checkpoints"];
    ASSERT_EQ(steps.size(), 1u) << linked.second;
    EXPECT_EQ(steps[0]["bytes"], 0) << linked.second;
    // A run folder with a config and no status yet (a job stopped in its first second) leaves
    // /metrics answering.
    std::filesystem::create_directories(dir / "runs/starting");
    std::ofstream(dir / "runs/starting/config.yaml") << "model:\n  dim: 32\n";
    EXPECT_EQ(get("/metrics").first, 200);
    expect(get("/nowhere/../../etc/passwd"), 404, "no such endpoint");
    expect(get("/api/run/metrics?name=x&offset=ten"), 400, "not an integer");
    // A client-chosen id equal to the next automatic one does not block automatic ids.
    const std::string one = kMicro + " --set train.steps=1";
    json chosen = job(one);
    chosen["submission_id"] = "job-0002";
    expect(post(chosen.dump()), 200, "job-0002");
    expect(post(job(one).dump()), 200, "\"job-0003\"");
    expect(post(chosen.dump()), 400, "exists already");
    expect(post(job(one).dump()), 200, "\"job-0004\"");
    // A job whose output is not UTF-8 (its config's bytes, quoted in its error) fails, and the
    // head goes on, its record and log readable.
    std::ofstream(dir / "runs/latin1.yaml") << "model:\n  preset: \xff\xfe\n";
    const std::string bad = s.submit(job("kiln train --config " + (dir / "runs/latin1.yaml")));
    EXPECT_EQ(s.wait(bad)["status"], "FAILED");
    expect(get("/api/jobs/" + bad + "/logs"), 200, "model.preset=\xEF\xBF\xBD");

    // A 100 MB body is turned away without being read.
    std::string huge(100u << 20, 'x');
    auto r = s.client().Post("/api/jobs/", huge, "application/json");
    ASSERT_TRUE(r) << httplib::to_string(r.error());
    EXPECT_EQ(r->status, 413);
    EXPECT_NE(r->body.find("over the 1048576 byte limit"), std::string::npos) << r->body;
    // The server is still up and answering.
    EXPECT_EQ(get("/healthz").first, 200);
    EXPECT_EQ(s.get("/api/jobs/").size(), 4u);  // the four accepted above
}

// A web page on another site can make a browser send simple requests to a loopback head (a POST
// of text/plain, a form) and, with DNS rebinding, read the answers. The head answers only its own
// Host and Origin, takes bodies only as JSON with a length, and answers no CORS preflight; the
// refusals come before the body is read.
// Clients that open connections and send their headers slowly (or never) each hold a
// connection thread until the read timeout; 100 of them leave the API and /metrics answering
// at once. With a fixed pool of 32 threads, 33 such clients stopped the head for 10 s.
TEST(Serve, SlowClientsLeaveTheApiAnswering) {
    TempDir dir;
    Server s(dir / "runs");
    std::vector<int> slow;
    for (int i = 0; i < 100; i++) {
        int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        addr.sin_port = htons(uint16_t(s.port));
        ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
        const std::string part = "GET /api/jobs/ HTTP/1.1\r\nHost: 127.0.0.1\r\n";
        ASSERT_EQ(::send(fd, part.data(), part.size(), 0), ssize_t(part.size()));
        slow.push_back(fd);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // each is now on a thread
    for (const char* path : {"/healthz", "/api/jobs/", "/metrics"}) {
        httplib::Client c("127.0.0.1", s.port);
        c.set_read_timeout(2, 0);
        c.set_connection_timeout(2, 0);
        auto t0 = std::chrono::steady_clock::now();
        auto r = c.Get(path);
        ASSERT_TRUE(r) << path << " did not answer within 2 s beside 100 slow clients";
        EXPECT_EQ(r->status, 200) << path;
        EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0)
            << path;
    }
    for (int fd : slow)
        ::close(fd);
}

TEST(Serve, BrowsersOnOtherSitesAreTurnedAway) {
    TempDir dir;
    Server s(dir / "runs");
    const std::string body = job(kMicro + " --set train.steps=1").dump();
    auto send = [&](const std::string& method, const std::string& path, httplib::Headers headers,
                    const std::string& content = "", const std::string& type = "") {
        httplib::Request req;
        req.method = method;
        req.path = path;
        req.headers = std::move(headers);
        req.body = content;
        if (!type.empty())
            req.set_header("Content-Type", type);
        auto r = s.client().send(req);
        EXPECT_TRUE(r) << method << " " << path;
        return r ? std::make_pair(r->status, r->body) : std::make_pair(0, std::string());
    };
    auto refused = [&](std::pair<int, std::string> r, int status, const std::string& words) {
        EXPECT_EQ(r.first, status) << r.second;
        EXPECT_NE(r.second.find(words), std::string::npos) << r.second;
    };
    refused(send("POST", "/api/jobs/", {}, body, "text/plain"), 415,
            "must be Content-Type: application/json");
    refused(send("POST", "/api/jobs/", {}, "entrypoint=kiln+train",
                 "application/x-www-form-urlencoded"),
            415, "application/json");
    refused(
        send("POST", "/api/jobs/", {{"Origin", "http://evil.example"}}, body, "application/json"),
        403, "is not this head's (http://127.0.0.1:");
    refused(send("POST", "/api/jobs/job-0001/stop", {{"Origin", "null"}}), 403, "cross-origin");
    refused(send("GET", "/api/jobs/", {{"Host", "rebound.example:8265"}}), 403,
            "answers only to localhost");
    refused(send("OPTIONS", "/api/jobs/",
                 {{"Origin", "http://evil.example"}, {"Access-Control-Request-Method", "POST"}}),
            403, "no CORS");
    refused(send("GET", "/api/jobs/", {{"Sec-Fetch-Site", "cross-site"}}), 403, "cross-site");
    // A chunked body is refused before it is read (its size is known only at its end).
    ::signal(SIGPIPE, SIG_IGN);  // writing on after the head closed must not end this process
    httplib::Client c = s.client();
    auto chunked = c.Post(
        "/api/jobs/",
        [&](size_t offset, httplib::DataSink& sink) {
            std::string piece(1 << 14, ' ');
            sink.write(piece.data(), piece.size());
            if (offset >= (4u << 14))
                sink.done();
            return true;
        },
        "application/json");
    // The head answers 411 and closes; the client may still be writing then and see the
    // connection reset instead of the answer. Either way nothing was taken (checked below).
    if (chunked) {
        EXPECT_EQ(chunked->status, 411) << chunked->body;
    }
    // Nothing of the above made a job; the head's own page and a plain client still work.
    EXPECT_EQ(s.get("/api/jobs/").size(), 0u);
    auto own =
        send("POST", "/api/jobs/", {{"Origin", "http://127.0.0.1:" + std::to_string(s.port)}}, body,
             "application/json");
    EXPECT_EQ(own.first, 200) << own.second;
    EXPECT_EQ(send("GET", "/api/jobs/", {{"Host", "localhost:" + std::to_string(s.port)}}).first,
              200);
}

TEST(Serve, TokenGuardsEveryCall) {
    TempDir dir;
    // Off loopback without a token the server refuses to start, in one sentence.
    std::string out = dir / "refused.txt";
    int rc = kiln::testing::run(kiln::testing::kiln_binary() + " serve --host 0.0.0.0 --runs " +
                                (dir / "r0") + " >" + out + " 2>&1");
    EXPECT_NE(rc, 0);
    EXPECT_NE(fs::read_file(out).find("without a token"), std::string::npos) << fs::read_file(out);

    // A short token is refused too.
    rc = kiln::testing::run(kiln::testing::kiln_binary() + " serve --token abc --runs " +
                            (dir / "r0") + " >" + out + " 2>&1");
    EXPECT_NE(rc, 0);
    EXPECT_NE(fs::read_file(out).find("--token is 3 characters; a head's token needs at least 16"),
              std::string::npos)
        << fs::read_file(out);

    Server s(dir / "runs", {"--token", "s3cret-s3cret-s3cret"});
    auto none = s.client().Get("/api/jobs/");
    ASSERT_TRUE(none);
    EXPECT_EQ(none->status, 401);
    auto wrong = s.client("guess-guess-guess").Get("/metrics");
    ASSERT_TRUE(wrong);
    EXPECT_EQ(wrong->status, 403);
    auto right = s.client("s3cret-s3cret-s3cret").Get("/api/jobs/");
    ASSERT_TRUE(right);
    EXPECT_EQ(right->status, 200);
    // Never from the query string (it would land in logs and Referer headers).
    auto query = s.client().Get("/api/runs?token=s3cret-s3cret-s3cret");
    ASSERT_TRUE(query);
    EXPECT_EQ(query->status, 401);
    auto query_post = s.client().Post("/api/jobs/?token=s3cret-s3cret-s3cret", job(kMicro).dump(),
                                      "application/json");
    ASSERT_TRUE(query_post);
    EXPECT_EQ(query_post->status, 401);
    auto post = s.client().Post("/api/jobs/", job(kMicro).dump(), "application/json");
    ASSERT_TRUE(post);
    EXPECT_EQ(post->status, 401);
    // The client commands carry it from KILN_TOKEN.
    std::string status = dir / "status.txt";
    EXPECT_EQ(kiln::testing::run("KILN_TOKEN=s3cret-s3cret-s3cret " + kiln::testing::kiln_binary() +
                                 " status --address http://127.0.0.1:" + std::to_string(s.port) +
                                 " >" + status + " 2>&1"),
              0)
        << fs::read_file(status);
    EXPECT_NE(kiln::testing::run(kiln::testing::kiln_binary() +
                                 " status --address http://127.0.0.1:" + std::to_string(s.port) +
                                 " >" + status + " 2>&1"),
              0);
    EXPECT_NE(fs::read_file(status).find("needs a token"), std::string::npos)
        << fs::read_file(status);
}

TEST(Serve, ClientCommands) {
    TempDir dir;
    Server s(dir / "runs");
    std::string address = " --address http://127.0.0.1:" + std::to_string(s.port);
    std::string out = dir / "out.txt";
    std::string k = kiln::testing::kiln_binary();
    ASSERT_EQ(kiln::testing::run(k + " submit" + address + " -f -- " + kMicro +
                                 " --set train.steps=2 >" + out + " 2>&1"),
              0)
        << fs::read_file(out);
    std::string text = fs::read_file(out);
    EXPECT_EQ(text.rfind("job-0001\n", 0), 0u) << text;
    EXPECT_NE(text.find("SUCCEEDED"), std::string::npos) << text;
    ASSERT_EQ(kiln::testing::run(k + " status" + address + " >" + out + " 2>&1"), 0);
    EXPECT_NE(fs::read_file(out).find("job-0001"), std::string::npos);
    ASSERT_EQ(kiln::testing::run(k + " logs job-0001" + address + " >" + out + " 2>&1"), 0);
    EXPECT_NE(fs::read_file(out).find("step"), std::string::npos);
    EXPECT_NE(kiln::testing::run(k + " stop job-9999" + address + " >" + out + " 2>&1"), 0);
    EXPECT_NE(fs::read_file(out).find("no job named"), std::string::npos) << fs::read_file(out);
    EXPECT_NE(kiln::testing::run(k + " submit" + address + " -- rm -rf / >" + out + " 2>&1"), 0);
    EXPECT_NE(fs::read_file(out).find("not a kiln command"), std::string::npos);
    // runtime_env from the command line: variables and a folder inside the head's roots.
    EXPECT_NE(kiln::testing::run(k + " submit" + address + " --env LD_PRELOAD=/tmp/x.so -- " +
                                 kMicro + " >" + out + " 2>&1"),
              0);
    EXPECT_NE(fs::read_file(out).find("may not set LD_PRELOAD"), std::string::npos)
        << fs::read_file(out);
    ASSERT_EQ(kiln::testing::run(k + " submit" + address + " --id with-env --env COMPAT=1 " +
                                 "--working-dir " + s.runs + " -- " + kMicro +
                                 " --set train.steps=1 >" + out + " 2>&1"),
              0)
        << fs::read_file(out);
    json env = s.get("/api/jobs/with-env")["runtime_env"];
    EXPECT_EQ(env["env_vars"]["COMPAT"], "1") << env.dump();
    EXPECT_EQ(env["working_dir"], std::filesystem::canonical(s.runs).string()) << env.dump();
    s.wait("with-env");
    // No server there: one sentence naming the address.
    EXPECT_NE(kiln::testing::run(k + " status --address http://127.0.0.1:1 >" + out + " 2>&1"), 0);
    EXPECT_NE(fs::read_file(out).find("cannot reach the head node at http://127.0.0.1:1"),
              std::string::npos)
        << fs::read_file(out);
}

std::string find_chromium() {
    for (const char* p :
         {"/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"}) {
        if (::access(p, X_OK) == 0)
            return p;
    }
    return "";
}

// The dashboard in a real browser on a live run: the jobs table lists the job, the run page
// draws its charts. The screenshots are kept in the build folder (test-artifacts/).
TEST(Serve, DashboardRendersInHeadlessChromium) {
    std::string chromium = find_chromium();
    if (chromium.empty())
        GTEST_SKIP() << "no chromium (scripts/setup.sh installs it)";
    TempDir dir;
    Server s(dir / "runs");
    std::string id = s.submit(job(kMicro + " --set train.steps=100000"));
    for (int i = 0; i < 300 && s.lines(id) < 5; i++)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::string artifacts = KILN_ARTIFACT_DIR;
    std::filesystem::create_directories(artifacts);
    std::string url = "http://127.0.0.1:" + std::to_string(s.port) + "/";
    std::string browser = chromium + " --headless --no-sandbox --disable-gpu --no-first-run " +
                          "--user-data-dir=" + (dir / "profile") +
                          " --virtual-time-budget=6000 --window-size=1280,1400 ";
    auto dom = [&](const std::string& page, const std::string& shot) {
        std::string out = dir / "dom.html";
        int rc = kiln::testing::run(browser + "--screenshot=" + artifacts + "/" + shot + " '" +
                                    page + "' >/dev/null 2>&1");
        EXPECT_EQ(rc, 0);
        rc = kiln::testing::run(browser + "--dump-dom '" + page + "' >" + out + " 2>/dev/null");
        EXPECT_EQ(rc, 0);
        return fs::read_file(out);
    };
    std::string home = dom(url, "dashboard-jobs.png");
    EXPECT_NE(home.find("data-jobs=\"1\""), std::string::npos) << home.substr(0, 2000);
    EXPECT_NE(home.find(">" + id + "</a>"), std::string::npos);
    // The job's row shows its state as the page renders it (the stylesheet's ".RUNNING" and the
    // help text would match a bare "RUNNING").
    EXPECT_NE(home.find("<td class=\"state RUNNING\">RUNNING</td>"), std::string::npos)
        << home.substr(0, 4000);
    std::string run = dom(url + "#run=" + id, "dashboard-run.png");
    size_t at = run.find("data-chart-points=\"");
    ASSERT_NE(at, std::string::npos) << run.substr(0, 2000);
    EXPECT_GE(std::atoi(run.c_str() + at + 19), 5 * 5);  // five charts, five steps or more each
    EXPECT_NE(run.find("<canvas id=\"chart-4\""), std::string::npos);
    EXPECT_GT(std::filesystem::file_size(artifacts + "/dashboard-run.png"), 10000u);
}

// A run folder as a pipeline run leaves it: each rank's stage and wait reach the runs API and
// the dashboard, and the stage that waits least is named the slowest. Rank files from before
// pipeline parallelism still read (stage 0, no wait), and so does a pipeline run before its
// first step (no stage named yet).
TEST(Serve, PipelineStagesNameTheSlowest) {
    TempDir dir;
    Server s(dir / "runs");
    auto write_run = [&](const std::string& name, const std::vector<json>& ranks) {
        const std::string folder = s.runs + "/" + name;
        fs::make_dirs(folder + "/ranks");
        fs::write_file_replace(folder + "/status.json",
                               R"({"state":"finished","step":5,"steps":5})");
        for (const json& r : ranks) {
            json full = {{"dp_rank", 0},     {"tp_rank", 0},
                         {"step", 5},        {"pid", 1},
                         {"updated", 1.0e9}, {"rss_bytes", 1 << 20},
                         {"compute_s", 1.0}, {"peak_rss_bytes", 2 << 20}};
            full.update(r);
            fs::write_file_replace(
                folder + "/ranks/rank-" + std::to_string(r["rank"].get<int>()) + ".json",
                full.dump());
        }
    };
    // Three stages of two ranks: stage 1 waits least, so stages 0 and 2 wait for it.
    const double waits[6] = {0.30, 0.34, 0.01, 0.03, 0.20, 0.24};  // [rank]
    std::vector<json> pipe;
    for (int r = 0; r < 6; r++)
        pipe.push_back(
            {{"rank", r}, {"dp_rank", r % 2}, {"pp_rank", r / 2}, {"stage_wait_s", waits[r]}});
    write_run("pipe", pipe);
    json detail = s.get("/api/run?name=pipe");
    ASSERT_EQ(detail["ranks"].size(), 6u) << detail.dump();
    for (const json& r : detail["ranks"]) {
        const int rank = r["rank"];
        EXPECT_EQ(r["pp_rank"], rank / 2) << r.dump();
        EXPECT_DOUBLE_EQ(r["stage_wait_s"].get<double>(), waits[rank]) << r.dump();
    }
    ASSERT_EQ(detail["stages"].size(), 3u) << detail.dump();
    EXPECT_EQ(detail["stages"][2]["pp_rank"], 2);
    EXPECT_EQ(detail["stages"][2]["ranks"], 2);
    EXPECT_NEAR(detail["stages"][2]["stage_wait_s"].get<double>(), 0.22, 1e-12);
    EXPECT_NEAR(detail["stages"][2]["compute_s"].get<double>(), 1.0, 1e-12);
    const json slowest = detail["slowest_stage"];
    ASSERT_TRUE(slowest.is_object()) << detail.dump();
    EXPECT_EQ(slowest["pp_rank"], 1);
    EXPECT_NEAR(slowest["stage_wait_s"].get<double>(), 0.02, 1e-12);
    EXPECT_NEAR(slowest["neighbour_wait_s"].get<double>(), (0.32 + 0.22) / 2, 1e-12);

    // Before pipeline parallelism: no pp_rank, no stage_wait_s.
    write_run("old", {{{"rank", 0}}, {{"rank", 1}, {"dp_rank", 1}}});
    json old = s.get("/api/run?name=old");
    ASSERT_EQ(old["ranks"].size(), 2u) << old.dump();
    for (const json& r : old["ranks"]) {
        EXPECT_EQ(r["pp_rank"], 0) << r.dump();
        EXPECT_FALSE(r.contains("stage_wait_s")) << r.dump();
    }
    ASSERT_EQ(old["stages"].size(), 1u) << old.dump();
    EXPECT_EQ(old["stages"][0]["ranks"], 2);
    EXPECT_FALSE(old["stages"][0].contains("stage_wait_s")) << old.dump();
    EXPECT_TRUE(old["slowest_stage"].is_null()) << old.dump();

    // Two stages before their first step: nothing to compare yet.
    write_run("starting", {{{"rank", 0}, {"pp_rank", 0}}, {{"rank", 1}, {"pp_rank", 1}}});
    json starting = s.get("/api/run?name=starting");
    EXPECT_EQ(starting["stages"].size(), 2u) << starting.dump();
    EXPECT_TRUE(starting["slowest_stage"].is_null()) << starting.dump();

    // The dashboard shows each rank's stage and wait, and names the slowest stage.
    std::string chromium = find_chromium();
    if (chromium.empty())
        GTEST_SKIP() << "no chromium (scripts/setup.sh installs it)";
    auto dom = [&](const std::string& run) {
        std::string out = dir / "dom.html";
        EXPECT_EQ(kiln::testing::run(chromium + " --headless --no-sandbox --disable-gpu " +
                                     "--no-first-run --user-data-dir=" + (dir / "profile") +
                                     " --virtual-time-budget=3000 --dump-dom 'http://127.0.0.1:" +
                                     std::to_string(s.port) + "/#run=" + run + "' >" + out +
                                     " 2>/dev/null"),
                  0);
        return fs::read_file(out);
    };
    std::string page = dom("pipe");
    EXPECT_NE(page.find("slowest stage: 1 (its neighbours wait 0.270 s a step, it waits 0.020 s)"),
              std::string::npos)
        << page;
    // Rank 4: stage 2, 0.2 s of its 1 s waited.
    EXPECT_NE(page.find("<td>4</td><td>0, 0</td><td>2</td><td>5</td><td>1.000 s</td>"
                        "<td>0.200 s (20%)</td>"),
              std::string::npos)
        << page;
    page = dom("old");
    EXPECT_NE(page.find("<td>1</td><td>1, 0</td><td>0</td><td>5</td><td>1.000 s</td><td>-</td>"),
              std::string::npos)
        << page;
    EXPECT_NE(page.find("<p id=\"stage-line\" class=\"muted\" hidden"), std::string::npos) << page;
}

}  // namespace
}  // namespace kiln

namespace kiln {
namespace {

using json = nlohmann::json;

// The submission parser on random bodies: each is either a job or one kiln::Error, never a
// crash or another exception.
// A job's file arguments stay inside the runs folder and the data roots, however they are
// spelled: relative, with .., through a symlink, as --opt=value, as a --set key or a glob.
TEST(Sandbox, FileArgumentsStayInsideTheRoots) {
    TempDir dir;
    fs::make_dirs(dir / "runs");
    fs::make_dirs(dir / "data/books");
    std::filesystem::create_directory_symlink("/etc", dir / "data/etc");
    serve::Sandbox box = serve::Sandbox::of(dir / "runs", {dir / "data"});
    box.cwd = dir.path;
    auto refusal = [&](const std::string& line) {
        std::istringstream words(line);  // as an array entrypoint, which may hold globs
        std::vector<std::string> e{std::istream_iterator<std::string>(words), {}};
        return kiln::testing::message_of([&] { box.check(e); });
    };
    for (const char* fine : {
             "data --corpus data/books/*.txt builtin:stories:10 --out runs/tokens",
             "data --corpus=data/books --train-tokenizer 512 --out runs/t --threads 2",
             "tokenizer train --corpus builtin:stories:200 --out runs/x/tok.model",
             "train --set train.lr=1e-3 --set data.source=synthetic --set train.steps=5",
             "train --config runs/cfg.yaml --set data.source=data/books",
             "eval --checkpoint runs/job-0001 --data data/books",
             "data verify data/books",
             "plan --cluster 2x8-a100 --model llama2-7b",
         })
        EXPECT_EQ(refusal(fine), "") << fine;
    const std::pair<std::string, std::string> refused[] = {
        {"tokenizer train --corpus builtin:stories:200 --out /root/.bashrc",
         "--out \"/root/.bashrc\""},
        {"data --corpus data/books /etc/passwd --out runs/t", "--corpus \"/etc/passwd\""},
        {"data --corpus /etc/*.conf --out runs/t", "--corpus \"/etc/*.conf\""},
        {"export --checkpoint runs/x --out=/usr/local/bin/kiln", "--out \"/usr/local/bin/kiln\""},
        {"data --corpus builtin:stories --out runs/../elsewhere",
         "resolves to " + dir.path + "/elsewhere"},
        {"data --corpus data/etc/passwd --out runs/t", "resolves to /etc/passwd"},
        {"train --set train.plan_cache=/root/.cache", "--set train.plan_cache"},
        {"train --set data.tokenizer=/home/x/tok.model --set train.steps=1",
         "--set data.tokenizer"},
        {"data verify /etc", "the folder of data verify"},
        {"train --config /etc/kiln.yaml", "--config \"/etc/kiln.yaml\""},
        {"plan --cluster /etc/cluster.yaml", "--cluster"},
    };
    for (const auto& [line, named] : refused) {
        std::string why = refusal(line);
        EXPECT_NE(why.find(named), std::string::npos) << line << ": " << why;
        EXPECT_NE(why.find("outside the runs folder"), std::string::npos) << why;
    }
}

// Where the kernel has Landlock, a job cannot write outside the roots even when a config file
// (which the head does not read) names a folder elsewhere.
TEST(Sandbox, TheKernelFencesAJobsWrites) {
    TempDir dir;
    if (!serve::WriteFence(serve::Sandbox::of(dir.path, {})).available())
        GTEST_SKIP() << "no Landlock here: "
                     << serve::WriteFence(serve::Sandbox::of(dir.path, {})).why();
    // Outside every root and outside /tmp, /var/tmp and /dev/shm, which jobs may write.
    const std::string outside =
        std::string(KILN_ARTIFACT_DIR) + "/fence-" + std::to_string(::getpid());
    for (const char* scratch : {"/tmp/", "/var/tmp/", "/dev/shm/"})
        if (outside.rfind(scratch, 0) == 0)
            GTEST_SKIP() << "the build folder is under " << scratch
                         << ", which jobs may write: no folder outside the fence to try";
    std::filesystem::remove_all(outside);
    Server s(dir / "runs");
    fs::write_file_replace(s.runs + "/cfg.yaml",
                           "train:\n  autotune: true\n  plan_cache: " + outside + "/plans\n");
    auto r = s.client().Post(
        "/api/jobs/", job(kMicro + " --set train.steps=1 --config " + s.runs + "/cfg.yaml").dump(),
        "application/json");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    std::string id = json::parse(r->body)["job_id"];
    json done = s.wait(id);
    EXPECT_EQ(done["status"], "SUCCEEDED") << done.dump();
    EXPECT_FALSE(std::filesystem::exists(outside + "/plans")) << "the job wrote outside its roots";
    std::string log = s.get("/api/jobs/" + id + "/logs")["logs"];
    EXPECT_NE(log.find("plan cache not written"), std::string::npos) << log;
    std::filesystem::remove_all(outside);

    // The arguments the head can see are refused before anything runs.
    auto bad = s.client().Post(
        "/api/jobs/",
        job("kiln tokenizer train --corpus builtin:stories:100 --out " + outside + "/t.model")
            .dump(),
        "application/json");
    ASSERT_TRUE(bad);
    EXPECT_EQ(bad->status, 400);
    EXPECT_NE(bad->body.find("--out"), std::string::npos) << bad->body;
}

TEST(JobSpec, RandomBodiesAreAJobOrOneError) {
    std::mt19937 rng(7);
    const std::vector<std::string> keys = {"entrypoint",
                                           "ranks",
                                           "entrypoint_num_cpus",
                                           "entrypoint_num_gpus",
                                           "priority",
                                           "max_failures",
                                           "submission_id",
                                           "metadata",
                                           "colour",
                                           ""};
    auto value = [&](int depth) -> json {
        switch (rng() % 8) {
            case 0:
                return json(int64_t(rng()) - int64_t(1u << 31));
            case 1:
                return json("kiln train --set train.steps=" + std::to_string(rng() % 100));
            case 2:
                return json(std::string(rng() % 5, char('!' + rng() % 90)));
            case 3:
                return json::array({"kiln", "train", std::to_string(rng())});
            case 4:
                return json(rng() % 2 == 0);
            case 5:
                return json(nullptr);
            case 6:
                return json(double(rng()) / 7.0);
            default:
                return depth > 0 ? json::object({{"k", "v"}}) : json::array();
        }
    };
    int jobs = 0, errors = 0;
    for (int i = 0; i < 5000; i++) {
        json body = json::object();
        for (int k = 0, n = int(rng() % 6); k < n; k++)
            body[keys[rng() % keys.size()]] = value(1);
        if (rng() % 3 == 0)
            body["entrypoint"] = "kiln train";
        try {
            serve::JobSpec s = serve::parse_spec(body);
            EXPECT_FALSE(s.entrypoint.empty());
            EXPECT_GE(s.ranks, 1);
            jobs++;
        } catch (const Error&) {
            errors++;
        }
    }
    EXPECT_GT(jobs, 0);
    EXPECT_GT(errors, 0);
}

}  // namespace
}  // namespace kiln

namespace kiln {
namespace {

using json = nlohmann::json;
using kiln::testing::TempDir;

// ---- Ray's job client against kiln serve, replayed byte for byte over real HTTP.
//
// Ray cannot be installed here, so the requests its client makes are written out from Ray's
// source (github.com/ray-project/ray, python/ray/dashboard/modules/, read at master in 2026: the
// 2.x jobs API, level "4"/"5" of version.py):
//   - dashboard_sdk.py SubmissionClient._check_connection_and_version_with_url: GET
//     /api/version, then r.json()["ray_version"] compared with a minimum (1.9 and 2.0 in
//     JobSubmissionClient.__init__, 2.2 in submit_job when entrypoint_num_cpus/gpus are given,
//     2.8 for entrypoint_memory); get_version parses "version" with int() (job/cli.py submit).
//   - SubmissionClient._do_request: one requests.request() per call, so one connection each,
//     with requests' default headers (User-Agent python-requests/2.31.0, Accept-Encoding
//     "gzip, deflate", Accept */*, Connection keep-alive), json= bodies as json.dumps writes them
//     (", " and ": " separators, Content-Type application/json); POST and DELETE without a
//     body carry Content-Length: 0.
//   - job/common.py JobSubmitRequest (field order of dataclasses.asdict: entrypoint,
//     submission_id, job_id, runtime_env, metadata, entrypoint_num_cpus, entrypoint_num_gpus,
//     entrypoint_memory, entrypoint_resources). Ray 2.x clients send every field, null where
//     unset; newer ones strip the nulls (job/utils.py strip_keys_with_value_none). Both are
//     replayed. The CLI sends entrypoint_num_cpus as a float (click type=float) and the
//     entrypoint as shlex.join(argv).
//   - job/common.py JobSubmitResponse, JobStopResponse, JobDeleteResponse, JobLogsResponse are
//     dataclasses built with **r.json(): their answers must hold exactly their keys.
//   - job/pydantic_models.py JobDetails (get_job_info, list_jobs): type "SUBMISSION", status one
//     of JobStatus, start_time/end_time Optional[int] in unix milliseconds, driver_exit_code
//     Optional[int], metadata Dict[str, str], runtime_env dict; unknown keys are ignored.
//   - job/sdk.py tail_job_logs: aiohttp ws_connect to /api/jobs/ID/logs/tail (aiohttp 3.9
//     defaults: Upgrade, Connection, Sec-WebSocket-Version 13, a random Sec-WebSocket-Key,
//     permessage-deflate offered); TEXT frames are log text, and a close with a code other than
//     1006 ends the tail without an error.
//   - job/cli.py: `ray job submit` = version x3, POST, version, tail, GET job; `status` =
//     version x2, GET job; `logs` = version x2, GET logs; `list` = version x2, GET jobs;
//     `stop` = version x2, POST stop, GET job until terminal; `delete` = version x2, DELETE.
namespace ray {

struct Answer {
    int status = 0;
    std::map<std::string, std::string> headers;  // names lower-cased
    std::string body;                            // decoded when gzip
    json j() const { return json::parse(body, nullptr, false); }
};

// One request on its own connection, as requests sends it; the answer read to its end.
Answer round_trip(int port, const std::string& request) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(uint16_t(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    Answer out;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        ::send(fd, request.data(), request.size(), MSG_NOSIGNAL) != ssize_t(request.size())) {
        ::close(fd);
        ADD_FAILURE() << "cannot send to the head";
        return out;
    }
    std::string raw;
    char buf[65536];
    size_t head_end = std::string::npos, length = 0;
    for (;;) {
        ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n <= 0)
            break;
        raw.append(buf, size_t(n));
        if (head_end == std::string::npos &&
            (head_end = raw.find("\r\n\r\n")) != std::string::npos) {
            std::istringstream lines(raw.substr(0, head_end));
            std::string line;
            std::getline(lines, line);
            out.status = std::atoi(line.substr(9, 3).c_str());
            while (std::getline(lines, line)) {
                if (!line.empty() && line.back() == '\r')
                    line.pop_back();
                size_t colon = line.find(':');
                std::string name = line.substr(0, colon);
                for (char& c : name)
                    c = char(std::tolower(static_cast<unsigned char>(c)));
                out.headers[name] = line.substr(colon + 2);
            }
            length = size_t(std::atoll(out.headers["content-length"].c_str()));
        }
        if (head_end != std::string::npos && out.status != 101 &&
            raw.size() >= head_end + 4 + length)
            break;
    }
    ::close(fd);
    if (head_end == std::string::npos) {
        ADD_FAILURE() << "no answer: " << raw;
        return out;
    }
    out.body = raw.substr(head_end + 4);
    if (out.headers["content-encoding"] == "gzip") {
        std::string plain;
        httplib::detail::gzip_decompressor gz;
        gz.decompress(out.body.data(), out.body.size(), [&](const char* d, size_t n) {
            plain.append(d, n);
            return true;
        });
        out.body = plain;
    }
    return out;
}

std::string head(const std::string& method, const std::string& path, int port) {
    return method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(port) +
           "\r\nUser-Agent: python-requests/2.31.0\r\nAccept-Encoding: gzip, deflate\r\n"
           "Accept: */*\r\nConnection: keep-alive\r\n";
}
Answer get(int port, const std::string& path) {
    return round_trip(port, head("GET", path, port) + "\r\n");
}
Answer bodiless(int port, const std::string& method, const std::string& path) {
    return round_trip(port, head(method, path, port) + "Content-Length: 0\r\n\r\n");
}
Answer post(int port, const std::string& path, const std::string& body) {
    return round_trip(port, head("POST", path, port) +
                                "Content-Length: " + std::to_string(body.size()) +
                                "\r\nContent-Type: application/json\r\n\r\n" + body);
}

// JSON as Python's json.dumps writes it (", " and ": "), for bodies written out below.
std::string dumps(const json& j) {
    if (j.is_object()) {
        std::string s = "{";
        for (auto it = j.begin(); it != j.end(); ++it)
            s += (it == j.begin() ? "" : ", ") + json(it.key()).dump() + ": " + dumps(it.value());
        return s + "}";
    }
    return j.dump();
}

// _check_connection_and_version_with_url: 200, ray_version at least `min`, and (cli.py)
// int(version) > 0.
void version_check(int port, int min_minor) {
    Answer a = get(port, "/api/version");
    ASSERT_EQ(a.status, 200) << a.body;
    json v = a.j();
    ASSERT_TRUE(v["ray_version"].is_string()) << a.body;
    int major = 0, minor = 0;
    std::sscanf(v["ray_version"].get<std::string>().c_str(), "%d.%d", &major, &minor);
    EXPECT_TRUE(major == 2 && minor >= min_minor) << a.body;  // below 3.0: retry_policy is refused
    ASSERT_TRUE(v["version"].is_string()) << a.body;
    EXPECT_GT(std::stoi(v["version"].get<std::string>()), 0);
    for (const char* key : {"ray_commit", "session_name"})
        EXPECT_TRUE(v[key].is_string()) << key;
}

std::set<std::string> keys(const json& j) {
    std::set<std::string> k;
    for (const auto& [key, value] : j.items())
        k.insert(key);
    return k;
}

bool null_or(const json& v, bool (json::*is)() const noexcept) {
    return v.is_null() || (v.*is)();
}

// JobDetails(**json), field by field, as pydantic would validate it.
void expect_job_details(const json& j, double now_s) {
    ASSERT_TRUE(j.is_object());
    EXPECT_EQ(j["type"], "SUBMISSION");
    EXPECT_TRUE(null_or(j["job_id"], &json::is_string));
    EXPECT_TRUE(j["submission_id"].is_string());
    EXPECT_TRUE(j["driver_info"].is_null() || j["driver_info"].is_object());
    const std::set<std::string> states = {"PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"};
    EXPECT_TRUE(states.count(j["status"].get<std::string>())) << j["status"];
    EXPECT_TRUE(j["entrypoint"].is_string());
    for (const char* key : {"message", "error_type", "driver_agent_http_address", "driver_node_id"})
        EXPECT_TRUE(null_or(j[key], &json::is_string)) << key << ": " << j[key];
    for (const char* key : {"start_time", "end_time", "driver_exit_code"})
        EXPECT_TRUE(null_or(j[key], &json::is_number_integer)) << key << ": " << j[key];
    // Milliseconds, not seconds: within the last hour of this clock.
    for (const char* key : {"start_time", "end_time"}) {
        if (j[key].is_number_integer()) {
            double s = double(j[key].get<int64_t>()) / 1000;
            EXPECT_GT(s, now_s - 3600) << key;
            EXPECT_LT(s, now_s + 60) << key;
        }
    }
    EXPECT_TRUE(j["metadata"].is_object());
    for (const auto& [k, v] : j["metadata"].items())
        EXPECT_TRUE(v.is_string()) << k;
    EXPECT_TRUE(null_or(j["runtime_env"], &json::is_object));
}

struct Frames {
    int status = 0;
    std::map<std::string, std::string> headers;
    std::string text;
    int close_code = -1;
    bool masked = false;
};

// aiohttp's ws_connect, then every frame until the server closes.
Frames tail(int port, const std::string& id, const std::string& key) {
    std::string request = "GET /api/jobs/" + id +
                          "/logs/tail HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(port) +
                          "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " +
                          key +
                          "\r\nSec-WebSocket-Extensions: permessage-deflate; "
                          "client_max_window_bits\r\nAccept: */*\r\nAccept-Encoding: gzip, "
                          "deflate\r\nUser-Agent: Python/3.11 aiohttp/3.9.5\r\n\r\n";
    Answer a = round_trip(port, request);
    Frames f;
    f.status = a.status;
    f.headers = a.headers;
    const std::string& b = a.body;
    size_t i = 0;
    while (i + 2 <= b.size()) {
        const int opcode = b[i] & 0x0f;
        f.masked = f.masked || (b[i + 1] & 0x80);
        uint64_t n = uint8_t(b[i + 1]) & 0x7f;
        i += 2;
        int extra = n == 126 ? 2 : n == 127 ? 8 : 0;
        if (extra) {
            n = 0;
            for (int k = 0; k < extra; k++)
                n = n << 8 | uint8_t(b[i + size_t(k)]);
            i += size_t(extra);
        }
        std::string payload = b.substr(i, size_t(n));
        i += size_t(n);
        if (opcode == 1) {
            f.text += payload;
        } else if (opcode == 8 && payload.size() >= 2) {
            f.close_code = uint8_t(payload[0]) << 8 | uint8_t(payload[1]);
        }
    }
    return f;
}

bool valid_utf8(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
        auto c = static_cast<unsigned char>(s[i]);
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (len == 0 || i + len > s.size())
            return false;
        for (size_t k = 1; k < len; k++)
            if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80)
                return false;
        i += len;
    }
    return true;
}

}  // namespace ray

TEST(RayClient, EveryCallOfRaysJobClientIsAnsweredAsItExpects) {
    TempDir dir;
    fs::make_dirs(dir / "data/work");
    Server s(dir / "runs", {"--data-root", dir / "data"});
    const int port = s.port;
    const double now = unix_seconds();

    // `ray job submit --submission-id ray-1 --entrypoint-num-cpus 1 -- kiln train ...`, from a
    // Ray 2.x client: every JobSubmitRequest field, the unset ones null.
    ray::version_check(port, 0);  // JobSubmissionClient.__init__: at least 1.9, then 2.0
    ray::version_check(port, 0);
    ray::version_check(port, 2);  // submit_job with entrypoint_num_cpus: at least 2.2
    const std::string entrypoint = kMicro + " --set train.steps=3";
    std::string body = "{\"entrypoint\": " + json(entrypoint).dump() +
                       ", \"submission_id\": \"ray-1\", \"job_id\": null, \"runtime_env\": {}, "
                       "\"metadata\": {}, \"entrypoint_num_cpus\": 1.0, \"entrypoint_num_gpus\": "
                       "null, \"entrypoint_memory\": null, \"entrypoint_resources\": null}";
    ray::Answer a = ray::post(port, "/api/jobs/", body);
    ASSERT_EQ(a.status, 200) << a.body;
    EXPECT_EQ(ray::keys(a.j()), (std::set<std::string>{"job_id", "submission_id"})) << a.body;
    EXPECT_EQ(a.j()["submission_id"], "ray-1");
    ray::version_check(port, 0);
    // tail_job_logs: the RFC 6455 handshake (the key and answer of RFC 6455 section 1.3), text
    // frames of valid UTF-8, then a normal close when the job ends.
    ray::Frames f = ray::tail(port, "ray-1", "dGhlIHNhbXBsZSBub25jZQ==");
    EXPECT_EQ(f.status, 101);
    EXPECT_EQ(f.headers["upgrade"], "websocket");
    EXPECT_EQ(f.headers["connection"], "Upgrade");
    EXPECT_EQ(f.headers["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    EXPECT_EQ(f.headers.count("sec-websocket-extensions"), 0u);  // no compression agreed
    EXPECT_FALSE(f.masked);
    EXPECT_EQ(f.close_code, 1000);
    EXPECT_TRUE(ray::valid_utf8(f.text));
    EXPECT_NE(f.text.find("step"), std::string::npos) << f.text;
    a = ray::get(port, "/api/jobs/ray-1");
    ASSERT_EQ(a.status, 200) << a.body;
    ray::expect_job_details(a.j(), now);
    EXPECT_EQ(a.j()["status"], "SUCCEEDED") << a.body;
    EXPECT_EQ(a.j()["driver_exit_code"], 0);
    EXPECT_EQ(a.j()["entrypoint"], entrypoint);

    // `ray job status`, `ray job logs`, `ray job list`.
    ray::version_check(port, 0);
    a = ray::get(port, "/api/jobs/ray-1");
    ray::expect_job_details(a.j(), now);
    a = ray::get(port, "/api/jobs/ray-1/logs");
    ASSERT_EQ(a.status, 200);
    EXPECT_EQ(ray::keys(a.j()), (std::set<std::string>{"logs"}));
    EXPECT_NE(a.j()["logs"].get<std::string>().find("step"), std::string::npos);
    a = ray::get(port, "/api/jobs/");
    ASSERT_EQ(a.status, 200);
    ASSERT_TRUE(a.j().is_array());
    for (const json& j : a.j())
        ray::expect_job_details(j, now);

    // A newer client strips the nulls. runtime_env: env_vars for every rank, working_dir a
    // folder inside a root; the job runs there with them. Then `ray job stop` and `delete`.
    json newer = {
        {"entrypoint", kMicro + " --set train.steps=100000"},
        {"submission_id", "ray-2"},
        {"runtime_env",
         {{"env_vars", {{"COMPAT_MARK", "from-ray"}}}, {"working_dir", dir / "data/work"}}},
        {"metadata", {{"owner", "ray"}}},
        {"entrypoint_num_cpus", 1},
        {"entrypoint_memory", int64_t(8) << 30}};
    ray::version_check(port, 8);  // entrypoint_memory needs 2.8
    a = ray::post(port, "/api/jobs/", ray::dumps(newer));
    ASSERT_EQ(a.status, 200) << a.body;
    json running = s.wait("ray-2", "RUNNING");
    const std::string proc = "/proc/" + std::to_string(running["pid"].get<int>());
    // RUNNING comes at fork; the environment and folder are the job's once it has exec'd.
    std::string environ_text;
    for (int i = 0; i < 100 && environ_text.find("\nCOMPAT_MARK=from-ray\n") == std::string::npos;
         i++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        std::ifstream environ_file(proc + "/environ");
        environ_text = "\n" + std::string(std::istreambuf_iterator<char>(environ_file), {});
        std::replace(environ_text.begin(), environ_text.end(), '\0', '\n');
    }
    EXPECT_NE(environ_text.find("\nCOMPAT_MARK=from-ray\n"), std::string::npos);
    EXPECT_EQ(std::filesystem::read_symlink(proc + "/cwd"),
              std::filesystem::canonical(dir / "data/work"));
    a = ray::get(port, "/api/jobs/ray-2");
    ray::expect_job_details(a.j(), now);
    EXPECT_EQ(a.j()["runtime_env"]["env_vars"]["COMPAT_MARK"], "from-ray");
    EXPECT_EQ(a.j()["entrypoint_memory"], int64_t(8) << 30);
    EXPECT_TRUE(a.j()["end_time"].is_null());
    EXPECT_TRUE(a.j()["driver_exit_code"].is_null());
    ray::version_check(port, 0);
    a = ray::bodiless(port, "POST", "/api/jobs/ray-2/stop");
    ASSERT_EQ(a.status, 200) << a.body;
    EXPECT_EQ(a.j(), (json{{"stopped", true}}));
    json stopped = s.wait("ray-2");
    EXPECT_EQ(stopped["status"], "STOPPED");
    ray::expect_job_details(stopped, now);
    EXPECT_TRUE(stopped["end_time"].is_number_integer());
    a = ray::bodiless(port, "DELETE", "/api/jobs/ray-2");
    ASSERT_EQ(a.status, 200) << a.body;
    EXPECT_EQ(a.j(), (json{{"deleted", true}}));
    EXPECT_EQ(ray::get(port, "/api/jobs/ray-2").status, 404);

    // entrypoint_memory is the per-rank limit the job checks its memory plan against.
    json tight = {{"entrypoint", kMicro + " --set train.steps=3"}, {"entrypoint_memory", 1 << 20}};
    a = ray::post(port, "/api/jobs/", ray::dumps(tight));
    ASSERT_EQ(a.status, 200) << a.body;
    json failed = s.wait(a.j()["job_id"].get<std::string>());
    EXPECT_EQ(failed["status"], "FAILED");
    std::string log =
        ray::get(port, "/api/jobs/" + failed["job_id"].get<std::string>() + "/logs").j()["logs"];
    EXPECT_NE(log.find("(train.memory_limit_gb)"), std::string::npos) << log;
    // Ray's CLI prints the message of a failed job: it is the rank's reason, not the launcher's.
    EXPECT_NE(failed["message"].get<std::string>().find("(train.memory_limit_gb)"),
              std::string::npos)
        << failed["message"];

    // What kiln cannot honour is refused in one sentence naming it, never ignored.
    auto refusal = [&](const json& patch) {
        json b = {{"entrypoint", "kiln train --set train.steps=1"},
                  {"submission_id", nullptr},
                  {"runtime_env", json::object()}};
        b.update(patch);
        ray::Answer r = ray::post(port, "/api/jobs/", ray::dumps(b));
        EXPECT_EQ(r.status, 400) << patch.dump() << ": " << r.body;
        return r.j().value("error", "");
    };
    const std::pair<json, std::string> refused[] = {
        {{{"runtime_env", {{"pip", {"torch"}}}}}, "runtime_env.pip is not supported"},
        {{{"runtime_env", {{"conda", "env"}}}}, "runtime_env.conda is not supported"},
        {{{"runtime_env", {{"container", {{"image", "x"}}}}}}, "runtime_env.container"},
        {{{"runtime_env", {{"working_dir", "gcs://_ray_pkg_0123.zip"}}}}, "package URI"},
        {{{"runtime_env", {{"working_dir", "/"}}}}, "outside the runs folder"},
        {{{"runtime_env", {{"env_vars", {{"LD_PRELOAD", "/tmp/x.so"}}}}}},
         "may not set LD_PRELOAD"},
        {{{"runtime_env", {{"env_vars", {{"PATH", "/tmp"}}}}}}, "may not set PATH"},
        {{{"runtime_env", {{"env_vars", {{"RANK", "3"}}}}}}, "may not set RANK"},
        {{{"runtime_env", {{"env_vars", {{"KILN_JOB_ID", "x"}}}}}}, "may not set KILN_JOB_ID"},
        {{{"runtime_env", {{"env_vars", {{"A=B", "x"}}}}}}, "is not a variable name"},
        {{{"runtime_env", {{"env_vars", {{"A", 1}}}}}}, "must be a string"},
        {{{"entrypoint", "python train.py --epochs 3"}}, "not a kiln command"},
        {{{"entrypoint_num_gpus", 0.5}}, "whole number"},
        {{{"entrypoint_resources", {{"TPU", 1}}}}, "custom resources"},
        {{{"entrypoint_label_selector", {{"zone", "a"}}}}, "no node labels"},
        {{{"retry_policy", {{"max_retries", 3}}}}, "max_failures"},
        {{{"entrypoint", "kiln data --corpus builtin:stories --out x"},
          {"entrypoint_memory", 1 << 30}},
         "no memory plan"},
    };
    for (const auto& [patch, words] : refused) {
        std::string why = refusal(patch);
        EXPECT_NE(why.find(words), std::string::npos) << patch.dump() << ": " << why;
    }
    // A local working_dir is uploaded by Ray's client before it submits: refused at the first
    // call, before anything is uploaded.
    a = ray::get(port, "/api/packages/gcs/_ray_pkg_0123.zip");
    EXPECT_EQ(a.status, 501);
    EXPECT_NE(a.body.find("no uploaded packages"), std::string::npos) << a.body;
    // An unknown job, as Ray's client sees it.
    EXPECT_EQ(ray::get(port, "/api/jobs/nope").status, 404);

    // A head with a token: Ray's client sends it as a header (JobSubmissionClient(headers=...)
    // or RAY_JOB_HEADERS), on the WebSocket upgrade too.
    const std::string token = "0123456789abcdef0123";
    Server guarded(dir / "guarded", {"--token", token});
    EXPECT_EQ(ray::tail(guarded.port, "nope", "dGhlIHNhbXBsZSBub25jZQ==").status, 401);
    std::string upgrade =
        "GET /api/jobs/nope/logs/tail HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(guarded.port) +
        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer " +
        token + "\r\n\r\n";
    EXPECT_EQ(ray::round_trip(guarded.port, upgrade).status, 404);  // past the token check
}

}  // namespace
}  // namespace kiln
