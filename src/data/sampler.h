#pragma once
// The order in which training reads rows: a seeded permutation of all rows per epoch, dealt out
// in global batches so that each data-parallel rank gets its own disjoint rows. The position is
// a pure function of (step, micro-step, rank), so resuming needs only the step number.
#include <cstdint>
#include <vector>

namespace kiln::data {

class Sampler {
public:
    Sampler(int64_t rows, uint64_t seed) : rows_(rows), seed_(seed) {}

    // Global row index for the i-th sequence consumed overall (across ranks and micro-steps).
    int64_t row(int64_t i);

    // Rows of one micro-batch: micro-step `micro` of optimizer step `step` (0-based), for
    // data-parallel rank `dp_rank` of `dp_size`, B rows each.
    std::vector<int64_t> micro_batch(int64_t step, int64_t grad_accum, int64_t micro,
                                     int64_t dp_rank, int64_t dp_size, int64_t B);

private:
    int64_t rows_;
    uint64_t seed_;
    int64_t epoch_ = -1;
    std::vector<int64_t> order_;  // [rows_] permutation of the current epoch
};

}  // namespace kiln::data
