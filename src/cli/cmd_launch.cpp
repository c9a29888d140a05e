// kiln launch -n N [--master-port P] -- kiln train ...
#include <memory>

#include "cli/commands.h"
#include "launch/supervisor.h"

namespace kiln::cli {

Action add_launch(CLI::App& app) {
    auto o = std::make_shared<launch::LaunchOptions>();
    app.add_option("-n,--ranks", o->ranks, "ranks to start on this machine")->required();
    app.add_option("--master-port", o->master_port, "rendezvous port (default: a free one)");
    app.add_option("--grace", o->grace_s, "seconds the other ranks get to stop after a failure");
    app.add_option(
        "--max-failures", o->max_failures,
        "restart the whole gang (from the newest good checkpoint) up to this many times");
    app.add_option("--hang-timeout", o->hang_timeout_s,
                   "a rank without progress for this many seconds counts as failed (0: never)");
    app.add_option("command", o->command, "the command of every rank, after --")->required();
    app.footer("Example: kiln launch -n 2 -- kiln train --set run.dir=runs/dp2");
    return [o] { return launch::run_gang(*o); };
}

}  // namespace kiln::cli
