#pragma once
// The training loop of one process: data -> micro-batches -> forward/backward with gradient
// accumulation -> clip -> AdamW -> metrics -> checkpoints. Resumes from the run folder's latest
// checkpoint when there is one.
#include <cstdint>
#include <string>

#include "train/config.h"

namespace kiln::train {

struct TrainResult {
    std::string run_dir;
    std::string checkpoint;  // the final checkpoint folder
    int64_t steps = 0;
    double first_loss = 0, last_loss = 0;
    // The run's checkpoint was already at train.steps: nothing ran and nothing was written
    // (steps: that step; first_loss and last_loss: the checkpoint's loss).
    bool already_finished = false;
};

// `resolved_yaml` is written to the run folder as config.yaml.
TrainResult train(const RunConfig& config, const std::string& resolved_yaml);

// Peak GFLOP/s of this machine's bf16/fp32 matrix product: the best rate of a 1024-square
// product timed for a quarter of a second now, or shown before on the same platform (CPU,
// threads, library; kept in fs::cache_dir()/peaks), whichever is higher.
double measure_peak_gflops(const std::string& backend, kernels::Precision precision);

}  // namespace kiln::train
