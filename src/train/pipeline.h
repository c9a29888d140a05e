#pragma once
// One optimizer step's micro-batches through the pipeline stages, on the 1F1B schedule
// (PipeDream-flush, as Megatron-LM runs it): stage s of p first runs min(p - s - 1, m) forwards,
// then alternates one forward and one backward, then runs the backwards left. A stage keeps at
// most p - s micro-batches' activations (model::Split::inflight). Activations go to the next
// stage and their gradients come back over the pipeline group's point-to-point exchange; a
// forward's send and the matching backward's receive are posted together, so neighbours never
// wait on each other's order.
#include <cstdint>
#include <functional>

#include "core/collective.h"
#include "model/llama.h"

namespace kiln::train {

struct PipelineStats {
    model::LossSum loss;  // the last stage's; zero elsewhere
    double wait_s = 0;    // time spent waiting for neighbouring stages
};

// One stage of the pipeline `pp`, running `model`; it holds what the stage receives (an
// activation and a gradient, in the model's memory) from one step to the next.
class Pipeline {
public:
    Pipeline(model::Llama& model, Collective& pp);

    // Runs `micro_batches` forward and backward passes. `read(k, tokens, targets)` fills
    // micro-batch k's (B, T) tokens and targets; it is called on every stage, which reads only
    // what it needs. The first backward overwrites the gradients (model::Grads::overwrite), the
    // others add to them; the last is given `ready` (model::Llama::backward).
    PipelineStats run(int64_t micro_batches, float grad_scale,
                      const std::function<void(int64_t, int32_t*, int32_t*)>& read,
                      int64_t rows_per_micro_batch, const model::GradsReady& ready);

private:
    model::Llama& model_;
    Collective& pp_;
    Arena io_;
    float *x_, *g_;  // the activation and the gradient received, (rows(), dim)
};

}  // namespace kiln::train
