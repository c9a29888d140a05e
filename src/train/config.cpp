#include "train/config.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/backends.h"

namespace kiln::train {
using namespace check;

void build_schema(ConfigSchema& s, RunConfig& c) {
    model::register_keys(s, c.model);
    data::register_keys(s, c.data);
    TrainConfig& t = c.train;
    s.add("train.seq_len", &t.seq_len, "tokens per sequence T", positive(&t.seq_len));
    s.add("train.micro_batch", &t.micro_batch, "sequences per micro-batch per DP rank",
          positive(&t.micro_batch));
    s.add("train.grad_accum", &t.grad_accum, "micro-batches per optimizer step",
          positive(&t.grad_accum));
    s.add("train.steps", &t.steps, "optimizer steps", positive(&t.steps));
    s.add("train.lr", &c.schedule.lr, "peak learning rate", positive(&c.schedule.lr));
    s.add("train.min_lr", &c.schedule.min_lr, "learning rate at the last step",
          non_negative(&c.schedule.min_lr));
    s.add("train.warmup_steps", &c.schedule.warmup_steps, "linear warmup steps",
          non_negative(&c.schedule.warmup_steps));
    s.add("train.decay", &c.schedule.decay, "cosine | linear | constant",
          one_of(&c.schedule.decay, {"cosine", "linear", "constant"}));
    s.add("train.weight_decay", &c.adamw.weight_decay,
          "AdamW decoupled weight decay (not on norms)", non_negative(&c.adamw.weight_decay));
    s.add("train.beta1", &c.adamw.beta1, "AdamW beta1", unit_interval(&c.adamw.beta1));
    s.add("train.beta2", &c.adamw.beta2, "AdamW beta2", unit_interval(&c.adamw.beta2));
    s.add("train.eps", &c.adamw.eps, "AdamW epsilon", positive(&c.adamw.eps));
    s.add("train.grad_clip", &c.adamw.grad_clip, "max global gradient L2 norm (0: off)",
          non_negative(&c.adamw.grad_clip));
    s.add("train.seed", &t.seed, "seed of the initial weights and the data order");
    s.add("train.precision", &t.precision,
          "matrix products: auto (bf16 where the CPU has native bf16 products: avx512_bf16 or "
          "AMX; else fp32), bf16 (fp32 accumulate), fp32",
          one_of(&t.precision, {"auto", "bf16", "fp32"}));
    s.add("train.recompute", &t.recompute, "none | selective (attention) | full (whole block)",
          one_of(&t.recompute, {"none", "selective", "full"}));
    s.add("train.backend", &t.backend,
          "kernel backend: cpu | reference | cuda (each rank on its host's GPU LOCAL_RANK)",
          one_of(&t.backend, {"cpu", "reference", "cuda"}));
    s.add("train.graphs", &t.graphs,
          "record a micro-batch's device work once as a CUDA graph and replay it (one launch "
          "from the host instead of one a kernel): auto (on the cuda backend with "
          "parallel.tp=1 and parallel.pp=1), true, false",
          one_of(&t.graphs, {"auto", "true", "false"}));
    s.add("train.threads", &t.threads, "CPU threads (0: all cores)", non_negative(&t.threads));
    s.add("train.init_std", &t.init_std,
          "std of the initial weights (wo and w2: init_std / sqrt(2 n_layers))",
          positive(&t.init_std));
    s.add("train.log_every", &t.log_every, "print a progress line every N steps",
          positive(&t.log_every));
    s.add("train.checkpoint_every", &t.checkpoint_every,
          "checkpoint every N steps (0: only at the end; -1: never, for runs that only measure: "
          "nothing to resume, eval or export from)",
          at_least(&t.checkpoint_every, -1));
    s.add("train.keep_checkpoints", &t.keep_checkpoints, "newest checkpoints kept (0: all)",
          non_negative(&t.keep_checkpoints));
    s.add("train.peak_gflops", &t.peak_gflops,
          "peak matmul GFLOP/s for MFU (0: measured: the best rate of a 1024-square product "
          "in the compute precision this machine has shown, now or in an earlier run)",
          non_negative(&t.peak_gflops));
    s.add("train.memory_limit_gb", &t.memory_limit_gb,
          "memory one rank may plan for, GiB (0: this machine's memory / its ranks)",
          non_negative(&t.memory_limit_gb));
    s.add("train.autotune", &t.autotune,
          "time each product's implementations before the first step and keep the fastest, "
          "remembered in the plan cache (kiln compile fills it ahead)");
    s.add("train.plan_cache", &t.plan_cache,
          "folder of plan caches, shared by all ranks (empty: $XDG_CACHE_HOME/kiln/plans or "
          "~/.cache/kiln/plans)");
    s.add("parallel.tp", &c.tp, "tensor-parallel ranks (DP = world size / (TP x PP))",
          positive(&c.tp));
    s.add("parallel.sp", &c.sp,
          "sequence parallelism (needs parallel.tp > 1): norms and residual adds run on 1/tp of "
          "the rows, and each TP all-reduce becomes a reduce-scatter and an all-gather");
    s.add("parallel.tp_wire", &c.tp_wire,
          "dtype of the tensor-parallel sums of activations: bf16 (with bf16 products), fp32, "
          "auto (bf16 on the cuda backend with bf16 products, else fp32)",
          one_of(&c.tp_wire, {"auto", "fp32", "bf16"}));
    s.add("parallel.tp_overlap", &c.tp_overlap,
          "run the backward's tensor-parallel collectives beside the products that do not read "
          "them (NCCL: on a stream of its own): true, false, auto (true on the cuda backend; on "
          "CPUs a product takes the rank's cores, so they run in line whatever this says)",
          one_of(&c.tp_overlap, {"auto", "true", "false"}));
    s.add("parallel.pp", &c.pp,
          "pipeline stages: the blocks split into this many stages, run on a 1F1B schedule over "
          "the step's train.grad_accum micro-batches",
          positive(&c.pp));
    s.add("parallel.zero", &c.zero, "1: shard optimizer state over DP (ZeRO-1), 0: replicate",
          [&c] { return c.zero == 0 || c.zero == 1 ? "" : "must be 0 or 1"; });
    s.add("parallel.dp_overlap", &c.dp_overlap,
          "sum the gradients over the DP ranks during the backward, each bucket as soon as it is "
          "final, on a thread (NCCL: a stream) of its own: true, false (all at once after the "
          "backward), auto (true on the cuda backend; on CPUs the thread takes cores the "
          "backward computes on)",
          one_of(&c.dp_overlap, {"auto", "true", "false"}));
    s.add("parallel.dp_bucket_mb", &c.dp_bucket_mb,
          "MiB of final gradients that parallel.dp_overlap sums at once",
          positive(&c.dp_bucket_mb));
    s.add("parallel.timeout_s", &c.timeout_s,
          "seconds to wait for every rank at rendezvous and in a collective",
          positive(&c.timeout_s));
    s.add("parallel.transport", &c.transport,
          "how ranks exchange collectives: shm (shared memory, ranks on one host), tcp (gloo over "
          "TCP), auto (shm when every rank can use it, else tcp)",
          one_of(&c.transport, {"auto", "shm", "tcp"}));
    s.add("parallel.interface", &c.interface,
          "network interface whose IPv4 address ranks on other hosts reach this rank at, over "
          "TCP (empty: GLOO_SOCKET_IFNAME, else the address that routes to MASTER_ADDR)");
    s.add("run.dir", &c.run_dir, "run folder (empty: runs/<generated id>)");
    s.add("run.log_level", &c.log_level,
          "debug | info | warn | error (debug: each rank logs its step split, every step)",
          one_of(&c.log_level, {"debug", "info", "warn", "error"}));
}

model::Split RunConfig::split(int pp_rank) const {
    model::Split s;
    s.sp = sp;
    s.pp = int(pp);
    s.pp_rank = pp_rank;
    // 1F1B: stage s starts pp - s forwards before its first backward frees one.
    s.inflight = int(std::min<int64_t>(pp - pp_rank, train.grad_accum));
    s.bf16_wire = bf16_wire();
    s.tp_overlap = tp_overlapped(train.backend == "cuda");
    return s;
}

bool RunConfig::bf16_wire() const {
    const bool bf16 = compute_precision(train) == kernels::Precision::bf16;
    if (tp_wire == "auto")
        return bf16 && train.backend == "cuda";
    return tp_wire == "bf16";
}

bool RunConfig::graphs_recorded() const {
    return train.graphs == "true" ||
           (train.graphs == "auto" && train.backend == "cuda" && tp == 1 && pp == 1);
}

bool RunConfig::tp_overlapped(bool device) const {
    return tp_overlap == "true" || (tp_overlap == "auto" && device);
}

int64_t RunConfig::dp_bucket(bool device) const {
    if (dp_overlap == "false" || (dp_overlap == "auto" && !device))
        return 0;
    return std::max<int64_t>(1, int64_t(dp_bucket_mb * 1048576 / sizeof(float)));
}

kernels::Precision compute_precision(const TrainConfig& t) {
    if (t.precision == "auto")
        return kernels::resolve_precision(t.backend, t.precision).precision;
    return t.precision == "bf16" ? kernels::Precision::bf16 : kernels::Precision::fp32;
}

void RunConfig::resolve() {
    kernels::PrecisionChoice choice = kernels::resolve_precision(train.backend, train.precision);
    train.precision = kernels::precision_name(choice.precision);
    train.precision_why = choice.why;
    validate();  // the checks that waited for this machine's precision
}

void RunConfig::validate() const {
    // Each count bounded far above real use, so that products of them fit 64 bits.
    auto at_most = [](const char* key, int64_t v, int64_t most) {
        if (v > most)
            throw error("{}={} is over {}", key, v, most);
    };
    at_most("train.micro_batch", train.micro_batch, int64_t(1) << 20);
    at_most("train.grad_accum", train.grad_accum, int64_t(1) << 20);
    at_most("train.steps", train.steps, int64_t(1) << 40);
    at_most("parallel.tp", tp, 1 << 16);
    at_most("parallel.pp", pp, 1 << 16);
    at_most("train.threads", train.threads, 1 << 16);
    model.validate(static_cast<int>(tp));
    if (train.seq_len > model.max_seq_len) {
        throw error("train.seq_len={} exceeds model.max_seq_len={}", train.seq_len,
                    model.max_seq_len);
    }
    at_most("train.micro_batch x train.seq_len", train.micro_batch * train.seq_len,
            int64_t(1) << 31);
    if (sp && tp == 1)
        throw error(
            "parallel.sp=true needs parallel.tp > 1: it splits the rows over the "
            "tensor-parallel ranks");
    if (sp && (train.micro_batch * train.seq_len) % tp != 0) {
        throw error(
            "parallel.sp=true splits the {} rows of a micro-batch (train.micro_batch x "
            "train.seq_len) over parallel.tp={} ranks, which does not divide them",
            train.micro_batch * train.seq_len, tp);
    }
    // With precision auto the devices decide: this machine's in resolve(), the cluster's in a plan.
    if (tp_wire == "bf16" && train.precision == "fp32") {
        throw error(
            "parallel.tp_wire=bf16 carries activations in the products' dtype, and {} runs "
            "them in fp32",
            train.precision_why.empty() ? "train.precision=fp32"
                                        : "this machine (" + train.precision_why + ")");
    }
    if (train.graphs == "true" && train.backend != "cuda") {
        throw error(
            "train.graphs=true records device work, and train.backend={} runs each op as it is "
            "called; use train.graphs=auto or false",
            train.backend);
    }
    if (train.graphs == "true" && (tp > 1 || pp > 1)) {
        throw error(
            "train.graphs=true needs parallel.tp=1 and parallel.pp=1 (parallel.tp={}, "
            "parallel.pp={}): the collectives between ranks wait on the host, which a recording "
            "cannot hold",
            tp, pp);
    }
    if (pp > model.n_layers) {
        throw error("parallel.pp={} is more stages than the model's {} layers (model.n_layers)", pp,
                    model.n_layers);
    }
    if (schedule.min_lr > schedule.lr) {
        throw error("train.min_lr={} is above train.lr={}", schedule.min_lr, schedule.lr);
    }
}

}  // namespace kiln::train
