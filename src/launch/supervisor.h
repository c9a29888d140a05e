#pragma once
// `kiln launch`: N local ranks of one command as a gang. Each rank gets the torchrun-style
// environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK) and a share of the cores
// (OMP_NUM_THREADS = cores / N unless already set); every output line is
// prefixed with its rank; Ctrl-C/SIGTERM go to all ranks; when one rank fails, the others are
// stopped. With --max-failures F the whole gang is then restarted (ranks resume from their run's
// newest good checkpoint), up to F times; a rank that makes no progress for --hang-timeout
// seconds counts as failed. Progress is a heartbeat file each rank rewrites every step
// (KILN_HEARTBEAT_DIR/rank-N); the attempt number reaches the ranks as KILN_RESTARTS.
// Without restarts left, the launch exits non-zero with a one-line reason. On several hosts
// (--nnodes), each host's launch runs its own ranks, and a failure, hang or silence anywhere
// stops and restarts the gang on every host.
#include <string>
#include <vector>

namespace kiln::launch {

struct LaunchOptions {
    int ranks = 1;
    std::vector<std::string> command;  // "kiln train ..." (kiln is this binary) or a program
    std::string master_addr = "127.0.0.1";
    int master_port = 0;          // 0: a free port
    double grace_s = 10;          // after a failure, seconds before SIGKILL
    int max_failures = 0;         // gang restarts allowed
    double hang_timeout_s = 600;  // no heartbeat for this long: the rank counts as failed
    // Several hosts (launch/agents.h): this host runs ranks node_rank x ranks ... + ranks - 1 of
    // nnodes x ranks; master_addr is node 0's address, where its agent listens on agent_port.
    int nnodes = 1;
    int node_rank = 0;
    int agent_port = 0;  // 0: master_port + 1
};

// Runs the gang to completion; returns the exit status for the launcher (0: every rank
// succeeded). Throws Error for a command that cannot start.
int run_gang(const LaunchOptions& options);

int free_port();           // a TCP port free on this machine right now
bool port_free(int port);  // whether `port` on 127.0.0.1 can be bound right now

}  // namespace kiln::launch
