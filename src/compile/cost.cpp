#include "compile/cost.h"

#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <map>

#include "core/config.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/threads.h"
#include "kernels/backends.h"
#include "kernels/cpu/cpu.h"
#include "model/layout.h"
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
        {"p5.48xlarge", {"H100 SXM", 989, 80, 0.45, 8, 450, 50, 10, false, "cuda"}},
        // 8 x H200 SXM: same compute as H100, 141 GB HBM3e.
        {"h200", {"H200 SXM", 989, 141, 0.45, 8, 450, 50, 10, false, "cuda"}},
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
    // kiln's MFU against this peak for tiny on one core a rank (bench/plan_bench.sh, DP 2's
    // step). tiny's step runs at about the same rate on every CPU measured, 280-310 GFLOP/s a
    // core, while the product peak does not: AMD EPYC with avx512_bf16 (peak 0.42 TFLOP/s),
    // 0.67 (2026-12-05); Xeons with AMX, 0.57 at a peak of 0.53 (2026-11-29) and 0.45 at 0.68
    // (2026-12-06). Earlier fits: 0.42 before the kernels got faster, 0.66 while the
    // collectives' cost went partly into it, 0.72 while the peak timed the operands' rounding.
    a.efficiency = kernels::cpu::cpu_info().isa.find("amx") != std::string::npos ? 0.45 : 0.67;
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

// The keys a cluster file may hold (docs/plan.md).
const std::vector<std::string> kClusterKeys = {"name",       "peak_tflops", "memory_gb",
                                               "per_node",   "intra_gbps",  "inter_gbps",
                                               "efficiency", "backend",     "nodes"};

// The most nodes, and devices a node, a cluster may have: past any built (the largest hold tens
// of thousands of accelerators), and their product stays within an int.
constexpr int64_t kMaxNodes = 65536, kMaxPerNode = 4096;

// A cluster file's value of `key` as T; an Error naming the file and the key when it is not one.
template <typename T>
T field(const YAML::Node& y, const char* key, const std::string& file, const char* what) {
    try {
        return y[key].as<T>();
    } catch (const YAML::Exception&) {
        throw error("{}: {} is not {}", file, key, what);
    }
}

double positive_field(const YAML::Node& y, const char* key, const std::string& file) {
    if (!y[key])
        throw error("{}: the cluster has no {}", file, key);
    double v = field<double>(y, key, file, "a number");
    if (!(v > 0) || !std::isfinite(v))
        throw error("{}: {} must be positive, not {}", file, key, v);
    return v;
}

// A positive whole number up to `most`, as a count.
int count_field(const YAML::Node& y, const char* key, const std::string& file, int64_t most) {
    const double v = positive_field(y, key, file);
    if (v != std::floor(v) || v > double(most))
        throw error("{}: {} must be a whole number from 1 to {}, not {}", file, key, most, v);
    return int(v);
}

// FLOPs per token of pipeline stage `stage` of `pp`: its blocks' products and attention, the LM
// head on the last stage, and the forward work recompute reruns in the blocks (the attention
// scores for selective, the whole block for full). Summed over the stages without recompute:
// train::flops_per_token, the count MFU is reported in.
double stage_flops_per_token(const model::LlamaConfig& m, int64_t T, int pp, int stage,
                             const std::string& recompute) {
    const double C = double(m.dim), D = double(m.head_dim()), F = double(m.ffn_dim());
    const double block_params =
        C * double(m.n_heads + 2 * m.n_kv_heads) * D + double(m.n_heads) * D * C + 3 * C * F;
    const auto [first, last] = model::Layout::stage_layers(m.n_layers, pp, stage);
    const double L = double(last - first);
    double blocks = L * (6 * block_params + 12 * C * double(T));
    if (recompute == "full")
        blocks *= 4.0 / 3.0;
    else if (recompute == "selective")
        blocks += 2 * L * C * double(T);
    return blocks + (stage == pp - 1 ? 6 * double(m.vocab_size) * C : 0.0);
}

// Seconds of one block's tensor-parallel collectives for one micro-batch of `rows` rows. Without
// SP: an all-reduce of the (rows, C) activations after each row-parallel product in the forward
// and of each input gradient in the backward, in f32 or, with `wire_bf16`
// (parallel.tp_wire), bf16. With SP: a reduce-scatter (the same dtype) instead of each of those
// four, and an all-gather in the compute precision before each column-parallel product (2), of
// the output gradient before each row-parallel product's backward (2), and of the two norms'
// outputs again in the backward, which SP gathers instead of keeping them. Full recompute
// reruns the forward's collectives. With `overlap` (parallel.tp_overlap on an accelerator, where
// a collective runs beside the kernels: Collective::start), the backward of each column-parallel
// product (qkv, w13) runs the norm's gather beside its input gradient's product and that gradient's
// sum beside its weight gradient's product: of those four (two without SP) only what the product
// cannot hide shows. `product_s` is one such product's seconds for qkv and for w13.
double block_tp_seconds(const Accelerator& a, int tp, bool sp, bool bf16, bool wire_bf16, bool full,
                        double rows, int64_t C, bool overlap,
                        const std::array<double, 2>& product_s) {
    if (tp == 1)
        return 0;
    const double ring = double(tp - 1) / tp, bw = a.intra_gbps * 1e9, latency = a.latency_us * 1e-6;
    const double sums = rows * double(C) * (wire_bf16 ? 2 : 4);
    const double compute = rows * double(C) * (bf16 ? 2 : 4);
    const double sum = (sp ? 1 : 2) * ring * sums / bw + latency;
    const double gather = ring * compute / bw + latency;
    double seconds = sp ? (full ? 6 : 4) * sum + (full ? 8 : 6) * gather : (full ? 6 : 4) * sum;
    if (overlap) {
        for (double product : product_s)
            seconds -= std::min(sum, product) + (sp ? std::min(gather, product) : 0.0);
    }
    return seconds;
}

// Whether some pipeline's stages sit on different nodes: a pipeline is tp x pp consecutive ranks
// (TP innermost, then PP, then DP), so one of its stage boundaries may fall on a node's edge.
bool pipeline_spans_nodes(const Cluster& c, int tp, int pp) {
    const int span = tp * pp, per_node = c.device.per_node;
    for (int first = 0; first < c.devices(); first += span) {
        if (first / per_node != (first + span - 1) / per_node)
            return true;
    }
    return false;
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
    const size_t x = spec.find_first_of("x*");
    // "N x NAME": the node count given before the name (it wins over a file's `nodes`).
    const bool counted = x != std::string::npos && x > 0 &&
                         std::all_of(spec.begin(), spec.begin() + long(x), [](char ch) {
                             return std::isdigit(static_cast<unsigned char>(ch)) || ch == ' ';
                         });
    if (counted) {
        std::string digits = spec.substr(0, x);
        digits.erase(std::remove(digits.begin(), digits.end(), ' '), digits.end());
        int64_t nodes = 0;
        const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), nodes);
        if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size() ||
            nodes < 1 || nodes > kMaxNodes)
            throw error("cluster {}: the node count {} is out of range (1 to {})", spec, digits,
                        kMaxNodes);
        c.nodes = int(nodes);
        name = spec.substr(x + 1);
        name.erase(0, name.find_first_not_of(' '));
    }
    if (name.size() > 5 && (name.ends_with(".yaml") || name.ends_with(".yml"))) {
        YAML::Node y;
        try {
            y = YAML::LoadFile(name);
        } catch (const YAML::Exception& e) {
            throw error("cannot read cluster file {}: {}", name, e.what());
        }
        if (!y.IsMap())
            throw error("{}: a cluster file is a mapping of keys (name, peak_tflops, ...)", name);
        // A misspelt key would otherwise leave its default in place unsaid.
        for (const auto& kv : y) {
            std::string key;
            try {
                key = kv.first.as<std::string>();
            } catch (const YAML::Exception&) {
                throw error("{}: a key at line {} is not a word", name, kv.first.Mark().line + 1);
            }
            if (std::find(kClusterKeys.begin(), kClusterKeys.end(), key) == kClusterKeys.end()) {
                const std::string hint = kiln::closest_key(key, kClusterKeys);
                throw error("{}: unknown cluster key '{}'{}", name, key,
                            hint.empty() ? " (docs/plan.md lists the keys)"
                                         : fmt::format(" (did you mean '{}'?)", hint));
            }
        }
        Accelerator& a = c.device;
        a.name = y["name"] ? field<std::string>(y, "name", name, "a string") : name;
        a.peak_tflops = positive_field(y, "peak_tflops", name);
        a.memory_gb = positive_field(y, "memory_gb", name);
        a.per_node = count_field(y, "per_node", name, kMaxPerNode);
        a.intra_gbps = positive_field(y, "intra_gbps", name);
        a.inter_gbps = y["inter_gbps"] ? positive_field(y, "inter_gbps", name) : a.intra_gbps;
        a.efficiency = y["efficiency"] ? positive_field(y, "efficiency", name) : 0.4;
        if (a.efficiency > 1)
            throw error("{}: efficiency is a share of peak (0-1), not {}", name, a.efficiency);
        if (y["backend"]) {
            a.backend = field<std::string>(y, "backend", name, "a string");
            if (a.backend != "cpu" && a.backend != "cuda")
                throw error(
                    "{}: backend is cpu or cuda (the kernels whose memory is planned), "
                    "not {}",
                    name, a.backend);
        }
        if (y["nodes"] && !counted)  // not `x` alone: a file's path may hold an x
            c.nodes = count_field(y, "nodes", name, kMaxNodes);
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
    if (!cluster.device.host) {
        config.train.backend = cluster.device.backend;
        if (config.train.precision == "auto")
            config.train.precision = "bf16";
    }
    const bool bf16 = train::compute_precision(config.train) == kernels::Precision::bf16;
    Estimate e;
    const int world = cluster.devices();
    e.tp = int(config.tp);
    e.pp = int(config.pp);
    e.sp = config.sp;
    if (world % (e.tp * e.pp) != 0) {
        throw error("parallel.tp={} x parallel.pp={} does not divide the cluster's {} devices",
                    e.tp, e.pp, world);
    }
    config.validate();  // SP's rows, stages no more than layers, heads divisible by TP
    e.dp = world / (e.tp * e.pp);
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
    const Accelerator& a = cluster.device;
    const int64_t T = config.train.seq_len;
    const double rows = double(e.micro_batch * T), micro = double(e.grad_accum);
    // Each stage boundary carries the fp32 activation forward and its gradient back; each TP rank
    // sends its own rows (1/tp of them under SP).
    double p2p = 0;
    if (e.pp > 1) {
        const double bytes = rows / (e.sp ? e.tp : 1) * double(m.dim) * 4;
        const double bw = pipeline_spans_nodes(cluster, e.tp, e.pp) ? a.inter_gbps : a.intra_gbps;
        p2p = 2 * (bytes / (bw * 1e9) + a.latency_us * 1e-6);
    }
    // One micro-batch's forward and backward on each stage. 1F1B runs the slowest stage's m
    // micro-batches back to back; the pipeline fills and drains through the others first and
    // after, which is the bubble: (pp-1)/(m+pp-1) of the pipelined time when the stages are
    // equal. A stage that is lighter (no head) shortens it: the last of 2 stages of `tiny`, its
    // head 57% of the FLOPs, ran 4 micro-batches in 2.1 s while the first waited 1.5 s of them.
    const double rate = e.tp * a.peak_tflops * 1e12 * a.efficiency;  // FLOP/s of a TP group
    const double ffn_width = 2 * double(m.ffn_dim()), qkv_width = double(m.qkv_dim());
    const double block_tp = block_tp_seconds(
        a, e.tp, e.sp, bf16, config.bf16_wire(), e.recompute == "full", rows, m.dim,
        !a.host && config.tp_overlapped(true),
        {2 * rows * double(m.dim) * qkv_width / rate, 2 * rows * double(m.dim) * ffn_width / rate});
    double slowest = 0, all_stages = 0, slowest_compute = 0, slowest_tp = 0;
    for (int s = 0; s < e.pp; s++) {
        const auto [first, last] = model::Layout::stage_layers(m.n_layers, e.pp, s);
        const double compute = rows * stage_flops_per_token(m, T, e.pp, s, e.recompute) / rate;
        const double tp = double(last - first) * block_tp;
        all_stages += compute + tp + p2p;
        if (compute + tp + p2p > slowest) {
            slowest = compute + tp + p2p;
            slowest_compute = compute;
            slowest_tp = tp;
        }
    }
    e.compute_s = micro * slowest_compute;
    e.tp_s = micro * slowest_tp;
    e.pp_s = micro * p2p;
    e.bubble_s = all_stages - slowest;
    e.bubble = e.bubble_s / (micro * slowest + e.bubble_s);
    if (e.dp > 1) {
        // The largest stage's TP shard (the embedding or the head rides on an end stage). With
        // TP and PP innermost, a DP group of more than one rank spans every node.
        double params = 0;
        for (int s = 0; s < e.pp; s++)
            params = std::max(params, double(model::Layout(m, e.tp, 0, e.pp, s).total()));
        const double bw = (cluster.nodes > 1 ? a.inter_gbps : a.intra_gbps) * 1e9;
        const double ring = double(e.dp - 1) / e.dp;
        // ZeRO-1 all-gathers the weights the steps read (the bf16 copy in bf16) after the
        // update; nothing hides it.
        const double gather = config.zero == 1 ? ring * params * (bf16 ? 2 : 4) / bw : 0;
        // The fp32 gradients' sum.
        if (const int64_t bucket = config.dp_bucket(!cluster.device.host)) {
            // During the last micro-batch's backward (parallel.dp_overlap), each region as
            // soon as it is final: a reduce to its shard's owner under ZeRO-1 (a ring carries
            // it over each link once), an all-reduce without (twice). What shows is what the
            // slowest stage's backward of one micro-batch (2/3 of its work, 3/4 with full
            // recompute) cannot hide, and at least what is final only at the end: the first
            // stage's embedding, its backward's last product, and one bucket.
            const double sum = (config.zero == 1 ? 1 : 2 * ring) * params * 4 / bw;
            const double backward = (e.recompute == "full" ? 0.75 : 2.0 / 3) * slowest;
            const double last_region = double(m.vocab_size) / e.tp * double(m.dim) + double(bucket);
            const double tail =
                std::min(sum, (config.zero == 1 ? 1 : 2 * ring) * last_region * 4 / bw);
            e.dp_s = gather + std::max(sum - backward, tail);
        } else {
            // After the backward (parallel.dp_overlap): a reduce-scatter under ZeRO-1, an
            // all-reduce without.
            e.dp_s = gather + (config.zero == 1 ? 1 : 2) * ring * params * 4 / bw;
        }
    }
    const double tokens = rows * micro * e.dp;
    e.tokens_per_s = tokens / e.step_s();
    e.mfu = train::flops_per_token(m, T) * e.tokens_per_s / (double(world) * a.peak_tflops * 1e12);
    return e;
}

std::vector<Estimate> candidates(const train::RunConfig& config, const Cluster& cluster,
                                 int64_t global_batch) {
    std::vector<Estimate> out;
    const int world = cluster.devices();
    const model::LlamaConfig& m = config.model;
    for (int tp = 1; tp <= cluster.device.per_node; tp *= 2) {
        if (world % tp != 0 || m.n_heads % tp != 0 || m.n_kv_heads % tp != 0)
            continue;
        // Powers of two: once one does not divide the devices, no larger one does.
        for (int pp = 1; pp <= m.n_layers && world % (tp * pp) == 0; pp *= 2) {
            const int dp = world / (tp * pp);
            if (global_batch % dp != 0)
                continue;
            const int64_t per_rank = global_batch / dp;
            for (int64_t mb : {1, 2, 4, 8}) {
                if (per_rank % mb != 0)
                    continue;
                for (bool sp : {false, true}) {
                    // SP splits the micro-batch's rows over the TP ranks.
                    if (sp && (tp == 1 || (mb * config.train.seq_len) % tp != 0))
                        continue;
                    for (const char* rc : {"none", "selective", "full"}) {
                        train::RunConfig c = config;
                        c.tp = tp;
                        c.pp = pp;
                        c.sp = sp;
                        c.train.micro_batch = mb;
                        c.train.grad_accum = per_rank / mb;
                        c.train.recompute = rc;
                        out.push_back(estimate(c, cluster));
                    }
                }
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
