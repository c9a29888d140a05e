// kiln run [--out DIR] [--config F] [--set ...]: the embedded default job, end to end on this
// machine: train the tiny preset on the built-in synthetic stream, evaluate nothing yet, export a
// Hugging Face folder. Rerunning reuses what is done (training resumes from its checkpoint).
#include <memory>

#include "cli/commands.h"
#include "core/log.h"
#include "export/hf.h"
#include "train/trainer.h"

namespace kiln::cli {

namespace {

// The embedded default: a few minutes of `tiny` on this machine.
train::RunConfig run_defaults(const std::string& out) {
    train::RunConfig c;
    c.train.steps = 300;
    c.train.checkpoint_every = 100;
    c.schedule.warmup_steps = 30;
    c.schedule.lr = 1e-3;
    c.schedule.min_lr = 1e-4;
    c.run_dir = out + "/train";
    return c;
}

}  // namespace

Action add_run(CLI::App& app) {
    struct Options {
        std::string out = "runs/default";
        std::string config_file;
        std::vector<std::string> sets;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--out", o->out, "folder for everything the job writes");
    add_config_options(app, o->config_file, o->sets, run_defaults("OUT"));
    return [o] {
        train::RunConfig config = run_defaults(o->out);
        std::string yaml = resolve_config(config, o->config_file, o->sets);
        log::info("run", "stage 1/2: train {} on {} for {} steps in {}", config.model.preset,
                  config.data_source, config.train.steps, config.run_dir);
        train::TrainResult r = train::train(config, yaml);
        std::string hf = o->out + "/hf";
        log::info("run", "stage 2/2: export {} to {}", r.checkpoint, hf);
        exporter::export_hf(r.checkpoint, hf, "float32");
        std::printf("done: loss %.4f -> %.4f; checkpoint %s; Hugging Face folder %s\n",
                    r.first_loss, r.last_loss, r.checkpoint.c_str(), hf.c_str());
        return 0;
    };
}

}  // namespace kiln::cli
