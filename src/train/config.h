#pragma once
// The resolved configuration of a training run: one struct per concern, every key registered
// once (name, default, help, check) in build_schema(). `kiln train --help` prints the schema.
#include <cstdint>
#include <string>

#include "core/config.h"
#include "data/build.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/llama.h"
#include "optim/adamw.h"
#include "optim/schedule.h"

namespace kiln::train {

struct TrainConfig {
    int64_t seq_len = 256;
    int64_t micro_batch = 8;
    int64_t grad_accum = 1;
    int64_t steps = 200;
    int64_t seed = 1337;
    std::string precision = "auto";  // auto | bf16 | fp32; RunConfig::resolve() settles auto
    std::string precision_why;       // set by resolve(): the choice and what decided it
    std::string recompute = "none";
    std::string backend = "cpu";
    std::string graphs = "auto";  // auto | true | false: RunConfig::graphs_recorded()
    int64_t threads = 0;
    double init_std = 0.02;
    int64_t log_every = 10;
    int64_t checkpoint_every = 100;  // 0: only at the end; -1: never
    int64_t keep_checkpoints = 3;
    double peak_gflops = 0;      // for MFU; 0: measured at start
    double memory_limit_gb = 0;  // per rank; 0: this machine's memory / ranks on it
    bool autotune = true;        // time the products' implementations (train/autotune.h)
    std::string plan_cache;      // folder of plan caches; empty: the user's cache folder
};

struct RunConfig {
    model::LlamaConfig model;
    data::DataConfig data;
    TrainConfig train;
    optim::Schedule schedule;
    optim::AdamWConfig adamw;
    int64_t tp = 1;
    bool sp = false;               // sequence parallelism within the tensor-parallel group
    int64_t pp = 1;                // pipeline stages
    std::string tp_wire = "auto";  // auto | fp32 | bf16: the dtype TP's activation sums travel in
    std::string tp_overlap = "auto";  // auto | true | false: TP's backward collectives beside
                                      // its products
    int64_t zero = 1;
    double timeout_s = 300;           // rendezvous and collective timeout
    std::string dp_overlap = "auto";  // auto | true | false: DP's gradient sum during the backward
    double dp_bucket_mb = 25;         // its buckets
    std::string transport = "auto";   // auto | shm | tcp: how gloo moves collectives
    std::string interface;  // network interface for TCP pairs (empty: see dist::Placement)
    std::string run_dir;    // empty: runs/<generated id>
    std::string log_level = "info";

    void validate() const;  // cross-key checks; throws Error naming the keys
    // What this config splits a rank's model into beyond TP: SP, its pipeline stage of pp,
    // and how many micro-batches that stage keeps in flight under the 1F1B schedule.
    model::Split split(int pp_rank) const;
    // Whether the tensor-parallel sums of activations travel in bf16: parallel.tp_wire=bf16, or
    // auto on the cuda backend with bf16 products (NCCL sums bf16 natively; gloo widens to f32,
    // which measured faster on one host, so auto keeps f32 on CPUs).
    bool bf16_wire() const;
    // Whether the backward's tensor-parallel collectives run beside the products
    // (parallel.tp_overlap; auto: where the tensors are a device's, `device` as for dp_bucket).
    // On host memory they run in line either way (Collective::start).
    bool tp_overlapped(bool device) const;
    // Whether the trainer records each micro-batch's device work and replays it
    // (kernels/replays.h): train.graphs=true, or auto on the cuda backend with one
    // tensor-parallel rank and one stage (their collectives wait on the host).
    bool graphs_recorded() const;
    // The bucket, in floats, of the data-parallel gradient sum overlapped with the backward; 0
    // for the sum after it. Overlapped with parallel.dp_overlap=true, or auto where the tensors
    // are a device's (`device`: the cuda backend, or an accelerator in `kiln plan`): NCCL sums
    // on a stream of its own. On CPUs the reducing thread takes cores the backward computes on,
    // which measured slower (DP=2 on 2 cores: 2.5% over shared memory, 8% over TCP).
    int64_t dp_bucket(bool device) const;
    // Settles what depends on this machine: train.precision "auto" becomes bf16 where the
    // backend has native bf16 products, else fp32; an explicit bf16 the CPU lacks throws.
    void resolve();
};

// The precision the products run in: "auto" as this machine resolves it, else as given (a plan
// for another machine may name bf16 here; RunConfig::resolve() checks this machine can run it).
kernels::Precision compute_precision(const TrainConfig& t);

// Registers every key of `config` (which must outlive the schema).
void build_schema(ConfigSchema& schema, RunConfig& config);

}  // namespace kiln::train
