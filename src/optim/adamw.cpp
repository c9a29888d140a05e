#include "optim/adamw.h"

#include <cmath>
#include <mutex>

#include "core/threads.h"

namespace kiln::optim {

double l2_norm(const float* x, int64_t n) {
    std::mutex mutex;
    double total = 0;
    parallel_range(n, 1 << 16, [&](int64_t i0, int64_t i1) {
        double s = 0;
        for (int64_t i = i0; i < i1; i++) s += double(x[i]) * x[i];
        std::lock_guard<std::mutex> lock(mutex);
        total += s;
    });
    return std::sqrt(total);
}

float clip_to_norm(float* x, int64_t n, double norm, double max_norm) {
    if (max_norm <= 0) return 1.0f;
    float factor = static_cast<float>(std::min(1.0, max_norm / (norm + 1e-6)));
    if (factor < 1.0f) {
        parallel_range(n, 1 << 16, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; i++) x[i] *= factor;
        });
    }
    return factor;
}

AdamW::AdamW(const model::Layout& layout, const AdamWConfig& config)
    : layout_(layout), config_(config) {
    m_bytes_ = state_.add("m", layout.total(), DType::f32);
    m_bytes_ = state_.add("v", layout.total(), DType::f32);
    state_.allocate();
}

void AdamW::update(float* params, const float* grads, double lr, const kernels::Kernels& k) {
    step_++;
    for (const auto& p : layout_.params()) {
        k.adamw(params + p.offset, m() + p.offset, v() + p.offset, grads + p.offset, p.numel,
                static_cast<float>(lr), static_cast<float>(config_.beta1),
                static_cast<float>(config_.beta2), static_cast<float>(config_.eps),
                p.decay ? static_cast<float>(config_.weight_decay) : 0.0f, step_);
    }
}

}  // namespace kiln::optim
