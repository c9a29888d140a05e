#pragma once
// A job as a client submits it: the body of POST /api/jobs/ (kiln's fields and Ray's
// JobSubmitRequest), parsed and checked before the queue sees it.
#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::serve {

struct JobSpec {
    std::vector<std::string> entrypoint;  // a kiln subcommand and its arguments ("kiln" dropped)
    std::string submission_id;            // "" -> the server picks "job-NNNN"
    int ranks = 1;
    int cpus_per_rank = 1;
    int gpus_per_rank = 0;
    int priority = 0;  // higher starts first
    int max_failures = 0;
    std::map<std::string, std::string> metadata;
    // runtime_env: variables set for every rank, and the folder its processes start in
    // ("" -> the head's; Queue::submit resolves it and refuses one outside the head's roots).
    std::map<std::string, std::string> env_vars;
    std::string working_dir;
    // entrypoint_memory: bytes one rank may plan for (train and compile jobs, where it becomes
    // train.memory_limit_gb, checked against the job's memory plan before a step); 0: none.
    int64_t memory_per_rank = 0;
};

// JSON text of a value whose strings may hold bytes that are not UTF-8 (a job's output, a
// request's path quoted in an error): those bytes become U+FFFD, where a plain dump() throws.
std::string json_text(const nlohmann::json& value);

// Parses and checks a submission body (the JSON of POST /api/jobs/): kiln's fields and every
// field of Ray's JobSubmitRequest (null meaning absent, as Ray's client sends them). Throws
// Error naming the field at fault: unknown fields, wrong types, an entrypoint that is not a
// kiln command, a runtime_env key or resource kiln cannot honour, an env var the job may not
// set. Where files lie is checked by Queue::submit, against the head's roots.
JobSpec parse_spec(const nlohmann::json& body);
// The bytes of a submission body, as the head receives them: parsed without recursion, refused
// past kMaxJobDepth levels of nesting (so that nothing later recurses through it), then checked
// by parse_spec. Throws Error: not JSON, nested too deep, or a field parse_spec refuses.
constexpr int kMaxJobDepth = 16;
JobSpec parse_job_body(std::string_view body);
// Splits an entrypoint line into words the way a shell would split plain words and quotes
// (no expansion, no operators: a line with ; | & $ ` < > is refused).
std::vector<std::string> split_entrypoint(const std::string& line);

// At most `bytes` of `text` for an error message, cut before a UTF-8 character, never inside
// one: the reply {"error": ...} is JSON, which refuses a split character.
std::string excerpt(const std::string& text, size_t bytes);

}  // namespace kiln::serve
