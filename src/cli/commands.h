#pragma once
// One function per subcommand; each registers its flags on a CLI11 subcommand and returns the
// action to run when that subcommand is chosen.
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "train/config.h"

namespace kiln::cli {

using Action = std::function<int()>;

// --config FILE, --set key=value..., --check: how every command that reads the config takes it.
struct ConfigOptions {
    std::string file;
    std::vector<std::string> sets;
    bool check = false;  // check the config, print it resolved, and do nothing else
};
// Applies --config FILE then every --set to `config` (whose fields hold the defaults), checks
// it, settles what depends on this machine (train.precision auto; not for a config that describes
// other machines), sets the log level, and returns the resolved YAML for the run folder.
std::string resolve_config(train::RunConfig& config, const ConfigOptions& options,
                           bool for_this_machine = true);
// Adds the options, and the list of config keys with `defaults` to the help footer.
void add_config_options(CLI::App& app, ConfigOptions& options, train::RunConfig defaults = {});
// With --check: prints the resolved YAML and returns true (the command then stops, exit 0).
bool checked_only(const ConfigOptions& options, const std::string& yaml);
// A numeric flag's value, checked where its command starts (CLI11 has parsed it, but takes any
// number, NaN and negatives included): throws Error, one sentence naming the flag and the value,
// unless `value` is a finite number from `lo` to `hi`; `expected` says what the flag holds and its
// range, e.g. "a number of seconds, 0 or more".
void check_flag(const std::string& flag, double value, double lo, double hi,
                const std::string& expected);
// --precision and --backend of the commands that run a checkpoint (eval, sample).
void add_kernel_options(CLI::App& app, std::string& precision, std::string& backend);

// The value of data.<key> in the config.yaml of the run folder that holds `checkpoint` (a run
// folder, or one of its checkpoints/step-N folders); "" when there is none.
std::string run_data_key(const std::string& checkpoint, const std::string& key);
// The tokenizer a run trained with (data.tokenizer); throws Error saying to give --tokenizer.
std::string run_tokenizer(const std::string& checkpoint);

Action add_train(CLI::App& app);
Action add_eval(CLI::App& app);
Action add_export(CLI::App& app);
Action add_run(CLI::App& app);
Action add_data(CLI::App& app);
Action add_tokenizer(CLI::App& app);
Action add_launch(CLI::App& app);
Action add_serve(CLI::App& app);
Action add_sample(CLI::App& app);
Action add_compile(CLI::App& app);
Action add_plan(CLI::App& app);
Action add_submit(CLI::App& app);
Action add_status(CLI::App& app);
Action add_logs(CLI::App& app);
Action add_stop(CLI::App& app);

}  // namespace kiln::cli
