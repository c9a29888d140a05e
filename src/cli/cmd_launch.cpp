// kiln launch -n N [--master-port P] [--nnodes N --node-rank R --master-addr A] -- kiln train ...
#include <memory>

#include "cli/commands.h"
#include "launch/supervisor.h"

namespace kiln::cli {

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
        ->check(number_in(0, 86400));
    app.add_option(
        "--max-failures", o->max_failures,
        "restart the whole gang (from the newest good checkpoint) up to this many times");
    app.add_option("--hang-timeout", o->hang_timeout_s,
                   "a rank without progress, or with --nnodes a silent host, for this many seconds "
                   "counts as failed (0: never for a rank, 600 s for a host)")
        ->check(number_in(0));
    app.add_option("command", o->command, "the command of every rank, after --")->required();
    app.footer(
        "Example: kiln launch -n 2 -- kiln train --set run.dir=runs/dp2\n"
        "Two hosts of 2 ranks: on each, kiln launch --nnodes 2 --node-rank R --master-addr "
        "HOST0 --master-port 29500 -n 2 -- kiln train --set run.dir=/shared/runs/x");
    return [o] { return launch::run_gang(*o); };
}

}  // namespace kiln::cli
