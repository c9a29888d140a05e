#pragma once
// One function per subcommand; each registers its flags on a CLI11 subcommand and returns the
// action to run when that subcommand is chosen.
#include <CLI/CLI.hpp>

#include <functional>

namespace kiln::cli {

using Action = std::function<int()>;

Action add_train(CLI::App& app);
Action add_eval(CLI::App& app);
Action add_export(CLI::App& app);

}  // namespace kiln::cli
