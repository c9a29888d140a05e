#include "optim/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace kiln::optim {

double Schedule::at(int64_t step) const {
    if (step < warmup_steps) {
        return lr * double(step + 1) / double(warmup_steps);
    }
    if (decay == "constant")
        return lr;
    int64_t span = std::max<int64_t>(1, total_steps - 1 - warmup_steps);
    double progress = std::clamp(double(step - warmup_steps) / double(span), 0.0, 1.0);
    double factor =
        decay == "linear" ? 1.0 - progress : 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
    return min_lr + factor * (lr - min_lr);
}

}  // namespace kiln::optim
