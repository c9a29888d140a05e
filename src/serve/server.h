#pragma once
// `kiln serve`: the head node. One HTTP server (cpp-httplib) with
//   /                      the dashboard (one page; charts drawn with Chart.js)
//   /api/jobs/...          the jobs API, shaped after Ray's Jobs REST API
//   /api/runs, /api/run    run folders under --runs: status, metrics, ranks, checkpoints, logs
//   /metrics               Prometheus text, every series named kiln_*
// It binds 127.0.0.1 unless told otherwise, and refuses any other address without a token;
// with a token (at least kMinTokenLength characters), every data request must carry it as
// Authorization: Bearer T (never in the query string). Whatever the bind, it answers only its
// own Origin, takes request bodies only as JSON with a Content-Length, and refuses CORS
// preflights; a head on a loopback address also answers only to a loopback Host (no DNS
// rebinding).
#include <cstddef>
#include <string>
#include <vector>

#include "serve/jobs.h"

namespace kiln::serve {

constexpr size_t kMinTokenLength = 16;

struct ServeOptions {
    std::string host = "127.0.0.1";
    int port = 8265;
    std::string token;  // "" -> none (loopback only)
    std::string runs = "runs";
    std::vector<std::string> data_roots;  // folders jobs may use besides runs (sandbox.h)
    Capacity capacity;                    // CPU slots and GPUs the queue may hand out
    size_t max_body = 1 << 20;
    std::string kiln;  // the binary jobs run
};

// Serves until SIGINT or SIGTERM; then stops the running jobs and returns 0. Throws Error for
// options it refuses (a public address without a token, a port in use).
int serve(const ServeOptions& options);

bool loopback(const std::string& host);

}  // namespace kiln::serve
