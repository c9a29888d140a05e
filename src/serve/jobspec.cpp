#include "serve/jobspec.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "serve/sandbox.h"

namespace kiln::serve {
namespace {

using json = nlohmann::json;

// Subcommands a job may run; the head's own commands (serve, submit, ...) and `launch` (the
// head launches) are not among them.
const std::set<std::string> kJobCommands = {"data",   "tokenizer", "train",   "eval",
                                            "export", "run",       "compile", "plan"};

// An integer field; a number with no fraction (Ray's CLI sends 1.0) counts as one.
int get_int(const json& body, const char* key, int lo, int hi, int fallback,
            const char* whole_why = "") {
    if (!body.contains(key))
        return fallback;
    const json& v = body[key];
    double x = 0;
    if (v.is_number_integer()) {
        x = double(v.get<int64_t>());
    } else if (v.is_number_float() && std::isfinite(v.get<double>())) {
        x = v.get<double>();
        if (x != std::floor(x))
            throw error("field \"{}\" is {}; it must be a whole number{}", key, v.dump(),
                        whole_why);
    } else {
        throw error("field \"{}\" must be an integer, not {}", key, excerpt(v.dump(), 80));
    }
    if (x < lo || x > hi)
        throw error("field \"{}\" is {}; it must be between {} and {}", key, v.dump(), lo, hi);
    return int(x);
}

// An object field that kiln honours only when empty (Ray's client sends {} or null).
void refuse_unless_empty(const json& body, const char* key, const char* why) {
    if (!body.contains(key))
        return;
    const json& v = body[key];
    if (!v.is_object())
        throw error("field \"{}\" must be an object, not {}", key, excerpt(v.dump(), 80));
    if (!v.empty())
        throw error("field \"{}\" ({}) cannot be honoured: {}", key, excerpt(v.dump(), 120), why);
}

// runtime_env: env_vars and working_dir; every other key of Ray's is refused by name.
void parse_runtime_env(const json& env, JobSpec& s) {
    if (env.is_null())
        return;
    if (!env.is_object())
        throw error("field \"runtime_env\" must be an object, not {}", excerpt(env.dump(), 80));
    for (const auto& [key, value] : env.items()) {
        if (value.is_null())
            continue;
        if (key == "env_vars") {
            if (!value.is_object())
                throw error("runtime_env.env_vars must be an object of strings");
            for (const auto& [name, v] : value.items()) {
                if (!v.is_string())
                    throw error("runtime_env.env_vars {} must be a string, not {}",
                                excerpt(name, 128), excerpt(v.dump(), 80));
                s.env_vars[name] = v.get<std::string>();
            }
            Sandbox::check_env(s.env_vars);
        } else if (key == "working_dir") {
            if (!value.is_string())
                throw error("runtime_env.working_dir must be a string (a folder on the head)");
            s.working_dir = value.get<std::string>();
            if (s.working_dir.find("://") != std::string::npos)
                throw error(
                    "runtime_env.working_dir \"{}\" is a package URI; kiln serve fetches and "
                    "unpacks no packages (a C++ trainer has no Python environment to ship): give "
                    "a folder on the head node inside its runs folder or a data root",
                    excerpt(s.working_dir, 200));
        } else {
            throw error(
                "runtime_env.{} is not supported: kiln serve runs the kiln binary, not Python, so "
                "there is no Python environment to build or package; runtime_env takes only "
                "env_vars and working_dir (a folder on the head node)",
                excerpt(key, 64));
        }
    }
}

}  // namespace

// At most `bytes` of `text` for an error message, cut before a UTF-8 character, never inside one:
// the reply {"error": ...} is JSON, which refuses a split character.
std::string excerpt(const std::string& text, size_t bytes) {
    if (text.size() <= bytes)
        return text;
    while (bytes > 0 && (static_cast<unsigned char>(text[bytes]) & 0xc0) == 0x80)
        bytes--;
    return text.substr(0, bytes);
}

std::vector<std::string> split_entrypoint(const std::string& line) {
    std::vector<std::string> words;
    std::string word;
    bool in_word = false;
    char quote = 0;
    for (char c : line) {
        if (quote) {
            if (c == quote)
                quote = 0;
            else
                word += c;
        } else if (c == '\'' || c == '"') {
            quote = c;
            in_word = true;
        } else if (c == ' ' || c == '\t' || c == '\n') {
            if (in_word)
                words.push_back(word);
            word.clear();
            in_word = false;
        } else if (std::string_view(";|&$`<>\\(){}*?!~#").find(c) != std::string_view::npos) {
            throw error(
                "the entrypoint has the shell character '{}'; an entrypoint is a kiln command "
                "and its arguments, never a shell line",
                c);
        } else {
            word += c;
            in_word = true;
        }
    }
    if (quote)
        throw error("the entrypoint has an unclosed {} quote", quote);
    if (in_word)
        words.push_back(word);
    return words;
}

std::string json_text(const json& value) {
    return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

JobSpec parse_spec(const json& request) {
    if (!request.is_object())
        throw error("the job must be a JSON object, not {}", request.type_name());
    // Ray's client sends every field of its JobSubmitRequest, null where not given.
    json body = json::object();
    for (const auto& [key, value] : request.items()) {
        if (!value.is_null() || key == "entrypoint")
            body[key] = value;
    }
    static const std::set<std::string> known = {"entrypoint",
                                                "submission_id",
                                                "job_id",
                                                "ranks",
                                                "entrypoint_num_cpus",
                                                "entrypoint_num_gpus",
                                                "entrypoint_memory",
                                                "entrypoint_resources",
                                                "entrypoint_label_selector",
                                                "runtime_env",
                                                "priority",
                                                "max_failures",
                                                "metadata",
                                                "retry_policy"};
    for (const auto& [key, value] : body.items()) {
        if (!known.count(key)) {
            std::string names;
            for (const auto& k : known)
                names += (names.empty() ? "" : ", ") + k;
            throw error("unknown field \"{}\" in the job; the fields are {}", excerpt(key, 64),
                        names);
        }
    }
    JobSpec s;
    if (!body.contains("entrypoint") || body["entrypoint"].is_null())
        throw error("the job has no \"entrypoint\" (e.g. \"kiln train --set train.steps=100\")");
    const json& e = body["entrypoint"];
    if (e.is_string()) {
        s.entrypoint = split_entrypoint(e.get<std::string>());
    } else if (e.is_array() &&
               std::all_of(e.begin(), e.end(), [](auto& w) { return w.is_string(); })) {
        s.entrypoint = e.get<std::vector<std::string>>();
    } else {
        throw error("field \"entrypoint\" must be a string or an array of strings");
    }
    if (!s.entrypoint.empty() && s.entrypoint[0] == "kiln")
        s.entrypoint.erase(s.entrypoint.begin());
    if (s.entrypoint.empty() || !kJobCommands.count(s.entrypoint[0])) {
        std::string names;
        for (const auto& k : kJobCommands)
            names += (names.empty() ? "" : ", ") + k;
        throw error(
            "the entrypoint \"{}\" is not a kiln command: kiln serve runs kiln's own commands, "
            "never a shell line or a Python script; it must start with kiln and one of {} (e.g. "
            "\"kiln train --config run.yaml\")",
            excerpt(e.is_string() ? e.get<std::string>() : e.dump(), 200), names);
    }
    for (const auto& w : s.entrypoint) {
        if (w.find('\0') != std::string::npos || w.size() > 4096)
            throw error("an entrypoint argument is over 4096 bytes or holds a NUL byte");
        if (w.rfind("run.dir=", 0) == 0 || (w == "--out" && s.entrypoint[0] == "run"))
            throw error(
                "the entrypoint sets its output folder ({}); the head gives each job its own "
                "folder RUNS/<job id>",
                w);
    }
    // job_id is Ray's old name of submission_id; its client sends submission_id or job_id.
    for (const char* key : {"job_id", "submission_id"}) {
        if (!body.contains(key))
            continue;
        const json& id = body[key];
        if (!id.is_string())
            throw error("field \"{}\" must be a string", key);
        s.submission_id = id.get<std::string>();
        bool ok = !s.submission_id.empty() && s.submission_id.size() <= 64 &&
                  std::isalnum(static_cast<unsigned char>(s.submission_id[0]));
        for (char c : s.submission_id)
            ok = ok && (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_');
        if (!ok)
            throw error(
                "{} \"{}\" must be 1-64 letters, digits, - or _, starting with a letter or "
                "digit",
                key, excerpt(s.submission_id, 80));
    }
    const char* whole = " (kiln gives each rank whole CPU slots and GPUs)";
    s.ranks = get_int(body, "ranks", 1, 1024, 1);
    s.cpus_per_rank = get_int(body, "entrypoint_num_cpus", 1, 1024, 1, whole);
    s.gpus_per_rank = get_int(body, "entrypoint_num_gpus", 0, 64, 0, whole);
    s.priority = get_int(body, "priority", -1000, 1000, 0);
    s.max_failures = get_int(body, "max_failures", 0, 100, 0);
    if (s.ranks > 1 && s.entrypoint[0] != "train")
        throw error("only train runs on more than one rank; {} takes \"ranks\": 1",
                    s.entrypoint[0]);
    if (body.contains("entrypoint_memory")) {
        const json& m = body["entrypoint_memory"];
        if (!m.is_number_integer() || m.get<int64_t>() < 0 || m.get<int64_t>() > (int64_t(1) << 50))
            throw error("field \"entrypoint_memory\" must be a number of bytes from 0 to 2^50");
        s.memory_per_rank = m.get<int64_t>();
        const bool planned = s.entrypoint[0] == "train" || s.entrypoint[0] == "compile";
        if (s.memory_per_rank > 0 && !planned)
            throw error(
                "field \"entrypoint_memory\" applies to train and compile jobs, whose memory "
                "plan is checked against it; a {} job has no memory plan to check",
                s.entrypoint[0]);
        for (const auto& w : s.entrypoint) {
            if (s.memory_per_rank > 0 && w.rfind("train.memory_limit_gb=", 0) == 0)
                throw error("the job gives both entrypoint_memory and --set {}; give one of them",
                            w);
        }
    }
    refuse_unless_empty(body, "entrypoint_resources",
                        "a kiln head has no custom resources; ask for CPU slots and GPUs per rank "
                        "with entrypoint_num_cpus and entrypoint_num_gpus, memory with "
                        "entrypoint_memory");
    refuse_unless_empty(body, "entrypoint_label_selector",
                        "a kiln head is one node and has no node labels to select");
    if (body.contains("retry_policy"))
        throw error(
            "field \"retry_policy\" cannot be honoured: kiln restarts a failed job's whole gang "
            "from its last checkpoint, up to \"max_failures\" times; give that instead");
    if (body.contains("runtime_env"))
        parse_runtime_env(body["runtime_env"], s);
    if (body.contains("metadata")) {
        const json& m = body["metadata"];
        if (!m.is_object() || m.size() > 64)
            throw error("field \"metadata\" must be an object of at most 64 strings");
        for (const auto& [k, v] : m.items()) {
            if (!v.is_string() || k.size() > 256 || v.get<std::string>().size() > 4096)
                throw error("metadata \"{}\" must be a string of at most 4096 bytes",
                            excerpt(k, 256));
            s.metadata[k] = v.get<std::string>();
        }
    }
    return s;
}

JobSpec parse_job_body(std::string_view body) {
    // A job is a flat object; anything nested deeper is dropped while parsing (which does not
    // recurse) and refused.
    bool too_deep = false;
    json j = json::parse(
        body.begin(), body.end(),
        [&](int depth, json::parse_event_t, json&) {
            too_deep = too_deep || depth > kMaxJobDepth;
            return !too_deep;
        },
        false);
    if (too_deep)
        throw error("the job nests deeper than {} levels", kMaxJobDepth);
    if (j.is_discarded())
        throw error("the request body is not valid JSON");
    return parse_spec(j);
}

}  // namespace kiln::serve
