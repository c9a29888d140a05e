#include "train/memory.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <limits>

#include "core/error.h"
#include "kernels/backends.h"
#include "model/layout.h"
#include "model/llama.h"

namespace kiln::train {
namespace {

constexpr double kMiB = 1048576.0;

// Code, shared libraries, oneDNN's JIT kernels, OpenMP and gloo threads, heap slack: measured
// on this build as the peak resident memory of a micro model (bench/RESULTS.md, memory plan).
constexpr int64_t kRuntimeBytes = int64_t(96) << 20;
// A build with CUDA maps cuBLASLt, NCCL and the CUDA runtime into every process, CPU runs too:
// the same tiny run peaked at 1162 MiB built with CUDA and 1004 MiB without (same commit).
#ifdef KILN_HAVE_CUDA
constexpr int64_t kCudaLibrariesBytes = int64_t(150) << 20;
#else
constexpr int64_t kCudaLibrariesBytes = 0;
#endif
// On a GPU: the CUDA context, cuBLASLt's and NCCL's own buffers. An estimate (about 0.5 GiB of
// context on Hopper plus NCCL's channels), not yet measured against a device.
constexpr int64_t kCudaRuntimeBytes = int64_t(1) << 30;

}  // namespace

Shards shard_layout(int64_t total, int dp, int dp_rank, bool zero) {
    Shards s;
    s.chunk = (total + dp - 1) / dp;
    s.padded = s.chunk * dp;
    s.begin = zero ? dp_rank * s.chunk : 0;
    s.end = zero ? std::min(total, (dp_rank + 1) * s.chunk) : total;
    return s;
}

int64_t machine_memory() {
    return int64_t(::sysconf(_SC_PHYS_PAGES)) * int64_t(::sysconf(_SC_PAGESIZE));
}

std::string MemoryPlan::table() const {
    const std::pair<const char*, int64_t> rows[] = {{"parameters (fp32)", params},
                                                    {"parameters (bf16 copy)", params_bf16},
                                                    {"gradients (fp32)", grads},
                                                    {"optimizer state (m, v)", optimizer},
                                                    {"activations + workspace", activations},
                                                    {"checkpoint staging", checkpoint},
                                                    {"communication buffers", communication},
                                                    {"runtime", runtime}};
    std::string out;
    for (const auto& [name, bytes] : rows) {
        out += fmt::format("  {:<26} {:>10.1f} MiB  {:>5.1f}%\n", name, double(bytes) / kMiB,
                           total() > 0 ? 100.0 * double(bytes) / double(total()) : 0.0);
    }
    out += fmt::format("  {:<26} {:>10.1f} MiB\n", "total per rank", double(total()) / kMiB);
    return out;
}

MemoryPlan memory_plan(const RunConfig& config, int world) {
    const int tp = int(config.tp), pp = int(config.pp);
    if (world < 1 || world % (tp * pp) != 0)
        throw error("parallel.tp={} x parallel.pp={} does not divide the {} ranks", tp, pp, world);
    config.model.validate(tp);
    const int dp = world / (tp * pp);
    const TrainConfig& t = config.train;
    const bool zero = config.zero == 1 && dp > 1;
    // Every backend declares the same buffers; only the workspace and saved attention differ.
    const kernels::Kernels& k = kernels::sizing_kernels(t.backend, compute_precision(t));
    const bool gpu = t.backend == "cuda";
    // The most loaded stage: the first keeps the most micro-batches in flight, the last the head.
    MemoryPlan most;
    for (int stage = 0; stage < pp; stage++) {
        const int64_t total = model::Layout(config.model, tp, 0, pp, stage).total();
        const Shards sh = shard_layout(total, dp, 0, zero);
        const int64_t range = sh.end - sh.begin;
        model::ModelBytes m = model::Llama::bytes(config.model, k, t.micro_batch, t.seq_len,
                                                  model::parse_recompute(t.recompute), sh.padded,
                                                  tp, config.split(stage));
        MemoryPlan p;
        p.params = m.params;
        p.params_bf16 = m.params_bf16;
        p.grads = m.grads;
        p.activations = m.activations;
        p.optimizer = 2 * range * int64_t(sizeof(float));
        if (gpu) {
            // The device's memory: the checkpoint staging copy is the host's, and NCCL reduces
            // in place.
            p.runtime = kCudaRuntimeBytes;
        } else {
            p.checkpoint = (total + 2 * range) * int64_t(sizeof(float));  // params + m + v
            // gloo's halving-doubling reduce-scatter (ZeRO-1) holds two gradient-sized
            // buffers; its all-reduce (no ZeRO) reduces in place (measured: bench/RESULTS.md).
            p.communication = zero ? 2 * m.grads : 0;
            p.runtime = kRuntimeBytes + kCudaLibrariesBytes;
        }
        if (p.total() > most.total())
            most = p;
    }
    return most;
}

MemoryLimit memory_limit(const RunConfig& config, int local_ranks) {
    if (config.train.memory_limit_gb > 0) {
        // In double, then capped: 2^33 GiB and more is past int64_t's bytes (a cast would wrap
        // to a negative limit), and means no practical limit anyway.
        const double bytes = config.train.memory_limit_gb * 1024 * kMiB;
        const double most = double(std::numeric_limits<int64_t>::max());
        return {bytes >= most ? std::numeric_limits<int64_t>::max() : int64_t(bytes),
                "train.memory_limit_gb"};
    }
    if (config.train.backend == "cuda") {
        if (int64_t gpu = kernels::cuda_device_memory(0); gpu > 0)
            return {gpu, "its GPU's memory"};  // one rank per GPU
    }
    const int ranks = std::max(1, local_ranks);
    return {machine_memory() / ranks, ranks > 1
                                          ? fmt::format("this machine's memory / {} ranks", ranks)
                                          : std::string("this machine's memory")};
}

void check_fits(const MemoryPlan& plan, const MemoryLimit& limit, const RunConfig& config) {
    if (plan.total() <= limit.bytes)
        return;
    std::string advice;
    // Activations against what the run's choices can shrink (not the process's own runtime).
    if (plan.activations > (plan.total() - plan.runtime) / 3) {
        advice =
            config.train.recompute == "full"
                ? "lower train.micro_batch or train.seq_len (raise train.grad_accum to keep "
                  "the batch)"
                : "set train.recompute=" +
                      std::string(config.train.recompute == "none" ? "selective or full" : "full") +
                      ", or lower train.micro_batch (raise train.grad_accum to keep the "
                      "batch)";
    } else {
        advice = config.zero == 0 ? "set parallel.zero=1, or raise parallel.tp or parallel.pp"
                                  : "raise parallel.tp or parallel.pp, or use more ranks";
    }
    throw error(
        "the run needs {:.2f} GiB per rank (parameters, gradients and optimizer state {:.2f} GiB, "
        "activations {:.2f} GiB) but a rank may use {:.2f} GiB ({}); {}",
        double(plan.total()) / (1024 * kMiB),
        double(plan.params + plan.params_bf16 + plan.grads + plan.optimizer) / (1024 * kMiB),
        double(plan.activations) / (1024 * kMiB), double(limit.bytes) / (1024 * kMiB), limit.source,
        advice);
}

}  // namespace kiln::train
