#pragma once
// AdamW over the model's flat fp32 buffers: m and v in one arena of the kernel backend's memory,
// decay applied per tensor by the layout's tag (norm weights are not decayed), global
// gradient-norm clipping.
#include <cstdint>

#include "core/arena.h"
#include "kernels/table.h"
#include "model/layout.h"

namespace kiln::optim {

struct AdamWConfig {
    double beta1 = 0.9;
    double beta2 = 0.95;
    double eps = 1e-8;
    double weight_decay = 0.1;
    double grad_clip = 1.0;  // max global L2 norm; 0 disables clipping
};

// The factor clipping multiplies gradients by: min(1, max_norm / (norm + 1e-6)), PyTorch's
// clip_grad_norm_ rule; 1 when max_norm is 0 (clipping off).
float clip_factor(double norm, double max_norm);

// AdamW over the elements [begin, end) of the flat buffers (ZeRO-1: this rank's shard; the
// whole buffer without sharding). m and v exist for that range only.
class AdamW {
public:
    AdamW(const model::Layout& layout, const AdamWConfig& config, int64_t begin, int64_t end,
          const kernels::Kernels& k);

    // One update of params[begin, end) from grad_scale * grads at learning rate lr; increments
    // step(). params_bf16 (nullable) receives the bf16 copy of the updated range in the same pass.
    // Pointers are to the whole flat buffers, in the backend's memory.
    void update(float* params, uint16_t* params_bf16, const float* grads, float grad_scale,
                double lr);

    int64_t step() const { return step_; }
    void set_step(int64_t step) { step_ = step; }
    // (end - begin): moments of the range, in the backend's memory
    float* m() { return state_.get<float>(0); }
    float* v() { return state_.get<float>(m_bytes_); }
    int64_t begin() const { return begin_; }
    int64_t end() const { return end_; }

private:
    const model::Layout& layout_;
    AdamWConfig config_;
    int64_t begin_, end_;
    const kernels::Kernels& k_;
    Arena state_;
    size_t m_bytes_ = 0;
    int64_t step_ = 0;
};

}  // namespace kiln::optim
