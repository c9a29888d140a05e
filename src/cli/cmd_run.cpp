// kiln run [--out DIR] [--ranks N] [--corpus PATH...] [--config F] [--set ...]: the embedded
// default job, end to end on this machine, with the dashboard up:
//   data     the built-in corpus -> a trained tokenizer -> packed shards
//   compile  the layout and the per-rank memory plan, checked before training starts
//   train    `tiny` on N local ranks (kiln launch: DP, or TP with parallel.tp), checkpoints and
//            gang restarts on
//   sample   a few lines from the trained model
//   export   a Hugging Face folder, and model.gguf beside it for llama.cpp
// Every stage reuses what an earlier run of the same job finished (the data set, the tokenizer,
// training checkpoints); each can be rerun alone with the config written to OUT/config.yaml.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint.h"
#include "cli/commands.h"
#include "compile/compile.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/build.h"
#include "data/tokenizer.h"
#include "export/gguf_export.h"
#include "export/hf.h"
#include "launch/supervisor.h"
#include "train/metrics.h"
#include "train/sample.h"

namespace kiln::cli {

void train_tokenizer_on(const std::vector<std::string>& corpus, const data::DataConfig& config,
                        int vocab_size, int threads, const std::string& out, bool force);

namespace {

// The embedded default: `tiny` on the built-in stories with a 512-piece tokenizer trained on
// them, 120 steps of 2 ranks x 4 x 256 tokens (246K tokens): the loss flattens near 0.58 by
// then (1.2M tokens only reach 0.57), and it stays within minutes on any CPU, bf16 or fp32. The
// same steps on every machine, so that runs compare. The 24-step warmup keeps the jump the loss
// takes when the model starts to read context (near 4.6, the corpus's unigram entropy) small.
train::RunConfig run_defaults(const std::string& out) {
    train::RunConfig c;
    c.model.vocab_size = 512;
    c.data.source = out + "/data";
    c.data.tokenizer = out + "/data/tokenizer.model";
    c.data.seq_len = 256;
    c.train.seq_len = 256;
    c.train.micro_batch = 4;
    c.train.steps = 120;
    c.train.checkpoint_every = 40;
    c.schedule.warmup_steps = 24;
    c.schedule.lr = 2e-3;
    c.schedule.min_lr = 2e-4;
    c.run_dir = out + "/train";
    return c;
}

// `kiln serve` on the job's folder, as a child that dies with this process.
struct Dashboard {
    pid_t pid = -1;
    ~Dashboard() {
        if (pid > 0) {
            ::kill(pid, SIGTERM);
            ::waitpid(pid, nullptr, 0);
        }
    }
    void start(const std::string& runs, int port) {
        std::string log = runs + "/dashboard.log";
        std::vector<std::string> args = {"/proc/self/exe",    "serve", "--runs", runs, "--port",
                                         std::to_string(port)};
        std::vector<char*> argv;
        for (auto& a : args)
            argv.push_back(a.data());
        argv.push_back(nullptr);
        pid = ::fork();
        if (pid == 0) {
            ::prctl(PR_SET_PDEATHSIG, SIGTERM);
            int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
            ::dup2(fd, STDOUT_FILENO);
            ::dup2(fd, STDERR_FILENO);
            ::execv(argv[0], argv.data());
            ::_exit(127);
        }
    }
};

}  // namespace

Action add_run(CLI::App& app) {
    struct Options {
        std::string out = "runs/default";
        std::vector<std::string> corpus = {"builtin:stories:20000"};
        int ranks = 2, port = 8265, samples = 3, max_failures = 2;
        bool no_dashboard = false;
        ConfigOptions config;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--out", o->out, "folder for everything the job writes")->capture_default_str();
    app.add_option("--corpus", o->corpus, "text to train on (default: builtin:stories:20000)");
    app.add_option("--ranks", o->ranks, "local training ranks (DP x TP, with parallel.tp)")
        ->check(CLI::Range(1, 64))
        ->capture_default_str();
    app.add_option("--max-failures", o->max_failures, "gang restarts from the last checkpoint")
        ->capture_default_str();
    app.add_option("--port", o->port, "dashboard port (a free one if it is taken)")
        ->capture_default_str();
    app.add_flag("--no-dashboard", o->no_dashboard, "do not start the dashboard");
    app.add_option("--samples", o->samples, "lines of text to sample at the end")
        ->capture_default_str();
    add_config_options(app, o->config, run_defaults("OUT"));
    return [o] {
        train::RunConfig config = run_defaults(o->out);
        std::string yaml = resolve_config(config, o->config);
        if (checked_only(o->config, yaml))
            return 0;
        if (o->ranks % config.tp != 0)
            throw error("--ranks {} is not a multiple of parallel.tp={}", o->ranks, config.tp);
        config.model.validate(int(config.tp));
        const std::string& model = config.data.tokenizer;
        fs::make_dirs(o->out);
        // The resolved config: `kiln train --config OUT/config.yaml` reruns the training stage.
        fs::write_file_atomic(o->out + "/config.yaml", yaml);

        Dashboard dashboard;
        if (!o->no_dashboard) {
            int port = launch::port_free(o->port) ? o->port : launch::free_port();
            dashboard.start(o->out, port);
            std::printf("dashboard: http://127.0.0.1:%d/#run=train\n", port);
            std::fflush(stdout);
        }

        log::info("run", "stage 1/5: data from {} into {}", o->corpus.front(), config.data.source);
        if (std::filesystem::exists(model)) {
            log::info("run", "reusing tokenizer {}", model);
        } else {
            std::filesystem::create_directories(config.data.source);
            train_tokenizer_on(o->corpus, config.data, int(config.model.vocab_size),
                               int(config.train.threads), model, false);
        }
        data::Tokenizer tokenizer(model);
        data::BuildResult built =
            data::build_dataset(o->corpus, tokenizer, config.data.source, config.data, false);
        if (built.reused)
            log::info("run", "reusing the data set in {}", config.data.source);

        log::info("run", "stage 2/5: compile: the layout and the memory plan of {} ranks",
                  o->ranks);
        log::info("run", "precision: {}", config.train.precision_why);
        compile::CompileOptions plan;
        plan.ranks = o->ranks;
        plan.dry_steps = 0;  // the training itself follows
        compile::compile(config, yaml, plan);

        log::info("run", "stage 3/5: train {} for {} steps on {} ranks in {}", config.model.preset,
                  config.train.steps, o->ranks, config.run_dir);
        launch::LaunchOptions gang;
        gang.ranks = o->ranks;
        gang.max_failures = o->max_failures;
        gang.hang_timeout_s = 300;
        gang.command = {"kiln", "train", "--config", o->out + "/config.yaml"};
        if (launch::run_gang(gang) != 0)
            throw error("training failed; its logs are {}/rank-N.log", config.run_dir);
        auto metrics = train::read_metrics(checkpoint::RunDir{config.run_dir}.metrics());
        double first = metrics.empty() ? 0 : metrics.front().loss;
        double last = metrics.empty() ? 0 : metrics.back().loss;
        auto checkpoint = checkpoint::latest(checkpoint::RunDir{config.run_dir});
        if (!checkpoint)
            throw error("training left no checkpoint in {}", config.run_dir);

        log::info("run", "stage 4/5: {} samples from {}", o->samples, *checkpoint);
        train::Sampler sampler(*checkpoint);
        bool stories = o->corpus.front().rfind("builtin:stories", 0) == 0;
        for (int s = 0; s < o->samples; s++) {
            train::SampleOptions opt;
            opt.tokens = 48;
            opt.seed = uint64_t(s) + 1;
            std::string text = sampler.text(tokenizer, stories ? "Once upon a time" : "", opt);
            std::printf("sample %d: %s\n", s + 1, text.c_str());
            std::fflush(stdout);
        }

        std::string hf = o->out + "/hf";
        std::string gguf = o->out + "/model.gguf";
        log::info("run", "stage 5/5: export {} to {} and {}", *checkpoint, hf, gguf);
        exporter::export_hf(*checkpoint, hf, "float32", model, true);  // a rerun replaces it
        exporter::GgufExportOptions g;
        g.tokenizer = model;
        g.data_fingerprint = exporter::data_fingerprint(config.data.source);
        g.force = true;  // as the HF folder's files
        exporter::export_gguf(*checkpoint, gguf, g);
        std::printf(
            "done: loss %.4f -> %.4f; checkpoint %s; Hugging Face folder %s; llama.cpp file %s\n",
            first, last, checkpoint->c_str(), hf.c_str(), gguf.c_str());
        return 0;
    };
}

}  // namespace kiln::cli
