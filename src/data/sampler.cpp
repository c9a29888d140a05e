#include "data/sampler.h"

#include <numeric>
#include <random>

namespace kiln::data {

int64_t Sampler::row(int64_t i) {
    int64_t epoch = i / rows_;
    if (epoch != epoch_) {
        order_.resize(rows_);
        std::iota(order_.begin(), order_.end(), 0);
        std::mt19937_64 rng(seed_ * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch));
        for (int64_t k = rows_ - 1; k > 0; k--) {  // Fisher-Yates with our own draw
            int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(k + 1));
            std::swap(order_[k], order_[j]);
        }
        epoch_ = epoch;
    }
    return order_[i % rows_];
}

std::vector<int64_t> Sampler::micro_batch(int64_t step, int64_t grad_accum, int64_t micro,
                                          int64_t dp_rank, int64_t dp_size, int64_t B) {
    std::vector<int64_t> rows(B);
    int64_t first = ((step * grad_accum + micro) * dp_size + dp_rank) * B;
    for (int64_t b = 0; b < B; b++)
        rows[b] = row(first + b);
    return rows;
}

}  // namespace kiln::data
