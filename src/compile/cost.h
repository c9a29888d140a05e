#pragma once
// `kiln plan`: how a model trains on a described cluster. A cluster is nodes of identical
// accelerators; the cost model (docs/plan.md) predicts, for a layout (TP x DP, micro-batch,
// recompute), the memory per device from the training's own memory plan, and the step time as
//   compute  = 6·N + 12·L·C·T FLOPs per token / (devices x peak x efficiency)
//   TP       = 4 all-reduces per block per micro-batch of the (B·T x C) activations (ring:
//              2(tp-1)/tp of the bytes) over the intra-node link, plus a latency each
//   DP       = gradient reduce-scatter + parameter all-gather (2 (dp-1)/dp of the TP shard) over
//              the slowest link the DP group spans, once per step
// with nothing overlapped (kiln does not overlap communication with compute yet).
#include <cstdint>
#include <string>
#include <vector>

#include "train/config.h"
#include "train/memory.h"

namespace kiln::compile {

struct Accelerator {
    std::string name;
    double peak_tflops = 0;   // dense bf16 matrix products
    double memory_gb = 0;     // per device
    double efficiency = 0.4;  // achieved share of peak in the step's products (calibration)
    int per_node = 1;
    double intra_gbps = 0;   // GB/s per device within a node
    double inter_gbps = 0;   // GB/s per device between nodes
    double latency_us = 10;  // fixed cost of one collective
    bool host = false;       // the device is the host (CPU): its memory holds everything
};

struct Cluster {
    Accelerator device;
    int nodes = 1;
    int devices() const { return nodes * device.per_node; }
};

// "trn1.32xlarge", "p5.48xlarge" (8 x H100), "h200" (8 x H200), "this" (this machine's cores,
// peak measured now), optionally "N x NAME" / "NxNAME" for N nodes, or a YAML file with the
// Accelerator's fields and `nodes`. Throws Error naming an unknown accelerator.
Cluster parse_cluster(const std::string& spec);
std::vector<std::string> cluster_presets();

struct Estimate {
    int tp = 1, dp = 1;
    int64_t micro_batch = 1, grad_accum = 1;
    std::string recompute;
    train::MemoryPlan memory;
    bool fits = false;
    double compute_s = 0, tp_s = 0, dp_s = 0;
    double step_s() const { return compute_s + tp_s + dp_s; }
    double tokens_per_s = 0, mfu = 0;
};

// One layout of `config` (its parallel.tp, micro-batch, recompute) on the whole cluster.
Estimate estimate(const train::RunConfig& config, const Cluster& cluster);

// Every layout worth trying for a global batch of `global_batch` sequences: TP in the divisors
// of a node that divide the heads, micro-batches 1..8 that divide the per-rank batch, the three
// recompute modes. Sorted fastest first, the ones that do not fit last.
std::vector<Estimate> candidates(const train::RunConfig& config, const Cluster& cluster,
                                 int64_t global_batch);

}  // namespace kiln::compile
