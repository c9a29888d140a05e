#pragma once
// Training metrics: one JSON object per step appended to metrics.jsonl (flushed per line, so a
// crash loses at most the line being written), and the FLOP count behind MFU.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "model/config.h"

namespace kiln::train {

struct StepMetrics {
    int64_t step = 0;  // optimizer steps completed
    double loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0, mfu = 0, elapsed_s = 0;
    int64_t tokens = 0;   // tokens trained on so far
    int64_t skipped = 0;  // steps skipped for non-finite gradients so far
    // Where the step's time went, on rank 0: forward and backward of every micro-batch (tensor-
    // parallel collectives included); waiting for the slowest data-parallel rank to finish its
    // micro-batches (the loss all-reduce); the gradient reduce-scatter or all-reduce with the
    // gradient norm; the optimizer with the weight all-gather.
    double compute_s = 0, wait_s = 0, reduce_s = 0, update_s = 0;
    // Pipelines: of compute_s, the time rank 0's stage (the first) waited for its neighbours:
    // the pipeline bubble and the transfers.
    double stage_wait_s = 0;
};

class MetricsFile {
public:
    explicit MetricsFile(const std::string& path);  // appends; throws Error naming the path
    MetricsFile(const MetricsFile&) = delete;
    MetricsFile& operator=(const MetricsFile&) = delete;
    ~MetricsFile();
    void write(const StepMetrics& m);

private:
    std::FILE* f_ = nullptr;
};

// Every complete line of a metrics.jsonl ({} when it does not exist); a torn last line is skipped.
std::vector<StepMetrics> read_metrics(const std::string& path);

// Training FLOPs per token: 6 x (parameters in matrix products, LM head included, embedding not)
// + 12 x L x C x T for attention scores and values (forward + backward).
double flops_per_token(const model::LlamaConfig& c, int64_t seq_len);

}  // namespace kiln::train
