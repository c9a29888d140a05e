#pragma once
// Mean cross-entropy of a checkpoint over a shard set (every row, positions predicting the next
// token of the same row).
#include <cstdint>
#include <string>

namespace kiln::train {

struct EvalResult {
    double loss = 0;
    int64_t tokens = 0;
    int64_t rows = 0;
};

// precision as train.precision: auto (the backend's best), bf16 or fp32; backend as
// train.backend (cpu, reference, cuda: the current GPU, 0 unless CUDA_VISIBLE_DEVICES says).
EvalResult evaluate(const std::string& checkpoint_dir, const std::string& data_dir,
                    int64_t max_rows, const std::string& precision, int64_t batch,
                    const std::string& backend = "cpu");

}  // namespace kiln::train
