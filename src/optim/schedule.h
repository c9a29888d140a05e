#pragma once
// Learning-rate schedule: linear warmup from lr/warmup to lr over `warmup_steps`, then cosine or
// linear decay to min_lr at the last step.
#include <cstdint>
#include <string>

namespace kiln::optim {

struct Schedule {
    double lr = 3e-4;
    double min_lr = 3e-5;
    int64_t warmup_steps = 100;
    int64_t total_steps = 1000;
    std::string decay = "cosine";  // cosine | linear | constant

    double at(int64_t step) const;  // step is 0-based
};

}  // namespace kiln::optim
