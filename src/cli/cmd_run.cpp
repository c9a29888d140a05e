// kiln run [--out DIR] [--corpus PATH...] [--config F] [--set ...]: the embedded default job,
// end to end on this machine: the built-in corpus -> a trained tokenizer -> packed shards ->
// `tiny` trained on them -> a Hugging Face folder. Every stage reuses what an earlier run of
// the same job finished (the data set, the tokenizer, training checkpoints).
#include <filesystem>
#include <memory>

#include "cli/commands.h"
#include "core/log.h"
#include "data/build.h"
#include "data/tokenizer.h"
#include "export/hf.h"
#include "train/trainer.h"

namespace kiln::cli {

void train_tokenizer_on(const std::vector<std::string>& corpus, const data::DataConfig& config,
                        int vocab_size, int threads, const std::string& out);

namespace {

// The embedded default: a few minutes of `tiny` on this machine, on the built-in stories with a
// 512-piece tokenizer trained on them.
train::RunConfig run_defaults(const std::string& out) {
    train::RunConfig c;
    c.model.vocab_size = 512;
    c.data.source = out + "/data";
    c.data.tokenizer = out + "/data/tokenizer.model";
    c.data.seq_len = 256;
    c.train.seq_len = 256;
    c.train.steps = 300;
    c.train.checkpoint_every = 100;
    c.schedule.warmup_steps = 30;
    c.schedule.lr = 2e-3;
    c.schedule.min_lr = 2e-4;
    c.run_dir = out + "/train";
    return c;
}

}  // namespace

Action add_run(CLI::App& app) {
    struct Options {
        std::string out = "runs/default";
        std::vector<std::string> corpus = {"builtin:stories:20000"};
        std::string config_file;
        std::vector<std::string> sets;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--out", o->out, "folder for everything the job writes");
    app.add_option("--corpus", o->corpus, "text to train on (default: builtin:stories:20000)");
    add_config_options(app, o->config_file, o->sets, run_defaults("OUT"));
    return [o] {
        train::RunConfig config = run_defaults(o->out);
        std::string yaml = resolve_config(config, o->config_file, o->sets);
        const std::string& model = config.data.tokenizer;

        log::info("run", "stage 1/3: data from {} into {}", o->corpus.front(), config.data.source);
        if (std::filesystem::exists(model)) {
            log::info("run", "reusing tokenizer {}", model);
        } else {
            std::filesystem::create_directories(config.data.source);
            train_tokenizer_on(o->corpus, config.data, int(config.model.vocab_size),
                               int(config.train.threads), model);
        }
        data::Tokenizer tokenizer(model);
        data::BuildResult built =
            data::build_dataset(o->corpus, tokenizer, config.data.source, config.data, false);
        if (built.reused)
            log::info("run", "reusing the data set in {}", config.data.source);

        log::info("run", "stage 2/3: train {} for {} steps in {}", config.model.preset,
                  config.train.steps, config.run_dir);
        train::TrainResult r = train::train(config, yaml);

        std::string hf = o->out + "/hf";
        log::info("run", "stage 3/3: export {} to {}", r.checkpoint, hf);
        exporter::export_hf(r.checkpoint, hf, "float32", model);
        std::printf("done: loss %.4f -> %.4f; checkpoint %s; Hugging Face folder %s\n",
                    r.first_loss, r.last_loss, r.checkpoint.c_str(), hf.c_str());
        return 0;
    };
}

}  // namespace kiln::cli
