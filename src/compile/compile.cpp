#include "compile/compile.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "launch/supervisor.h"
#include "train/memory.h"
#include "train/metrics.h"

namespace kiln::compile {
namespace {

using json = nlohmann::json;
namespace stdfs = std::filesystem;

double median(std::vector<double> v) {
    if (v.empty())
        return 0;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

}  // namespace

json compile(const train::RunConfig& config, const std::string& yaml, const CompileOptions& o) {
    const int ranks = o.ranks > 0 ? o.ranks : int(config.tp * config.pp);
    train::MemoryPlan plan = train::memory_plan(config, ranks);  // throws unless tp x pp divides
    const int dp = ranks / int(config.tp * config.pp);
    const train::MemoryLimit limit = train::memory_limit(config, 1);
    std::printf(
        "layout: %d ranks = DP %d x PP %lld x TP %lld%s, ZeRO-%lld, micro-batch %lld x %lld "
        "tokens, grad accumulation %lld, recompute %s, %s\n",
        ranks, dp, static_cast<long long>(config.pp), static_cast<long long>(config.tp),
        config.sp ? " with SP" : "", static_cast<long long>(config.zero),
        static_cast<long long>(config.train.micro_batch),
        static_cast<long long>(config.train.seq_len),
        static_cast<long long>(config.train.grad_accum), config.train.recompute.c_str(),
        config.train.precision.c_str());
    std::printf("memory plan per rank (limit %.1f GiB, %s):\n%s", double(limit.bytes) / (1 << 30),
                limit.source.c_str(), plan.table().c_str());
    std::fflush(stdout);
    train::check_fits(plan, limit, config);

    json report;
    report["ranks"] = ranks;
    report["dp"] = dp;
    report["tp"] = config.tp;
    report["pp"] = config.pp;
    report["sp"] = config.sp;
    report["memory_plan_bytes"] = {{"params", plan.params},
                                   {"params_bf16", plan.params_bf16},
                                   {"grads", plan.grads},
                                   {"optimizer", plan.optimizer},
                                   {"activations", plan.activations},
                                   {"checkpoint", plan.checkpoint},
                                   {"communication", plan.communication},
                                   {"runtime", plan.runtime},
                                   {"total", plan.total()}};
    report["memory_limit_bytes"] = limit.bytes;
    report["config_xxh64"] = fmt::format("{:016x}", fs::xxh64(yaml.data(), yaml.size()));

    // The dry run: the real training, a few steps, on this machine's ranks.
    const int64_t machine = train::machine_memory();
    const int64_t tokens_per_step =
        config.train.micro_batch * config.train.seq_len * config.train.grad_accum * dp;
    if (o.dry_steps <= 0) {
        report["dry_run"] = {{"skipped", "--dry-steps 0"}};
    } else if (plan.total() * ranks > machine) {
        std::string why =
            fmt::format("the dry run needs {} ranks x {:.1f} GiB here, this machine has {:.1f} GiB",
                        ranks, double(plan.total()) / (1 << 30), double(machine) / (1 << 30));
        std::printf("dry run skipped: %s (kiln plan forecasts the cluster)\n", why.c_str());
        report["dry_run"] = {{"skipped", why}};
    } else {
        char pattern[] = "/tmp/kiln-compile-XXXXXX";
        if (::mkdtemp(pattern) == nullptr)
            throw error("cannot make a folder in /tmp for the dry run");
        const std::string dir = pattern;
        {
            std::ofstream out(dir + "/config.yaml");
            out << yaml;
        }
        launch::LaunchOptions gang;
        gang.ranks = ranks;
        gang.command = {"kiln",     "train",
                        "--config", dir + "/config.yaml",
                        "--set",    "data.source=synthetic",
                        "--set",    fmt::format("train.steps={}", o.dry_steps),
                        "--set",    "train.log_every=1",
                        "--set",    fmt::format("train.checkpoint_every={}", o.dry_steps + 1),
                        "--set",    "run.dir=" + dir + "/run"};
        std::printf("dry run: %d steps of synthetic data on %d local ranks\n", o.dry_steps, ranks);
        std::fflush(stdout);
        auto start = std::chrono::steady_clock::now();
        int rc = launch::run_gang(gang);
        double wall = seconds_since(start);
        if (rc != 0) {
            stdfs::remove_all(dir);
            throw error(
                "the dry run failed (above: the ranks' own words); the config cannot train");
        }
        std::vector<double> tps, mfu;
        double first_step = 0;
        for (const train::StepMetrics& m : train::read_metrics(dir + "/run/metrics.jsonl")) {
            if (m.step == 1) {
                first_step = m.elapsed_s;
            } else {
                tps.push_back(m.tokens_per_s);
                mfu.push_back(m.mfu);
            }
        }
        // The dry run tuned the products into the plan cache the run will find (or found it).
        json tuned = json::parse(fs::read_file(dir + "/run/autotune.json"), nullptr, false);
        if (tuned.is_object()) {
            report["autotune"] = tuned;
            const std::string outcome = tuned.value("outcome", "");
            if (outcome == "hit") {
                std::printf("plan cache: hit, %d products (%s)\n", tuned.value("products", 0),
                            tuned.value("cache", "").c_str());
            } else if (outcome != "off") {
                std::printf("plan cache: %s; tuned %d products in %.1f s into %s\n",
                            outcome.c_str(), tuned.value("products", 0),
                            tuned.value("tuned_s", 0.0), tuned.value("cache", "").c_str());
            }
        }
        int64_t peak = 0;
        for (const auto& e : stdfs::directory_iterator(dir + "/run/ranks")) {
            json r = json::parse(fs::read_file(e.path().string()), nullptr, false);
            if (r.is_object())
                peak = std::max<int64_t>(peak, r.value("peak_rss_bytes", int64_t(0)));
        }
        stdfs::remove_all(dir);
        double rate = median(tps);
        double forecast = rate > 0 ? double(config.train.steps * tokens_per_step) / rate : 0;
        report["dry_run"] = {{"steps", o.dry_steps},       {"wall_s", wall},
                             {"first_step_s", first_step}, {"tokens_per_s", rate},
                             {"mfu", median(mfu)},         {"peak_rss_bytes", peak},
                             {"forecast_s", forecast}};
        std::printf(
            "dry run: %.0f tokens/s, MFU %.1f%%, first step %.2f s, peak memory %.0f MiB per rank "
            "(plan %.0f MiB)\n",
            rate, 100 * median(mfu), first_step, double(peak) / (1 << 20),
            double(plan.total()) / (1 << 20));
        std::printf("forecast: %lld steps x %lld tokens = %.3g tokens in %s on this machine\n",
                    static_cast<long long>(config.train.steps),
                    static_cast<long long>(tokens_per_step),
                    double(config.train.steps * tokens_per_step), human_duration(forecast).c_str());
    }
    if (!config.run_dir.empty()) {
        fs::make_dirs(config.run_dir);
        fs::write_file_atomic(config.run_dir + "/compile.json", report.dump(2) + "\n");
        std::printf("report: %s/compile.json\n", config.run_dir.c_str());
    }
    return report;
}

}  // namespace kiln::compile
