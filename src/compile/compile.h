#pragma once
// `kiln compile`: everything about a training config that can be known before the cluster is
// paid for. It checks the config and the layout, prints the per-rank memory plan and refuses one
// that will not fit, dry-runs a few steps of the real training on synthetic data on this
// machine's local ranks (when they fit here), and forecasts tokens/s, MFU, peak memory and the
// wall time of the configured run. The report goes to RUN_DIR/compile.json (what the cluster's
// training job waits for).
#include <nlohmann/json.hpp>
#include <string>

#include "train/config.h"

namespace kiln::compile {

struct CompileOptions {
    int ranks = 0;      // ranks of the run (0: parallel.tp x parallel.pp, i.e. DP 1)
    int dry_steps = 4;  // optimizer steps of the dry run (0: none)
};

nlohmann::json compile(const train::RunConfig& config, const std::string& resolved_yaml,
                       const CompileOptions& options);

}  // namespace kiln::compile
