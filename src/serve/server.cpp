#include "serve/server.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <signal.h>
#include <sys/socket.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "serve/assets.h"
#include "serve/pool.h"
#include "serve/runs.h"

namespace kiln::serve {
namespace {

using json = nlohmann::json;

// Connection threads (serve/pool.h): enough that clients which send their headers slowly, or
// hold keep-alive connections open, do not take the last one from the API and the dashboard.
constexpr size_t kMaxConnectionThreads = 256;
constexpr int kMaxFollowers = 8;  // log followers, each holding a thread while its job runs

void reply(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(json_text(body) + "\n", "application/json");
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

// ---- WebSocket (RFC 6455), server side and one way: Ray's client follows a job's log with
// aiohttp's ws_connect on /api/jobs/ID/logs/tail and reads text frames until a close frame.

// SHA-1 (FIPS 180-4), for the handshake's Sec-WebSocket-Accept only: no secret depends on it.
std::array<uint8_t, 20> sha1(const std::string& text) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    std::string m = text;
    const uint64_t bits = uint64_t(text.size()) * 8;
    m += char(0x80);
    while (m.size() % 64 != 56)
        m += char(0);
    for (int i = 7; i >= 0; i--)
        m += char((bits >> (8 * i)) & 0xff);
    auto rotl = [](uint32_t x, int n) { return (x << n) | (x >> (32 - n)); };
    for (size_t block = 0; block < m.size(); block += 64) {
        uint32_t w[80];
        for (int t = 0; t < 16; t++) {
            const auto* p = reinterpret_cast<const unsigned char*>(m.data() + block + 4 * t);
            w[t] = uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3];
        }
        for (int t = 16; t < 80; t++)
            w[t] = rotl(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int t = 0; t < 80; t++) {
            uint32_t f, k;
            if (t < 20) {
                f = (b & c) | (~b & d), k = 0x5A827999;
            } else if (t < 40) {
                f = b ^ c ^ d, k = 0x6ED9EBA1;
            } else if (t < 60) {
                f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            } else {
                f = b ^ c ^ d, k = 0xCA62C1D6;
            }
            uint32_t next = rotl(a, 5) + f + e + k + w[t];
            e = d, d = c, c = rotl(b, 30), b = a, a = next;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    std::array<uint8_t, 20> out;
    for (int i = 0; i < 20; i++)
        out[size_t(i)] = uint8_t(h[i / 4] >> (24 - 8 * (i % 4)));
    return out;
}

std::string base64(const uint8_t* data, size_t n) {
    static const char* digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = uint32_t(data[i]) << 16;
        if (i + 1 < n)
            v |= uint32_t(data[i + 1]) << 8;
        if (i + 2 < n)
            v |= data[i + 2];
        out += digits[(v >> 18) & 63];
        out += digits[(v >> 12) & 63];
        out += i + 1 < n ? digits[(v >> 6) & 63] : '=';
        out += i + 2 < n ? digits[v & 63] : '=';
    }
    return out;
}

std::string websocket_accept(const std::string& key) {
    auto digest = sha1(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    return base64(digest.data(), digest.size());
}

bool has_token(const std::string& header, const std::string& token) {  // case-insensitive
    std::string h = header;
    for (char& c : h)
        c = char(std::tolower(static_cast<unsigned char>(c)));
    return h.find(token) != std::string::npos;
}

bool wants_websocket(const httplib::Request& req) {
    return has_token(req.get_header_value("Upgrade"), "websocket") &&
           has_token(req.get_header_value("Connection"), "upgrade");
}

// One unmasked frame from the server: FIN set, `opcode` (1 text, 8 close).
std::string ws_frame(uint8_t opcode, std::string_view payload) {
    std::string f(1, char(0x80 | opcode));
    const size_t n = payload.size();
    if (n < 126) {
        f += char(n);
    } else if (n < 65536) {
        f += char(126);
        f += char(n >> 8);
        f += char(n & 0xff);
    } else {
        f += char(127);
        for (int i = 7; i >= 0; i--)
            f += char((uint64_t(n) >> (8 * i)) & 0xff);
    }
    f += payload;
    return f;
}

// A text frame must hold UTF-8: `pending` + `bytes` up to the last whole character, with
// malformed bytes as U+FFFD; an unfinished character at the end waits in `pending`.
std::string utf8_text(std::string& pending, const std::string& bytes) {
    std::string in = pending + bytes, out;
    pending.clear();
    size_t i = 0;
    while (i < in.size()) {
        const auto c = static_cast<unsigned char>(in[i]);
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (len == 0 || (len == 2 && c < 0xc2) || (len == 4 && c > 0xf4)) {
            out += "\xEF\xBF\xBD";
            i++;
            continue;
        }
        if (i + len > in.size()) {
            bool prefix = true;
            for (size_t k = i + 1; k < in.size(); k++)
                prefix = prefix && (static_cast<unsigned char>(in[k]) & 0xc0) == 0x80;
            if (prefix) {
                pending = in.substr(i);
                break;
            }
        }
        bool ok = i + len <= in.size();
        for (size_t k = 1; ok && k < len; k++)
            ok = (static_cast<unsigned char>(in[i + k]) & 0xc0) == 0x80;
        if (ok && len == 3) {  // no overlong forms, no UTF-16 surrogates
            const auto c1 = static_cast<unsigned char>(in[i + 1]);
            ok = !(c == 0xe0 && c1 < 0xa0) && !(c == 0xed && c1 >= 0xa0);
        } else if (ok && len == 4) {
            const auto c1 = static_cast<unsigned char>(in[i + 1]);
            ok = !(c == 0xf0 && c1 < 0x90) && !(c == 0xf4 && c1 >= 0x90);
        }
        if (!ok) {
            out += "\xEF\xBF\xBD";
            i++;
            continue;
        }
        out.append(in, i, len);
        i += len;
    }
    return out;
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
    svr.new_task_queue = [] { return new ConnectionPool(16, kMaxConnectionThreads); };
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
        // Ray's client uploads a local runtime_env working_dir (or py_modules) as a zip here
        // before it submits; refused before the body is read.
        if (req.path.rfind("/api/packages/", 0) == 0) {
            fail(res, 501,
                 "kiln serve takes no uploaded packages: a C++ trainer has no Python environment "
                 "to ship; give runtime_env.working_dir as a folder on the head node (inside its "
                 "runs folder or a data root) through the REST API or kiln submit --working-dir, "
                 "or leave it out");
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
    svr.set_post_routing_handler([](const httplib::Request&, httplib::Response& res) {
        if (res.status != 101)
            return;
        // A handshake answer carries the upgrade headers and nothing of a body's.
        for (const char* name : {"Content-Type", "Keep-Alive", "Content-Length"})
            res.headers.erase(name);
        auto [first, last] = res.headers.equal_range("Connection");
        for (auto it = first; it != last;)
            it = it->second == "Upgrade" ? std::next(it) : res.headers.erase(it);
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
    // Ray's VersionResponse: its client reads ray_version (the checks it makes before submit:
    // 1.9, 2.0, 2.2 for entrypoint_num_cpus/gpus, 2.8 for entrypoint_memory, 3.0 for
    // retry_policy, which kiln does not take) and parses version, Ray's jobs API level, as an
    // integer (4: DELETE of jobs). ray_version is the Ray release whose jobs API kiln speaks.
    svr.Get("/api/version", [](const httplib::Request&, httplib::Response& res) {
        reply(res, 200,
              {{"version", "4"},
               {"ray_version", "2.8.0"},
               {"ray_commit", "kiln"},
               {"session_name", "kiln"},
               {"kiln_version", "0.1.0"}});
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
    // The log, followed until the job ends: as WebSocket text frames and a close frame when
    // the request asks to upgrade (Ray's client), else as a plain-text chunked stream.
    svr.Get(R"(/api/jobs/([A-Za-z0-9_-]+)/logs/tail)", [&](const httplib::Request& req,
                                                           httplib::Response& res) {
        const bool websocket = wants_websocket(req);
        const std::string key = req.get_header_value("Sec-WebSocket-Key");
        if (websocket && (req.get_header_value("Sec-WebSocket-Version") != "13" || key.empty() ||
                          key.size() > 64))
            return fail(res, 400,
                        "a WebSocket upgrade needs Sec-WebSocket-Version: 13 and a "
                        "Sec-WebSocket-Key");
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
        auto pending = std::make_shared<std::string>();  // an unfinished UTF-8 character
        auto follow = [&queue, id, path, offset, pending, ticket, websocket](
                          size_t, httplib::DataSink& sink) {
            for (int polls = 0; polls < 20; polls++) {
                auto now = queue.get(id);
                bool over = !now || terminal(now->state);
                std::string chunk = ServedFile(path).read(*offset, 1 << 16);
                if (!chunk.empty()) {
                    *offset += int64_t(chunk.size());
                    if (!websocket)
                        return sink.write(chunk.data(), chunk.size());
                    std::string text = utf8_text(*pending, chunk);
                    if (text.empty())
                        continue;
                    std::string frame = ws_frame(1, text);
                    return sink.write(frame.data(), frame.size());
                }
                if (over) {
                    if (!websocket) {
                        sink.done();
                        return true;
                    }
                    // Close code 1000 (normal): Ray's client ends the tail without an
                    // error. Returning false then makes the server drop the connection
                    // rather than read the client's close frame as a request.
                    std::string frame = (pending->empty() ? "" : ws_frame(1, "\xEF\xBF\xBD")) +
                                        ws_frame(8, std::string("\x03\xe8", 2));
                    sink.write(frame.data(), frame.size());
                    return false;
                }
                if (!sink.is_writable())
                    return false;
                std::this_thread::sleep_for(std::chrono::milliseconds(200));
            }
            return sink.is_writable();
        };
        if (!websocket)
            return res.set_chunked_content_provider("text/plain", follow);
        res.status = 101;
        res.set_header("Upgrade", "websocket");
        res.set_header("Connection", "Upgrade");
        res.set_header("Sec-WebSocket-Accept", websocket_accept(key));
        res.set_content_provider("", follow);
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

    // Address reuse, for a restart while the last head's connections linger, but not the port
    // sharing (SO_REUSEPORT) httplib sets by default: a second head on a taken port would
    // silently take half of its requests.
    svr.set_socket_options([](socket_t sock) {
        int yes = 1;
        ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    });
    if (!svr.bind_to_port(o.host, o.port))
        throw error("cannot listen on {}:{}: {}", o.host, o.port, std::strerror(errno));
    widen_listen_backlog(o.port);
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
