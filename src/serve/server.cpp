#include "serve/server.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "serve/assets.h"
#include "serve/runs.h"

namespace kiln::serve {
namespace {

using json = nlohmann::json;

constexpr int kMaxFollowers = 8;  // of the 32 server threads

void reply(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(body.dump() + "\n", "application/json");
}

void fail(httplib::Response& res, int status, const std::string& message) {
    reply(res, status, json{{"error", message}});
}

bool same(const std::string& a, const std::string& b) {  // constant time in the content
    unsigned diff = a.size() != b.size();
    for (size_t i = 0; i < a.size() && i < b.size(); i++)
        diff |= unsigned(a[i] ^ b[i]);
    return diff == 0;
}

int64_t int_param(const httplib::Request& req, const char* key, int64_t fallback) {
    if (!req.has_param(key))
        return fallback;
    std::string v = req.get_param_value(key);
    char* end = nullptr;
    long long x = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0')
        throw error("query parameter {}={} is not an integer", key, v.substr(0, 40));
    return x;
}

// Prometheus text: one gauge family at a time.
struct Exposition {
    std::string text;
    void family(const char* name, const char* help) {
        text += fmt::format("# HELP {} {}\n# TYPE {} gauge\n", name, help, name);
    }
    void sample(const char* name, const std::string& labels, double value) {
        text += labels.empty() ? fmt::format("{} {}\n", name, value)
                               : fmt::format("{}{{{}}} {}\n", name, labels, value);
    }
};

std::string prometheus(Queue& queue, Runs& runs) {
    Exposition e;
    std::map<std::string, int> by_state;
    for (State s :
         {State::pending, State::running, State::stopped, State::succeeded, State::failed})
        by_state[state_name(s)] = 0;
    for (const Job& j : queue.list())
        by_state[state_name(j.state)]++;
    e.family("kiln_jobs", "Jobs known to the head node, by state.");
    for (const auto& [state, n] : by_state)
        e.sample("kiln_jobs", fmt::format("state=\"{}\"", state), n);
    Capacity cap = queue.capacity(), used = queue.used();
    e.family("kiln_capacity_cpus", "CPU slots the queue hands out.");
    e.sample("kiln_capacity_cpus", "", cap.cpus);
    e.family("kiln_capacity_used_cpus", "CPU slots held by running jobs.");
    e.sample("kiln_capacity_used_cpus", "", used.cpus);
    e.family("kiln_capacity_gpus", "GPUs the queue hands out.");
    e.sample("kiln_capacity_gpus", "", cap.gpus);
    e.family("kiln_capacity_used_gpus", "GPUs held by running jobs.");
    e.sample("kiln_capacity_used_gpus", "", used.gpus);

    struct Series {
        const char* name;
        const char* key;
        const char* help;
        bool from_status;
    };
    const Series series[] = {
        {"kiln_train_step", "step", "Optimizer steps completed.", false},
        {"kiln_train_loss", "loss", "Training loss of the newest step.", false},
        {"kiln_train_learning_rate", "lr", "Learning rate of the newest step.", false},
        {"kiln_train_grad_norm", "grad_norm", "Gradient norm before clipping.", false},
        {"kiln_train_tokens_per_second", "tokens_per_s", "Training throughput.", false},
        {"kiln_train_mfu", "mfu", "Model FLOPs utilisation (0-1) against the measured peak.",
         false},
        {"kiln_train_tokens", "tokens", "Tokens trained on so far.", false},
        {"kiln_train_restarts", "restarts", "Gang restarts of the run so far.", true},
    };
    std::vector<RunSummary> list = runs.list();
    for (const Series& s : series) {
        e.family(s.name, s.help);
        for (const RunSummary& r : list) {
            const json& src = s.from_status ? r.status : r.last;
            if (src.contains(s.key) && src[s.key].is_number())
                e.sample(s.name, fmt::format("run=\"{}\"", r.name), src[s.key].get<double>());
        }
    }
    e.family("kiln_train_running", "1 while the run's status says running.");
    for (const RunSummary& r : list)
        e.sample("kiln_train_running", fmt::format("run=\"{}\"", r.name),
                 r.status.value("state", "") == "running" ? 1 : 0);
    return e.text;
}

// The host part of a Host header value: "127.0.0.1:8265" -> "127.0.0.1", "[::1]:80" -> "::1".
std::string host_of(const std::string& value) {
    if (!value.empty() && value.front() == '[') {
        size_t close = value.find(']');
        return close == std::string::npos ? value : value.substr(1, close - 1);
    }
    return value.substr(0, value.find(':'));
}

// Why a request is refused before routing, or "" when it may go on. A browser on any other
// site can send simple requests (a POST of text/plain or a form) to a loopback head, and with
// DNS rebinding read the answers: the head answers only to its own Host and Origin, takes
// request bodies only as JSON with a length, and answers no CORS preflight.
std::string refused(const httplib::Request& req, bool loopback_head, int* status) {
    *status = 403;
    const std::string host = req.get_header_value("Host");
    if (loopback_head && !loopback(host_of(host)))
        return fmt::format(
            "Host \"{}\" is not this head's: a head on a loopback address answers only to "
            "localhost, 127.x.x.x or [::1]",
            host.substr(0, 200));
    if (req.method == "OPTIONS")
        return "cross-origin requests are not allowed (no CORS)";
    const std::string origin = req.get_header_value("Origin");
    if (!origin.empty() && origin != "http://" + host)
        return fmt::format(
            "Origin \"{}\" is not this head's (http://{}): cross-origin requests "
            "are not allowed",
            origin.substr(0, 200), host.substr(0, 200));
    if (req.get_header_value("Sec-Fetch-Site") == "cross-site")
        return "cross-site requests are not allowed";
    if (req.has_header("Transfer-Encoding")) {
        *status = 411;
        return "a request body needs a Content-Length (chunked bodies are not taken)";
    }
    const bool body = req.get_header_value_count("Content-Length") > 0 &&
                      req.get_header_value("Content-Length") != "0";
    const std::string type = req.get_header_value("Content-Type");
    if (body && type.rfind("application/json", 0) != 0) {
        *status = 415;
        return fmt::format("a request body must be Content-Type: application/json, not \"{}\"",
                           type.substr(0, 100));
    }
    return "";
}

}  // namespace

bool loopback(const std::string& host) {
    if (host == "localhost" || host == "::1")
        return true;
    in_addr a{};
    return ::inet_pton(AF_INET, host.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

int serve(const ServeOptions& o) {
    if (!loopback(o.host) && o.token.empty())
        throw error(
            "refusing to serve on {} without a token: anyone who reaches it could run jobs; set "
            "--token (or KILN_TOKEN), or bind 127.0.0.1",
            o.host);
    if (!o.token.empty() && o.token.size() < kMinTokenLength)
        throw error(
            "--token is {} characters; a head's token needs at least {} (e.g. openssl rand -hex "
            "16)",
            o.token.size(), kMinTokenLength);
    if (o.capacity.cpus < 1 || o.capacity.gpus < 0)
        throw error("--cpus must be at least 1 and --gpus at least 0");

    // SIGINT/SIGTERM are taken by one thread (sigwait), so every other thread, and the jobs'
    // processes until they unblock them, never see them asynchronously.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
    ::signal(SIGPIPE, SIG_IGN);

    Runs runs(o.runs);
    Queue queue({o.runs, o.data_roots, o.capacity, o.kiln});
    httplib::Server svr;
    svr.new_task_queue = [] { return new httplib::ThreadPool(32); };
    svr.set_payload_max_length(o.max_body);
    svr.set_keep_alive_max_count(10000);
    svr.set_tcp_nodelay(true);  // headers and body go out in separate writes
    svr.set_read_timeout(10, 0);

    const bool loopback_head = loopback(o.host);
    std::atomic<int> followers{0};
    svr.set_pre_routing_handler([&](const httplib::Request& req, httplib::Response& res) {
        // Runs before the body is read, so a refused body is never held in memory.
        int status = 0;
        if (std::string why = refused(req, loopback_head, &status); !why.empty()) {
            fail(res, status, why);
            return httplib::Server::HandlerResponse::Handled;
        }
        // The page and its script hold no data; every data endpoint needs the token.
        if (o.token.empty() || req.path == "/" || req.path == "/static/chart.js" ||
            req.path == "/healthz")
            return httplib::Server::HandlerResponse::Unhandled;
        std::string given;
        std::string auth = req.get_header_value("Authorization");
        if (auth.rfind("Bearer ", 0) == 0)
            given = auth.substr(7);
        if (given.empty()) {
            // Never from the query string, where it would land in logs and Referer headers.
            fail(res, 401, "this server needs a token: send Authorization: Bearer TOKEN");
            return httplib::Server::HandlerResponse::Handled;
        }
        if (!same(given, o.token)) {
            fail(res, 403, "wrong token");
            return httplib::Server::HandlerResponse::Handled;
        }
        return httplib::Server::HandlerResponse::Unhandled;
    });
    svr.set_error_handler([&](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty())
            return;
        if (res.status == 404)
            fail(res, 404, fmt::format("no such endpoint: {} {}", req.method, req.path));
        else if (res.status == 413)
            fail(res, 413, fmt::format("the request body is over the {} byte limit", o.max_body));
        else if (res.status == 400)
            fail(res, 400, "malformed request (a body needs Content-Length and must be JSON)");
        else
            fail(res, res.status, fmt::format("HTTP {}", res.status));
    });
    svr.set_exception_handler(
        [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
            try {
                std::rethrow_exception(ep);
            } catch (const Error& e) {
                fail(res, 400, e.what());
            } catch (const std::exception& e) {
                fail(res, 500, fmt::format("internal error: {}", e.what()));
            }
        });

    svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
        std::string_view page = dashboard_html();
        res.set_content(page.data(), page.size(), "text/html; charset=utf-8");
    });
    svr.Get("/static/chart.js", [](const httplib::Request&, httplib::Response& res) {
        std::string_view js = chart_js();
        res.set_header("Cache-Control", "max-age=86400");
        res.set_content(js.data(), js.size(), "application/javascript");
    });
    svr.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
        res.set_content("ok\n", "text/plain");
    });
    svr.Get("/api/version", [](const httplib::Request&, httplib::Response& res) {
        reply(res, 200, {{"version", "kiln 0.1.0"}, {"api", 1}});
    });

    // Jobs API.
    auto submit = [&](const httplib::Request& req, httplib::Response& res) {
        Job job = queue.submit(parse_job_body(req.body));
        reply(res, 200, {{"job_id", job.id}, {"submission_id", job.id}});
    };
    svr.Post("/api/jobs/", submit);
    svr.Post("/api/jobs", submit);
    auto list = [&](const httplib::Request&, httplib::Response& res) {
        json all = json::array();
        for (const Job& j : queue.list())
            all.push_back(to_json(j));
        reply(res, 200, all);
    };
    svr.Get("/api/jobs/", list);
    svr.Get("/api/jobs", list);
    auto find = [&](const httplib::Request& req, httplib::Response& res) -> std::optional<Job> {
        auto job = queue.get(req.matches[1]);
        if (!job)
            fail(res, 404, fmt::format("no job named \"{}\"", std::string(req.matches[1])));
        return job;
    };
    svr.Get(R"(/api/jobs/([A-Za-z0-9_-]+))",
            [&](const httplib::Request& req, httplib::Response& res) {
                if (auto job = find(req, res))
                    reply(res, 200, to_json(*job));
            });
    svr.Get(R"(/api/jobs/([A-Za-z0-9_-]+)/logs)",
            [&](const httplib::Request& req, httplib::Response& res) {
                if (auto job = find(req, res))
                    reply(res, 200, {{"logs", tail_of(queue.job_log(job->id), 4 << 20)}});
            });
    // The log as a plain-text stream that follows the file until the job ends.
    svr.Get(R"(/api/jobs/([A-Za-z0-9_-]+)/logs/tail)", [&](const httplib::Request& req,
                                                           httplib::Response& res) {
        auto job = find(req, res);
        if (!job)
            return;
        // A follower holds one of the server's threads while its job runs: so many at
        // once and no more, so that the API, /metrics and the dashboard keep threads.
        if (followers.fetch_add(1) >= kMaxFollowers) {
            followers--;
            return fail(res, 503,
                        fmt::format("{} log followers are open, the most this head serves "
                                    "at once; read /api/jobs/{}/logs, or follow later",
                                    kMaxFollowers, job->id));
        }
        // Released when the response ends, however it ends.
        std::shared_ptr<void> ticket(nullptr, [&](void*) { followers--; });
        std::string id = job->id, path = queue.job_log(id);
        auto offset = std::make_shared<int64_t>(0);
        res.set_chunked_content_provider(
            "text/plain", [&queue, id, path, offset, ticket](size_t, httplib::DataSink& sink) {
                for (int polls = 0; polls < 20; polls++) {
                    auto now = queue.get(id);
                    bool over = !now || terminal(now->state);
                    std::string chunk = ServedFile(path).read(*offset, 1 << 16);
                    if (!chunk.empty()) {
                        *offset += int64_t(chunk.size());
                        return sink.write(chunk.data(), chunk.size());
                    }
                    if (over) {
                        sink.done();
                        return true;
                    }
                    if (!sink.is_writable())
                        return false;
                    std::this_thread::sleep_for(std::chrono::milliseconds(200));
                }
                return sink.is_writable();
            });
    });
    svr.Post(R"(/api/jobs/([A-Za-z0-9_-]+)/stop)",
             [&](const httplib::Request& req, httplib::Response& res) {
                 if (auto job = find(req, res))
                     reply(res, 200, {{"stopped", queue.stop(job->id)}});
             });
    svr.Delete(R"(/api/jobs/([A-Za-z0-9_-]+))",
               [&](const httplib::Request& req, httplib::Response& res) {
                   if (auto job = find(req, res))
                       reply(res, 200, {{"deleted", queue.remove(job->id)}});
               });

    // Run folders.
    svr.Get("/api/runs", [&](const httplib::Request&, httplib::Response& res) {
        json all = json::array();
        for (const RunSummary& r : runs.list()) {
            all.push_back(
                {{"name", r.name}, {"status", r.status}, {"last", r.last}, {"updated", r.updated}});
        }
        reply(res, 200, all);
    });
    svr.Get("/api/run", [&](const httplib::Request& req, httplib::Response& res) {
        reply(res, 200, runs.detail(req.get_param_value("name")));
    });
    svr.Get("/api/run/metrics", [&](const httplib::Request& req, httplib::Response& res) {
        reply(res, 200, runs.metrics(req.get_param_value("name"), int_param(req, "offset", 0)));
    });
    svr.Get("/api/run/log", [&](const httplib::Request& req, httplib::Response& res) {
        std::string dir = runs.folder(req.get_param_value("name"));
        int64_t rank = int_param(req, "rank", -1);
        int64_t bytes = std::clamp<int64_t>(int_param(req, "bytes", 65536), 1, 4 << 20);
        if (rank < -1 || rank > 100000)
            throw error("query parameter rank={} is not a rank", rank);
        std::string path =
            rank < 0 ? dir + "/job.log" : dir + "/rank-" + std::to_string(rank) + ".log";
        res.set_content(tail_of(path, bytes), "text/plain; charset=utf-8");
    });
    svr.Get("/metrics", [&](const httplib::Request&, httplib::Response& res) {
        res.set_content(prometheus(queue, runs), "text/plain; version=0.0.4");
    });

    if (!svr.bind_to_port(o.host, o.port))
        throw error("cannot listen on {}:{}: {}", o.host, o.port, std::strerror(errno));
    std::string url = fmt::format("http://{}:{}/", o.host, o.port);
    log::info("serve",
              "dashboard and jobs API on {} (runs folder {}, capacity {} CPU slots, {} GPUs)", url,
              o.runs, o.capacity.cpus, o.capacity.gpus);
    std::thread waiter([&] {
        int sig = 0;
        sigwait(&stop_signals, &sig);
        log::info("serve", "signal {}: stopping", sig);
        svr.stop();
    });
    svr.listen_after_bind();
    // listen_after_bind returns after stop(); if it returned for another reason, wake the waiter.
    ::kill(::getpid(), SIGTERM);
    waiter.join();
    return 0;
}

}  // namespace kiln::serve
