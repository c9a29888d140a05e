#pragma once
// The memory plan: what one rank of a training run holds, by kind, computed from the same
// declarations the model, optimizer and checkpoint writer allocate from — so `kiln train` can
// refuse a run that will not fit before it allocates anything, and `kiln compile` / `kiln plan`
// can print it. The rank counted is the most loaded one (DP rank 0 also stages the parameters
// for checkpoints).
#include <cstdint>
#include <string>

#include "train/config.h"

namespace kiln::train {

struct MemoryPlan {
    int64_t params = 0;         // fp32 master weights (this TP rank's shard, padded for ZeRO)
    int64_t params_bf16 = 0;    // the bf16 copy the products read (bf16 precision)
    int64_t grads = 0;          // fp32 gradients
    int64_t optimizer = 0;      // AdamW m and v (this DP rank's shard under ZeRO-1)
    int64_t activations = 0;    // saved activations, backward scratch and the kernel workspace
    int64_t checkpoint = 0;     // the staging copy a background checkpoint writes from
    int64_t communication = 0;  // gloo's scratch for the gradient reduce-scatter / all-reduce
    int64_t runtime = 0;        // the process itself: code, libraries, thread stacks, buffers

    int64_t total() const {
        return params + params_bf16 + grads + optimizer + activations + checkpoint + communication +
               runtime;
    }
    std::string table() const;  // one line per kind, MiB and share
};

// How ZeRO-1 splits a rank's `total` flat parameters over `dp` data-parallel ranks: every
// buffer padded to `padded` = dp x `chunk`; this rank's optimizer range is [begin, end) (the
// whole buffer without ZeRO).
struct Shards {
    int64_t chunk = 0, padded = 0, begin = 0, end = 0;
};
Shards shard_layout(int64_t total, int dp, int dp_rank, bool zero);

int64_t machine_memory();  // this machine's physical memory in bytes

// The plan of `config` on `world` ranks (world / parallel.tp data-parallel). Throws Error for a
// layout that cannot run (world not a multiple of tp, heads not divisible, ...).
MemoryPlan memory_plan(const RunConfig& config, int world);

// What one rank may use: train.memory_limit_gb when set, else its GPU's memory on the cuda
// backend (when this machine has the GPU), else this machine's memory divided among the ranks
// that share it (`local_ranks`). On the cuda backend the plan counts device memory: the
// checkpoint staging copy lives on the host.
struct MemoryLimit {
    int64_t bytes = 0;
    std::string source;  // where it comes from, e.g. "train.memory_limit_gb", "its GPU's memory"
};
MemoryLimit memory_limit(const RunConfig& config, int local_ranks);

// Throws Error when the plan exceeds `limit`, naming the biggest parts and what to change.
void check_fits(const MemoryPlan& plan, const MemoryLimit& limit, const RunConfig& config);

}  // namespace kiln::train
