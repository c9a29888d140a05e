// kiln compile [--config F] [--set ...] [--ranks N] [--dry-steps S]
// kiln plan --model PRESET --cluster SPEC [--tokens N] [--global-batch S] [--seq-len T]
#include <cstdint>
#include <limits>
#include <memory>

#include "cli/commands.h"
#include "compile/compile.h"
#include "compile/cost.h"
#include "core/error.h"
#include "core/progress.h"

namespace kiln::cli {
Action add_compile(CLI::App& app) {
    struct Options {
        ConfigOptions config;
        compile::CompileOptions compile;
    };
    auto o = std::make_shared<Options>();
    CLI::Option* ranks = app.add_option("--ranks", o->compile.ranks,
                                        "ranks of the run (default: parallel.tp x parallel.pp)");
    app.add_option("--dry-steps", o->compile.dry_steps, "steps of the dry run (0: none)")
        ->capture_default_str();
    add_config_options(app, o->config);
    return [o, ranks] {
        // 0 stands for the default only when --ranks is not given.
        if (ranks->count() > 0)
            check_flag("--ranks", o->compile.ranks, 1, INT32_MAX, "a number of ranks, 1 or more");
        check_flag("--dry-steps", o->compile.dry_steps, 0, 100000,
                   "a number of steps from 0 (no dry run) to 100000");
        train::RunConfig config;
        std::string yaml = resolve_config(config, o->config);
        if (checked_only(o->config, yaml))
            return 0;
        compile::compile(config, yaml, o->compile);
        return 0;
    };
}

Action add_plan(CLI::App& app) {
    struct Options {
        ConfigOptions config;
        std::string model = "llama2-7b", cluster;
        double tokens = 0;
        int64_t global_batch = 256, seq_len = 4096;
        int show = 8;
        bool fixed = false;
    };
    auto o = std::make_shared<Options>();
    std::string presets;
    for (const auto& p : compile::cluster_presets())
        presets += (presets.empty() ? "" : ", ") + p;
    app.add_option("--model", o->model, "model preset (model.* keys override it)")
        ->capture_default_str();
    app.add_option("--cluster", o->cluster,
                   "NODESxACCELERATOR (" + presets + ") or a cluster .yaml file")
        ->required();
    CLI::Option* tokens =
        app.add_option("--tokens", o->tokens, "token budget (default: the config's steps)");
    app.add_option("--global-batch", o->global_batch, "sequences per optimizer step")
        ->capture_default_str();
    app.add_option("--seq-len", o->seq_len, "tokens per sequence")->capture_default_str();
    app.add_option("--show", o->show, "layouts to list")->capture_default_str();
    app.add_flag("--fixed", o->fixed,
                 "estimate only the config's own layout (parallel.tp, parallel.pp, parallel.sp, "
                 "train.micro_batch, train.grad_accum, train.recompute)");
    add_config_options(app, o->config);
    app.footer("Example: kiln plan --model llama2-7b --cluster 2xtrn1.32xlarge --tokens 1e10");
    return [o, tokens] {
        if (tokens->count() > 0)
            check_flag("--tokens", o->tokens, 1, std::numeric_limits<double>::max(),
                       "a number of tokens, 1 or more");
        train::RunConfig config;
        ConfigOptions c = o->config;
        c.sets.insert(c.sets.begin(), "model.preset=" + o->model);
        c.sets.push_back("train.seq_len=" + std::to_string(o->seq_len));
        // The config describes the cluster's devices, not this machine: precision stays auto.
        if (checked_only(c, resolve_config(config, c, false)))
            return 0;
        compile::Cluster cluster = compile::parse_cluster(o->cluster);
        if (o->global_batch < 1)
            throw error("--global-batch must be at least 1");
        std::printf("%s: %d node(s) x %d %s (%.3g TFLOP/s bf16, %.0f GB, efficiency %.2f)\n",
                    o->model.c_str(), cluster.nodes, cluster.device.per_node,
                    cluster.device.name.c_str(), cluster.device.peak_tflops,
                    cluster.device.memory_gb, cluster.device.efficiency);
        auto all = o->fixed ? std::vector<compile::Estimate>{compile::estimate(config, cluster)}
                            : compile::candidates(config, cluster, o->global_batch);
        if (all.empty())
            throw error(
                "no layout of {} devices divides the model's {} heads and the global "
                "batch of {}; change --global-batch or the cluster",
                cluster.devices(), config.model.n_heads, o->global_batch);
        std::printf("\n%4s %4s %4s %-3s %5s %5s %-9s %10s %5s %6s %9s %11s %6s\n", "TP", "PP", "DP",
                    "SP", "micro", "accum", "recompute", "GB/device", "fits", "bubble", "step (s)",
                    "tokens/s", "MFU");
        for (int i = 0; i < int(all.size()) && i < o->show; i++) {
            const auto& e = all[size_t(i)];
            std::printf(
                "%4d %4d %4d %-3s %5lld %5lld %-9s %10.1f %5s %5.1f%% %9.2f %11.0f %5.1f%%\n", e.tp,
                e.pp, e.dp, e.sp ? "on" : "off", static_cast<long long>(e.micro_batch),
                static_cast<long long>(e.grad_accum), e.recompute.c_str(),
                double(e.memory.total()) / 1e9, e.fits ? "yes" : "no", 100 * e.bubble, e.step_s(),
                e.tokens_per_s, 100 * e.mfu);
        }
        const auto& best = all.front();
        if (!best.fits)
            throw error(
                "no layout fits {} GB per device; use more devices, or a smaller model "
                "or sequence",
                cluster.device.memory_gb);
        double budget = o->tokens > 0 ? o->tokens
                                      : double(config.train.steps) * double(o->global_batch) *
                                            double(o->seq_len);
        std::printf(
            "\nrecommended: --set parallel.tp=%d --set parallel.pp=%d --set parallel.sp=%s --set "
            "train.micro_batch=%lld --set train.grad_accum=%lld --set train.recompute=%s on %d "
            "ranks\n"
            "  step %.2f s (compute %.2f, TP %.2f, PP %.2f, bubble %.2f = %.1f%%, DP %.2f), "
            "%.0f tokens/s (%.0f per node), MFU %.1f%%, %.1f GB per device\n  %.3g tokens in %s\n",
            best.tp, best.pp, best.sp ? "true" : "false", static_cast<long long>(best.micro_batch),
            static_cast<long long>(best.grad_accum), best.recompute.c_str(), cluster.devices(),
            best.step_s(), best.compute_s, best.tp_s, best.pp_s, best.bubble_s, 100 * best.bubble,
            best.dp_s, best.tokens_per_s, best.tokens_per_s / cluster.nodes, 100 * best.mfu,
            double(best.memory.total()) / 1e9, budget,
            human_duration(budget / best.tokens_per_s).c_str());
        return 0;
    };
}

}  // namespace kiln::cli
