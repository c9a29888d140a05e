// kiln serve over real HTTP, against a real server process: the jobs API, gang admission,
// a head restart, bad input, and the dashboard rendered by headless Chromium.
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
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

    // A 100 MB body is turned away without being read.
    std::string huge(100u << 20, 'x');
    auto r = s.client().Post("/api/jobs/", huge, "application/json");
    ASSERT_TRUE(r) << httplib::to_string(r.error());
    EXPECT_EQ(r->status, 413);
    EXPECT_NE(r->body.find("over the 1048576 byte limit"), std::string::npos) << r->body;
    // The server is still up and answering.
    EXPECT_EQ(get("/healthz").first, 200);
    EXPECT_EQ(s.get("/api/jobs/").size(), 3u);  // the three accepted above
}

// A web page on another site can make a browser send simple requests to a loopback head (a POST
// of text/plain, a form) and, with DNS rebinding, read the answers. The head answers only its own
// Host and Origin, takes bodies only as JSON with a length, and answers no CORS preflight; the
// refusals come before the body is read.
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
    if (chunked)
        EXPECT_EQ(chunked->status, 411) << chunked->body;
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
    // Outside every root and outside /tmp, which jobs may write.
    const std::string outside =
        std::string(KILN_ARTIFACT_DIR) + "/fence-" + std::to_string(::getpid());
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
