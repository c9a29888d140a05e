#pragma once
// `kiln plan`: how a model trains on a described cluster. A cluster is nodes of identical
// accelerators; the cost model (docs/plan.md) predicts, for a layout (DP x PP x TP, SP,
// micro-batch, recompute), the memory per device from the training's own memory plan, and the
// step time of the slowest pipeline stage as
//   compute  = its FLOPs per token (6·N + 12·L·C·T over its blocks, the head's on the last stage)
//              x tokens / (tp x peak x efficiency)
//   TP       = per block and micro-batch, 4 fp32 all-reduces of the (B·T x C) activations, or
//              with SP 4 fp32 reduce-scatters and 6 all-gathers in the compute precision (ring:
//              (tp-1)/tp of the bytes each, 2(tp-1)/tp for an all-reduce) over the intra-node
//              link, plus a latency each
//   PP       = the activation and its gradient sent to the next / previous stage per micro-batch
//   bubble   = the other stages' time for one micro-batch, while 1F1B fills and drains the
//              pipeline: (pp-1)/(m+pp-1) of the pipelined time for m equal micro-batch slots
//   DP       = the weights' all-gather after the update ((dp-1)/dp of the stage's TP shard)
//              over the slowest link the DP group spans, and what the gradients' sum leaves
//              exposed: it runs during the last micro-batch's backward, region by region
//              (parallel.dp_overlap; a reduce to each shard's owner carries the shard's
//              gradients over each link once), so what the slowest stage's backward of one
//              micro-batch cannot hide, and at least the region made final last (the first
//              stage's embedding and one bucket); without the overlap (on CPUs), the whole
//              reduce-scatter after the backward
// PP transfers are in line with the compute; of TP's, on an accelerator, the backward's sums and
// re-gathers beside the column-parallel products show only what those products cannot hide.
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
    // The kiln backend whose buffers the memory plan counts: cuda on NVIDIA GPUs (fused
    // attention keeps O(T) a row); cpu elsewhere, trn1 included, which kiln has no kernels for.
    std::string backend = "cpu";
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
    int tp = 1, pp = 1, dp = 1;
    bool sp = false;
    int64_t micro_batch = 1, grad_accum = 1;
    std::string recompute;
    train::MemoryPlan memory;  // the most loaded stage's
    bool fits = false;
    // Seconds per optimizer step. compute, TP and PP are the slowest stage's work over the
    // step's micro-batches; bubble_s is the idle time 1F1B adds to it, the share `bubble` of
    // that pipelined time.
    double compute_s = 0, tp_s = 0, pp_s = 0, bubble_s = 0, dp_s = 0;
    double bubble = 0;  // (pp-1)/(grad_accum+pp-1) for equal stages; less when one is heavier
    double step_s() const { return compute_s + tp_s + pp_s + bubble_s + dp_s; }
    double tokens_per_s = 0, mfu = 0;
};

// One layout of `config` (its parallel.tp, parallel.pp, parallel.sp, micro-batch, recompute) on
// the whole cluster. Throws Error for a layout that cannot run.
Estimate estimate(const train::RunConfig& config, const Cluster& cluster);

// Every layout worth trying for a global batch of `global_batch` sequences: TP in the powers of
// two up to a node that divide the heads, PP in the powers of two up to the layer count, SP off
// and on where tp > 1, micro-batches 1..8 that divide the per-rank batch, the three recompute
// modes. Sorted fastest first, the ones that do not fit last.
std::vector<Estimate> candidates(const train::RunConfig& config, const Cluster& cluster,
                                 int64_t global_batch);

}  // namespace kiln::compile
