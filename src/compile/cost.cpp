#include "compile/cost.h"

#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <map>

#include "core/error.h"
#include "core/fs.h"
#include "core/threads.h"
#include "kernels/backends.h"
#include "train/metrics.h"
#include "train/trainer.h"

namespace kiln::compile {
namespace {

// Published figures: peak dense bf16 TFLOP/s and memory per device, link bandwidth per device.
// efficiency is the share of peak that well-tuned 7B pretraining reaches on the device (the
// original recipe reports 32-38% MFU on trn1; Megatron-LM and torchtitan report ~40-50% on
// H100/H200 at this size).
const std::map<std::string, Accelerator>& presets() {
    static const std::map<std::string, Accelerator> p = {
        // 16 Trainium chips = 32 NeuronCores; 190 TFLOP/s bf16 per chip; 32 GiB HBM per chip
        // (16 per core); NeuronLink within the node, 800 Gbit/s EFA between nodes.
        {"trn1.32xlarge", {"trn1.32xlarge NeuronCore-v2", 95, 16, 0.35, 32, 48, 3.125}},
        // 8 x H100 SXM: 989 TFLOP/s bf16 dense, 80 GB, NVLink 450 GB/s per direction, 3.2 Tbit/s
        // EFA.
        {"p5.48xlarge", {"H100 SXM", 989, 80, 0.45, 8, 450, 50}},
        // 8 x H200 SXM: same compute as H100, 141 GB HBM3e.
        {"h200", {"H200 SXM", 989, 141, 0.45, 8, 450, 50}},
    };
    return p;
}

// This machine as a node of one-core devices: a rank per core, as `kiln launch` places them.
Accelerator this_machine() {
    Accelerator a;
    a.name = "CPU core of this machine";
    const int threads = num_threads();
    set_num_threads(1);
    a.peak_tflops =
        train::measure_peak_gflops("cpu", kernels::resolve_precision("cpu", "auto").precision) /
        1000.0;
    set_num_threads(threads);
    a.per_node = int(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN)));
    a.memory_gb = double(train::machine_memory()) / 1e9 / a.per_node;
    // kiln's MFU against this peak for tiny on one core a rank (bench/plan_bench.sh, 2026-11-29;
    // 0.42 before the kernels got faster, 0.66 while the collectives' cost went partly into it,
    // 0.72 while the peak timed the operands' rounding to bf16 too, ~20% lower).
    a.efficiency = 0.57;
    // Ranks on one host exchange through gloo's shared-memory transport: an fp32 reduce-scatter
    // plus bf16 all-gather of small's weights ran at ~3 GB/s by this model's count (one-way
    // bytes). Each collective also waits for the other rank on these shared cores (fitted with
    // bench/plan_bench.sh). Between hosts there is no network to measure: loopback TCP's rate.
    a.intra_gbps = 3;
    a.inter_gbps = 1;
    a.latency_us = 300;
    a.host = true;
    return a;
}

double positive_field(const YAML::Node& y, const char* key, const std::string& file) {
    if (!y[key])
        throw error("{}: the cluster has no {}", file, key);
    double v = y[key].as<double>();
    if (!(v > 0))
        throw error("{}: {} must be positive, not {}", file, key, v);
    return v;
}

}  // namespace

std::vector<std::string> cluster_presets() {
    std::vector<std::string> names;
    for (const auto& [name, a] : presets())
        names.push_back(name);
    names.push_back("this");
    return names;
}

Cluster parse_cluster(const std::string& spec) {
    Cluster c;
    std::string name = spec;
    size_t x = spec.find_first_of("x*");
    if (x != std::string::npos && x > 0 &&
        std::all_of(spec.begin(), spec.begin() + long(x), [](char ch) {
            return std::isdigit(static_cast<unsigned char>(ch)) || ch == ' ';
        })) {
        c.nodes = std::atoi(spec.substr(0, x).c_str());
        name = spec.substr(x + 1);
        name.erase(0, name.find_first_not_of(' '));
        if (c.nodes < 1)
            throw error("cluster {}: the node count must be at least 1", spec);
    }
    if (name.size() > 5 && (name.ends_with(".yaml") || name.ends_with(".yml"))) {
        YAML::Node y;
        try {
            y = YAML::LoadFile(name);
        } catch (const YAML::Exception& e) {
            throw error("cannot read cluster file {}: {}", name, e.what());
        }
        Accelerator& a = c.device;
        a.name = y["name"] ? y["name"].as<std::string>() : name;
        a.peak_tflops = positive_field(y, "peak_tflops", name);
        a.memory_gb = positive_field(y, "memory_gb", name);
        a.per_node = int(positive_field(y, "per_node", name));
        a.intra_gbps = positive_field(y, "intra_gbps", name);
        a.inter_gbps = y["inter_gbps"] ? positive_field(y, "inter_gbps", name) : a.intra_gbps;
        a.efficiency = y["efficiency"] ? positive_field(y, "efficiency", name) : 0.4;
        if (a.efficiency > 1)
            throw error("{}: efficiency is a share of peak (0-1), not {}", name, a.efficiency);
        if (y["nodes"] && x == std::string::npos)
            c.nodes = int(positive_field(y, "nodes", name));
        return c;
    }
    if (name == "this") {
        c.device = this_machine();
        return c;
    }
    auto it = presets().find(name);
    if (it == presets().end()) {
        std::string known;
        for (const auto& n : cluster_presets())
            known += (known.empty() ? "" : ", ") + n;
        throw error("unknown accelerator \"{}\"; known: {} (or a cluster .yaml file)", name, known);
    }
    c.device = it->second;
    return c;
}

Estimate estimate(const train::RunConfig& given, const Cluster& cluster) {
    // The devices' precision: this machine's own choice on "this"; an accelerator multiplies
    // in bf16 unless fp32 is asked.
    train::RunConfig config = given;
    if (!cluster.device.host && config.train.precision == "auto")
        config.train.precision = "bf16";
    const bool bf16 = train::compute_precision(config.train) == kernels::Precision::bf16;
    Estimate e;
    const int world = cluster.devices();
    e.tp = int(config.tp);
    if (world % e.tp != 0)
        throw error("parallel.tp={} does not divide the cluster's {} devices", e.tp, world);
    e.dp = world / e.tp;
    e.micro_batch = config.train.micro_batch;
    e.grad_accum = config.train.grad_accum;
    e.recompute = config.train.recompute;
    e.memory = train::memory_plan(config, world);
    if (!cluster.device.host) {
        // On an accelerator the process, the checkpoint staging copy and the communication
        // library's host buffers live in host memory, not on the device.
        e.memory.runtime = e.memory.checkpoint = e.memory.communication = 0;
    }
    e.fits = double(e.memory.total()) <= cluster.device.memory_gb * 1e9;

    const model::LlamaConfig& m = config.model;
    const int64_t T = config.train.seq_len, B = e.micro_batch;
    const double tokens = double(B * T * e.grad_accum * e.dp);
    double flops = train::flops_per_token(m, T) * tokens;
    // Recompute reruns forward work: the attention scores (selective) or the whole block (full).
    if (e.recompute == "full")
        flops *= 4.0 / 3.0;
    else if (e.recompute == "selective")
        flops += 2.0 * m.n_layers * m.dim * T * tokens;
    const Accelerator& a = cluster.device;
    e.compute_s = flops / (double(world) * a.peak_tflops * 1e12 * a.efficiency);
    const double act_bytes = double(B * T * m.dim) * 4;  // fp32 activations all-reduced
    if (e.tp > 1) {
        const double calls = 4.0 * double(m.n_layers);
        double per_micro = calls * 2.0 * (e.tp - 1) / e.tp * act_bytes / (a.intra_gbps * 1e9) +
                           calls * a.latency_us * 1e-6;
        e.tp_s = per_micro * double(e.grad_accum);
    }
    if (e.dp > 1) {
        // ZeRO-1 reduce-scatters the fp32 gradients and all-gathers the weights the steps read
        // (the bf16 copy in bf16); without ZeRO the gradients are all-reduced.
        const double params = double(m.n_params()) / e.tp;
        const double bytes = config.zero == 1 ? params * (4 + (bf16 ? 2 : 4)) : params * 8;
        // The DP group spans nodes when TP does not fill a node's devices times the DP count.
        bool across = cluster.nodes > 1;
        double bw = across ? a.inter_gbps : a.intra_gbps;
        e.dp_s = double(e.dp - 1) / e.dp * bytes / (bw * 1e9);
    }
    e.tokens_per_s = tokens / e.step_s();
    e.mfu = train::flops_per_token(m, T) * e.tokens_per_s / (double(world) * a.peak_tflops * 1e12);
    return e;
}

std::vector<Estimate> candidates(const train::RunConfig& config, const Cluster& cluster,
                                 int64_t global_batch) {
    std::vector<Estimate> out;
    const int world = cluster.devices();
    for (int tp = 1; tp <= cluster.device.per_node; tp *= 2) {
        if (world % tp != 0 || config.model.n_heads % tp != 0 || config.model.n_kv_heads % tp != 0)
            continue;
        const int dp = world / tp;
        if (global_batch % dp != 0)
            continue;
        const int64_t per_rank = global_batch / dp;
        for (int64_t mb : {1, 2, 4, 8}) {
            if (per_rank % mb != 0)
                continue;
            for (const char* rc : {"none", "selective", "full"}) {
                train::RunConfig c = config;
                c.tp = tp;
                c.train.micro_batch = mb;
                c.train.grad_accum = per_rank / mb;
                c.train.recompute = rc;
                out.push_back(estimate(c, cluster));
            }
        }
    }
    std::stable_sort(out.begin(), out.end(), [](const Estimate& a, const Estimate& b) {
        if (a.fits != b.fits)
            return a.fits;
        return a.tokens_per_s > b.tokens_per_s;
    });
    return out;
}

}  // namespace kiln::compile
