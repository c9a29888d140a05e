// kiln launch -n N [--master-port P] [--nnodes N --node-rank R --master-addr A] -- kiln train ...
#include <cstdint>
#include <memory>

#include "cli/commands.h"
#include "launch/supervisor.h"

namespace kiln::cli {

constexpr double kWeek = 7 * 24 * 3600;

Action add_launch(CLI::App& app) {
    auto o = std::make_shared<launch::LaunchOptions>();
    app.add_option("-n,--ranks", o->ranks, "ranks to start on this machine")->required();
    app.add_option("--master-port", o->master_port,
                   "rendezvous port on node 0 (default: a free one; needed with --nnodes)");
    app.add_option("--nnodes", o->nnodes,
                   "hosts in the gang, each running this command with its own --node-rank")
        ->check(CLI::Range(1, 4096));
    app.add_option("--node-rank", o->node_rank, "this host's place among them, 0 to nnodes-1");
    app.add_option("--master-addr", o->master_addr, "node 0's address, as the other hosts reach it")
        ->capture_default_str();
    app.add_option("--agent-port", o->agent_port,
                   "where node 0's launch listens for the other hosts' (default: master port + 1)");
    app.add_option("--grace", o->grace_s, "seconds the other ranks get to stop after a failure")
        ->capture_default_str();
    app.add_option(
        "--max-failures", o->max_failures,
        "restart the whole gang (from the newest good checkpoint) up to this many times");
    app.add_option("--hang-timeout", o->hang_timeout_s,
                   "a rank without progress, or with --nnodes a silent host, for this many seconds "
                   "counts as failed (0: never for a rank, 600 s for a host)")
        ->capture_default_str();
    app.add_option("command", o->command, "the command of every rank, after --")->required();
    app.footer(
        "Example: kiln launch -n 2 -- kiln train --set run.dir=runs/dp2\n"
        "Two hosts of 2 ranks: on each, kiln launch --nnodes 2 --node-rank R --master-addr "
        "HOST0 --master-port 29500 -n 2 -- kiln train --set run.dir=/shared/runs/x");
    return [o] {
        check_flag("--master-port", o->master_port, 0, 65535,
                   "a TCP port (1 to 65535, or 0 for a free one)");
        check_flag("--agent-port", o->agent_port, 0, 65535,
                   "a TCP port (1 to 65535, or 0 for the master port + 1)");
        // Durations are capped at a week: far past any grace or hang a run means, and within
        // what the deadlines built from them (steady_clock nanoseconds) can hold.
        check_flag("--grace", o->grace_s, 0, kWeek,
                   "a number of seconds from 0 to 604800 (a week)");
        check_flag("--hang-timeout", o->hang_timeout_s, 0, kWeek,
                   "a number of seconds from 0 (never, for a rank) to 604800 (a week)");
        check_flag("--max-failures", o->max_failures, 0, INT32_MAX,
                   "a number of gang restarts, 0 or more");
        return launch::run_gang(*o);
    };
}

}  // namespace kiln::cli
