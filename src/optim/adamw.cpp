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
#pragma omp simd reduction(+ : s)
        for (int64_t i = i0; i < i1; i++)
            s += double(x[i]) * x[i];
        std::lock_guard<std::mutex> lock(mutex);
        total += s;
    });
    return std::sqrt(total);
}

float clip_factor(double norm, double max_norm) {
    if (max_norm <= 0)
        return 1.0f;
    return static_cast<float>(std::min(1.0, max_norm / (norm + 1e-6)));
}

AdamW::AdamW(const model::Layout& layout, const AdamWConfig& config)
    : layout_(layout), config_(config) {
    m_bytes_ = state_.add("m", layout.total(), DType::f32);
    m_bytes_ = state_.add("v", layout.total(), DType::f32);
    state_.allocate();
}

void AdamW::update(float* params, uint16_t* params_bf16, const float* grads, float grad_scale,
                   double lr, const kernels::Kernels& k) {
    step_++;
    kernels::AdamWStep s;
    s.lr = static_cast<float>(lr);
    s.beta1 = static_cast<float>(config_.beta1);
    s.beta2 = static_cast<float>(config_.beta2);
    s.eps = static_cast<float>(config_.eps);
    s.grad_scale = grad_scale;
    s.t = step_;
    for (const auto& p : layout_.params()) {
        s.weight_decay = p.decay ? static_cast<float>(config_.weight_decay) : 0.0f;
        k.adamw(params + p.offset, params_bf16 ? params_bf16 + p.offset : nullptr, m() + p.offset,
                v() + p.offset, grads + p.offset, p.numel, s);
    }
}

}  // namespace kiln::optim
