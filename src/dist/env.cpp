#include "dist/env.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "core/progress.h"

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

// This node's count in Slurm's SLURM_TASKS_PER_NODE: "4" for every node, "2(x3),1" for three
// nodes of 2 tasks and one of 1; `node` is SLURM_NODEID.
int slurm_tasks_on(const std::string& list, int node) {
    auto refuse = [&] {
        return error(
            "environment variable SLURM_TASKS_PER_NODE={} is not a list of task counts like "
            "2(x3),1",
            list);
    };
    const char* at = list.data();
    const char* const end = list.data() + list.size();
    auto number = [&] {
        int v = 0;
        auto [next, ec] = std::from_chars(at, end, v);
        if (ec != std::errc() || v < 1)
            throw refuse();
        at = next;
        return v;
    };
    for (int first = 0;;) {
        const int count = number();
        int repeat = 1;
        if (at < end && *at == '(') {
            if (end - at < 2 || at[1] != 'x')
                throw refuse();
            at += 2;
            repeat = number();
            if (at == end || *at++ != ')')
                throw refuse();
        }
        if (node < first + repeat)
            return count;
        first += repeat;
        if (at == end)
            throw error(
                "environment variable SLURM_TASKS_PER_NODE={} has no count for node {} "
                "(SLURM_NODEID)",
                list, node);
        if (*at++ != ',')
            throw refuse();
    }
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
        if (has("LOCAL_WORLD_SIZE"))
            p.local_world_size = parse_int(env, "LOCAL_WORLD_SIZE", 1);
    } else if (has("OMPI_COMM_WORLD_SIZE")) {
        p.source = "openmpi";
        p.world_size = parse_int(env, "OMPI_COMM_WORLD_SIZE", 1);
        p.rank = parse_int(env, "OMPI_COMM_WORLD_RANK", 0);
        p.local_rank = has("OMPI_COMM_WORLD_LOCAL_RANK")
                           ? parse_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
                           : p.rank;
        if (has("OMPI_COMM_WORLD_LOCAL_SIZE"))
            p.local_world_size = parse_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1);
    } else if (has("SLURM_NTASKS")) {
        p.source = "slurm";
        p.world_size = parse_int(env, "SLURM_NTASKS", 1);
        p.rank = parse_int(env, "SLURM_PROCID", 0);
        p.local_rank = has("SLURM_LOCALID") ? parse_int(env, "SLURM_LOCALID", 0) : 0;
        if (has("SLURM_NTASKS_PER_NODE"))
            p.local_world_size = parse_int(env, "SLURM_NTASKS_PER_NODE", 1);
        else if (has("SLURM_TASKS_PER_NODE"))
            p.local_world_size =
                slurm_tasks_on(env.at("SLURM_TASKS_PER_NODE"),
                               has("SLURM_NODEID") ? parse_int(env, "SLURM_NODEID", 0) : 0);
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
    if (has("GLOO_SOCKET_IFNAME"))  // PyTorch takes a list of them; one carries kiln's pairs
        p.interface = first_host(env.at("GLOO_SOCKET_IFNAME"));
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

namespace {

std::string numeric(const sockaddr* addr) {
    char text[INET_ADDRSTRLEN] = {0};
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(addr)->sin_addr, text, sizeof text);
    return text;
}

std::string interface_address(const std::string& name) {
    ifaddrs* all = nullptr;
    if (getifaddrs(&all) != 0)
        throw error("cannot list this host's network interfaces: {}", strerror(errno));
    std::string found, names;
    bool exists = false;
    for (ifaddrs* i = all; i; i = i->ifa_next) {
        if (names.find(std::string(" ") + i->ifa_name + ",") == std::string::npos)
            names += std::string(" ") + i->ifa_name + ",";
        if (name != i->ifa_name)
            continue;
        exists = true;
        if (found.empty() && i->ifa_addr && i->ifa_addr->sa_family == AF_INET)
            found = numeric(i->ifa_addr);
    }
    freeifaddrs(all);
    if (!names.empty())
        names.pop_back();
    if (!exists)
        throw error(
            "network interface \"{}\" (GLOO_SOCKET_IFNAME or parallel.interface) does not "
            "exist on {}; it has{}",
            name, host_name(), names);
    if (found.empty())
        throw error(
            "network interface \"{}\" (GLOO_SOCKET_IFNAME or parallel.interface) has no "
            "IPv4 address",
            name);
    return found;
}

// The local address the kernel would send from toward host:port (a UDP connect sends nothing).
std::string address_toward(const std::string& host, int port) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_DGRAM;
    addrinfo* res = nullptr;
    const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
    if (rc != 0 || res == nullptr)
        throw error("MASTER_ADDR={} cannot be resolved: {}", host, gai_strerror(rc));
    const int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_in local{};
    socklen_t len = sizeof local;
    const bool ok = fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0 &&
                    getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0;
    const int e = errno;
    freeaddrinfo(res);
    if (fd >= 0)
        close(fd);
    if (!ok)
        throw error("no route from {} to MASTER_ADDR={}: {}", host_name(), host, strerror(e));
    return numeric(reinterpret_cast<const sockaddr*>(&local));
}

}  // namespace

std::string local_address(const Placement& p) {
    return p.interface.empty() ? address_toward(p.master_addr, p.master_port)
                               : interface_address(p.interface);
}

}  // namespace kiln::dist
