#include "optim/adamw.h"

#include <algorithm>
#include <cmath>

namespace kiln::optim {

float clip_factor(double norm, double max_norm) {
    if (max_norm <= 0)
        return 1.0f;
    return static_cast<float>(std::min(1.0, max_norm / (norm + 1e-6)));
}

AdamW::AdamW(const model::Layout& layout, const AdamWConfig& config, int64_t begin, int64_t end,
             const kernels::Kernels& k)
    : layout_(layout),
      config_(config),
      begin_(begin),
      end_(std::min(end, layout.total())),
      k_(k),
      state_("optimizer state", *k.memory) {
    int64_t n = std::max<int64_t>(0, end_ - begin_);
    state_.add("m", n, DType::f32);
    m_bytes_ = state_.add("v", n, DType::f32);
    state_.allocate();
}

void AdamW::update(float* params, uint16_t* params_bf16, const float* grads, float grad_scale,
                   double lr) {
    step_++;
    kernels::AdamWStep s;
    s.lr = static_cast<float>(lr);
    s.beta1 = static_cast<float>(config_.beta1);
    s.beta2 = static_cast<float>(config_.beta2);
    s.eps = static_cast<float>(config_.eps);
    s.grad_scale = grad_scale;
    s.t = step_;
    for (const auto& p : layout_.params()) {
        int64_t lo = std::max(begin_, p.offset), hi = std::min(end_, p.offset + p.numel);
        if (lo >= hi)
            continue;  // the tensor is outside this rank's range
        s.weight_decay = p.decay ? static_cast<float>(config_.weight_decay) : 0.0f;
        k_.adamw(params + lo, params_bf16 ? params_bf16 + lo : nullptr, m() + (lo - begin_),
                 v() + (lo - begin_), grads + lo, hi - lo, s);
    }
}

}  // namespace kiln::optim
