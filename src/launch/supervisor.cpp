#include "launch/supervisor.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "core/progress.h"
#include "launch/agents.h"

namespace kiln::launch {
namespace {

// The most ranks one host's launch starts. A rank is a process and an open pipe in this
// launcher, which polls them all in one loop: 1024 is more ranks than the largest hosts have
// cores (a rank per core at most; one per accelerator on GPU hosts), so no real gang is refused,
// while a slip like -n 100000 cannot fork-bomb the machine. Bigger gangs span hosts (--nnodes).
constexpr int kMaxLocalRanks = 1024;

std::atomic<int> g_signal{0};
void on_signal(int sig) {
    g_signal = sig;
}

struct Rank {
    pid_t pid = -1;
    int out = -1;         // read end of the rank's stdout+stderr
    std::string partial;  // an unfinished line
    bool running = true;
    int status = 0;
};

void emit(int rank, const std::string& line) {
    std::string s = fmt::format("[rank {}] {}\n", rank, line);
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fflush(stdout);
}

void drain(int rank, Rank& r, bool final) {
    char buf[65536];
    while (true) {
        ssize_t n = ::read(r.out, buf, sizeof buf);
        if (n <= 0)
            break;
        r.partial.append(buf, size_t(n));
        size_t nl;
        while ((nl = r.partial.find('\n')) != std::string::npos) {
            emit(rank, r.partial.substr(0, nl));
            r.partial.erase(0, nl + 1);
        }
    }
    if (final && !r.partial.empty()) {
        emit(rank, r.partial);
        r.partial.clear();
    }
}

std::string describe(int status) {
    if (WIFEXITED(status))
        return fmt::format("exited with status {}", WEXITSTATUS(status));
    if (WIFSIGNALED(status))
        return fmt::format("was killed by signal {}", WTERMSIG(status));
    return "stopped";
}

}  // namespace

namespace {

// Binds a TCP socket to 127.0.0.1:port (0: any free one) and closes it; the port it got, or -1.
int bind_loopback(int port) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(uint16_t(port));
    socklen_t len = sizeof addr;
    int got = -1;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), len) == 0 &&
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0)
        got = ntohs(addr.sin_port);
    ::close(fd);
    return got;
}

}  // namespace

int free_port() {
    int port = bind_loopback(0);
    if (port < 0)
        throw error("cannot find a free TCP port: {}", std::strerror(errno));
    return port;
}

bool port_free(int port) {
    return bind_loopback(port) == port;
}

namespace {

struct Attempt {
    bool ok = false;
    bool interrupted = false;
    std::string reason;  // one line: what failed
};

// Seconds since the heartbeat file was last written, or since `start` when there is none yet.
double quiet_for(const std::string& path, std::chrono::steady_clock::time_point start) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
        return seconds_since(start);
    }
    timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return double(now.tv_sec - st.st_mtim.tv_sec) + 1e-9 * double(now.tv_nsec - st.st_mtim.tv_nsec);
}

Attempt run_once(const LaunchOptions& o, const std::vector<std::string>& command, int attempt,
                 const std::string& heartbeat_dir, Peers* peers) {
    const int port = o.master_port > 0 ? o.master_port : free_port();
    const int first = o.node_rank * o.ranks, world = o.nnodes * o.ranks;  // global rank numbers
    auto heartbeat_of = [&](int i) { return heartbeat_dir + "/rank-" + std::to_string(first + i); };
    for (int i = 0; i < o.ranks; i++)
        ::unlink(heartbeat_of(i).c_str());
    std::vector<Rank> ranks;
    ranks.reserve(size_t(o.ranks));
    // Spawning stops at a signal (the loop below then stops the ranks already started) or at a
    // rank that cannot start; SIGINT and SIGTERM are held across each fork, so that a child
    // never runs the launcher's handler: it takes their default action before it runs the
    // command, and a signal meant for the launcher reaches it after the fork.
    std::string spawn_failure;
    sigset_t stops, before;
    sigemptyset(&stops);
    sigaddset(&stops, SIGINT);
    sigaddset(&stops, SIGTERM);
    for (int i = 0; i < o.ranks && g_signal == 0; i++) {
        int fds[2];
        if (::pipe(fds) != 0) {
            spawn_failure = fmt::format("cannot start rank {}: no pipe for its output: {}",
                                        first + i, std::strerror(errno));
            break;
        }
        ::sigprocmask(SIG_BLOCK, &stops, &before);
        pid_t pid = ::fork();
        if (pid == 0) {
            struct sigaction dfl {};
            dfl.sa_handler = SIG_DFL;
            ::sigaction(SIGINT, &dfl, nullptr);
            ::sigaction(SIGTERM, &dfl, nullptr);
            ::sigprocmask(SIG_SETMASK, &before, nullptr);
            ::dup2(fds[1], STDOUT_FILENO);
            ::dup2(fds[1], STDERR_FILENO);
            ::close(fds[0]);
            ::close(fds[1]);
            ::setenv("MASTER_ADDR", o.master_addr.c_str(), 1);
            ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
            ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
            ::setenv("RANK", std::to_string(first + i).c_str(), 1);
            ::setenv("LOCAL_RANK", std::to_string(i).c_str(), 1);
            ::setenv("LOCAL_WORLD_SIZE", std::to_string(o.ranks).c_str(), 1);
            ::setenv("GROUP_RANK", std::to_string(o.node_rank).c_str(), 1);
            ::setenv("KILN_HEARTBEAT_DIR", heartbeat_dir.c_str(), 1);
            ::setenv("KILN_RESTARTS", std::to_string(attempt).c_str(), 1);
            // The ranks share this machine's cores (unless the user decided otherwise).
            std::string threads =
                std::to_string(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN) / o.ranks));
            ::setenv("OMP_NUM_THREADS", threads.c_str(), 0);
            std::vector<std::string> argv = command;
            std::vector<char*> args;
            for (auto& a : argv)
                args.push_back(a.data());
            args.push_back(nullptr);
            ::execvp(args[0], args.data());
            std::fprintf(stderr, "kiln launch: cannot run %s: %s\n", argv[0].c_str(),
                         std::strerror(errno));
            ::_exit(127);
        }
        const int fork_errno = errno;
        ::sigprocmask(SIG_SETMASK, &before, nullptr);
        ::close(fds[1]);
        if (pid < 0) {
            ::close(fds[0]);
            spawn_failure =
                fmt::format("cannot start rank {}: fork: {}", first + i, std::strerror(fork_errno));
            break;
        }
        ::fcntl(fds[0], F_SETFL, O_NONBLOCK);
        Rank r;
        r.pid = pid;
        r.out = fds[0];
        ranks.push_back(std::move(r));
    }
    const int started = int(ranks.size());

    Attempt result;
    bool stopping = false;
    auto start = std::chrono::steady_clock::now();
    auto stop_deadline = std::chrono::steady_clock::time_point::max();
    // `local`: this host's news, which the other hosts' agents must hear.
    auto stop_all = [&](const std::string& reason, bool local = true) {
        if (stopping)
            return;
        stopping = true;
        result.reason = reason;
        if (peers && local)
            peers->failed(reason, result.interrupted);
        for (auto& r : ranks) {
            if (r.running)
                ::kill(r.pid, SIGTERM);
        }
        stop_deadline =
            std::chrono::steady_clock::now() + std::chrono::milliseconds(int64_t(o.grace_s * 1000));
    };
    if (!spawn_failure.empty())
        stop_all(fmt::format("{}; stopped the {} rank(s) started", spawn_failure, started));
    int running = started;
    // At least once: a signal that came before any rank started is still heard.
    do {
        std::vector<pollfd> fds;
        for (auto& r : ranks)
            fds.push_back({r.out, POLLIN, 0});
        ::poll(fds.data(), fds.size(), 100);
        for (int i = 0; i < started; i++)
            drain(first + i, ranks[i], false);
        if (int sig = g_signal.exchange(0); sig != 0) {
            result.interrupted = true;
            stop_all(
                started == o.ranks
                    ? fmt::format("interrupted by signal {}; stopped all {} ranks", sig, o.ranks)
                    : fmt::format("interrupted by signal {} while starting ranks; stopped "
                                  "the {} of {} started",
                                  sig, started, o.ranks));
        }
        if (peers) {  // beats while stopping too
            std::string why = peers->poll();
            if (!why.empty() && !stopping) {
                result.interrupted = peers->interrupted();
                stop_all(fmt::format("{}; stopped this host's {} ranks", why, o.ranks), false);
            }
        }
        for (int i = 0; i < started; i++) {
            Rank& r = ranks[i];
            if (!r.running)
                continue;
            int status;
            if (::waitpid(r.pid, &status, WNOHANG) == r.pid) {
                r.running = false;
                r.status = status;
                running--;
                drain(first + i, r, true);
                if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
                    stop_all(fmt::format("rank {} {}; stopped the other {} rank(s)", first + i,
                                         describe(status), world - 1));
                }
            } else if (o.hang_timeout_s > 0 && !stopping) {
                double quiet = quiet_for(heartbeat_of(i), start);
                if (quiet > o.hang_timeout_s) {
                    stop_all(
                        fmt::format("rank {} made no progress for {:.0f} s; stopped all {} "
                                    "ranks",
                                    first + i, quiet, world));
                }
            }
        }
        if (stopping && std::chrono::steady_clock::now() > stop_deadline) {
            for (auto& r : ranks) {
                if (r.running)
                    ::kill(r.pid, SIGKILL);
            }
            stop_deadline = std::chrono::steady_clock::time_point::max();
        }
    } while (running > 0);
    for (auto& r : ranks)
        ::close(r.out);
    result.ok = result.reason.empty();
    return result;
}

}  // namespace

int run_gang(const LaunchOptions& given) {
    LaunchOptions o = given;
    if (o.agent_port <= 0)
        o.agent_port = o.master_port + 1;
    if (o.ranks < 1)
        throw error("-n {}: the gang needs at least one rank", o.ranks);
    if (o.ranks > kMaxLocalRanks)
        throw error("-n {}: one host's launch starts at most {} ranks; use --nnodes for more",
                    o.ranks, kMaxLocalRanks);
    if (o.command.empty())
        throw error("kiln launch needs a command after --, e.g. -- kiln train");
    if (o.nnodes < 1 || o.node_rank < 0 || o.node_rank >= o.nnodes)
        throw error("--node-rank {} is not one of the {} nodes (0 to {})", o.node_rank, o.nnodes,
                    o.nnodes - 1);
    if (o.nnodes > 1 && o.master_port <= 0)
        throw error(
            "--nnodes {} needs --master-port, the same on every host (and --master-addr, "
            "node 0's address)",
            o.nnodes);
    if (o.nnodes > 1 && o.agent_port > 65535)
        throw error("--master-port {} leaves no port above it for the agents; give --agent-port",
                    o.master_port);
    std::vector<std::string> command = o.command;
    if (command[0] == "kiln")
        command[0] = "/proc/self/exe";

    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);

    char pattern[] = "/tmp/kiln-launch-XXXXXX";
    if (::mkdtemp(pattern) == nullptr) {
        throw error("cannot create a heartbeat folder in /tmp: {}", std::strerror(errno));
    }
    const std::string heartbeat_dir = pattern;
    std::unique_ptr<Peers> peers = make_peers(o);
    Attempt a;
    for (int attempt = 0;; attempt++) {
        if (peers)
            attempt = peers->begin(attempt);
        a = run_once(o, command, attempt, heartbeat_dir, peers.get());
        if (peers) {  // the whole gang's outcome, the same on every host
            Outcome gang = peers->end(a.ok);
            a.ok = gang.ok;
            a.interrupted = a.interrupted || gang.interrupted;
            if (!gang.ok && a.reason.empty())
                a.reason = gang.reason;
        }
        if (a.ok || a.interrupted || attempt >= o.max_failures)
            break;
        std::fprintf(stderr, "kiln launch: %s; restarting the gang (restart %d of %d)\n",
                     a.reason.c_str(), attempt + 1, o.max_failures);
        std::fflush(stderr);
    }
    std::filesystem::remove_all(heartbeat_dir);
    if (!a.ok) {
        std::fprintf(stderr, "kiln launch: %s\n", a.reason.c_str());
        return 1;
    }
    return 0;
}

}  // namespace kiln::launch
