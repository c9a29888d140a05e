#include "dist/env.h"

#include <unistd.h>

#include <charconv>
#include <cstdlib>

#include "core/error.h"

extern char** environ;

namespace kiln::dist {
namespace {

std::map<std::string, std::string> process_env() {
    std::map<std::string, std::string> env;
    for (char** e = environ; *e; e++) {
        std::string kv = *e;
        auto eq = kv.find('=');
        if (eq != std::string::npos)
            env[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    return env;
}

int parse_int(const std::map<std::string, std::string>& env, const std::string& key, int min) {
    const std::string& s = env.at(key);
    int v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec != std::errc() || p != s.data() + s.size() || v < min) {
        throw error("environment variable {}={} is not an integer >= {}", key, s, min);
    }
    return v;
}

// "host1,host2" or "host1 host2" -> first host.
std::string first_host(const std::string& list) {
    auto end = list.find_first_of(", \n");
    return list.substr(0, end);
}

}  // namespace

Placement discover(const std::map<std::string, std::string>& given) {
    const auto env = given.empty() ? process_env() : given;
    auto has = [&](const char* k) { return env.count(k) > 0 && !env.at(k).empty(); };
    Placement p;
    if (has("WORLD_SIZE") || has("RANK")) {
        p.source = "torchrun";
        p.world_size = has("WORLD_SIZE") ? parse_int(env, "WORLD_SIZE", 1) : 1;
        p.rank = has("RANK") ? parse_int(env, "RANK", 0) : 0;
        p.local_rank = has("LOCAL_RANK") ? parse_int(env, "LOCAL_RANK", 0) : p.rank;
    } else if (has("OMPI_COMM_WORLD_SIZE")) {
        p.source = "openmpi";
        p.world_size = parse_int(env, "OMPI_COMM_WORLD_SIZE", 1);
        p.rank = parse_int(env, "OMPI_COMM_WORLD_RANK", 0);
        p.local_rank = has("OMPI_COMM_WORLD_LOCAL_RANK")
                           ? parse_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
                           : p.rank;
    } else if (has("SLURM_NTASKS")) {
        p.source = "slurm";
        p.world_size = parse_int(env, "SLURM_NTASKS", 1);
        p.rank = parse_int(env, "SLURM_PROCID", 0);
        p.local_rank = has("SLURM_LOCALID") ? parse_int(env, "SLURM_LOCALID", 0) : 0;
        if (has("SLURM_LAUNCH_NODE_IPADDR"))
            p.master_addr = env.at("SLURM_LAUNCH_NODE_IPADDR");
    } else if (has("VC_TASK_INDEX")) {
        // Volcano's svc plugin: VC_<TASK>_HOSTS lists the pods of a task; one rank per pod.
        p.source = "volcano";
        p.rank = parse_int(env, "VC_TASK_INDEX", 0);
        for (const auto& [k, v] : env) {
            if (k.rfind("VC_", 0) == 0 && k.size() > 9 && k.substr(k.size() - 6) == "_HOSTS") {
                p.master_addr = first_host(v);
                int n = 1;
                for (char c : v)
                    n += c == ',';
                p.world_size = n;
            }
        }
        if (has("VC_WORLD_SIZE"))
            p.world_size = parse_int(env, "VC_WORLD_SIZE", 1);
    }
    if (has("MASTER_ADDR"))
        p.master_addr = env.at("MASTER_ADDR");
    if (has("MASTER_PORT"))
        p.master_port = parse_int(env, "MASTER_PORT", 1);
    if (p.master_port > 65535) {
        throw error("environment variable MASTER_PORT={} is not a TCP port", p.master_port);
    }
    if (p.rank >= p.world_size) {
        throw error("rank {} is outside the world of {} ranks ({} environment)", p.rank,
                    p.world_size, p.source);
    }
    return p;
}

std::string host_name() {
    char name[256] = {0};
    gethostname(name, sizeof name - 1);
    return name;
}

}  // namespace kiln::dist
