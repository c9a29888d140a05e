// Fuzzes the head's job submission: the body of POST /api/jobs/ through serve::parse_job_body
// (bounded nesting, then parse_spec's field checks), exactly as the server calls it. A refusal
// must also go out as the server sends it, {"error": message} as JSON, and an accepted job must
// list as JSON (GET /api/jobs/).
#include <nlohmann/json.hpp>

#include "fuzz.h"
#include "serve/jobs.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace kiln;
    const std::string_view body(reinterpret_cast<const char*>(data), size);
    serve::Job job;
    try {
        job.spec = serve::parse_job_body(body);
    } catch (const Error& e) {
        fuzz::check_message(e.what());
        (void)nlohmann::json{{"error", e.what()}}.dump();  // a json::exception here is a finding
        return 0;
    }
    job.id = job.spec.submission_id.empty() ? "job-0001" : job.spec.submission_id;
    (void)serve::to_json(job).dump();
    return 0;
}
