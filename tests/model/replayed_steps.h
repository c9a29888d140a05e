#pragma once
// A few training steps of a small Llama with each micro-batch's work run through
// kernels::Replays, as the trainer runs them under train.graphs: recorded in the second step and
// replayed after when `record` (and the table records), run as called otherwise. For comparing
// a table's replays with its own calls, or with another table's.
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/replays.h"
#include "model/llama.h"
#include "optim/adamw.h"

namespace kiln::testing {

struct ReplayedSteps {
    std::vector<double> losses;        // each step's summed loss
    std::vector<float> grads, params;  // after the last step, copied to the host
    int recorded = 0;                  // recordings replayed (Replays::recorded)
};

// Three steps of two micro-batches, each a new batch.
inline ReplayedSteps replayed_steps(const kernels::Kernels& k, model::Recompute recompute,
                                    bool record) {
    model::LlamaConfig c;
    c.dim = 64, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = 300;
    c.multiple_of = 16;
    const int64_t B = 2, T = 16, steps = 3, accum = 2;
    model::Llama m(c, k, B, T, recompute);
    optim::AdamW adamw(m.layout(), {}, 0, m.layout().total(), k);
    m.init_weights(11, 0.1);
    kernels::Replays replays(k, record, true);
    ReplayedSteps out;
    std::vector<int32_t> tokens(size_t(B * T)), targets(tokens.size());
    std::mt19937_64 rng(5);
    for (int64_t step = 0; step < steps; step++) {
        for (int64_t micro = 0; micro < accum; micro++) {
            for (auto& t : tokens)
                t = int32_t(rng() % uint64_t(c.vocab_size));
            for (int64_t i = 0; i < B * T; i++)
                targets[size_t(i)] = (i % T) + 1 < T ? tokens[size_t(i + 1)] : -1;
            m.stage_batch(tokens.data(), targets.data());
            const model::Grads mode =
                micro == 0 ? model::Grads::overwrite : model::Grads::accumulate;
            replays.run(int(mode), [&] { m.forward_backward_staged(0.01f, mode); });
        }
        const model::LossSum loss = m.take_loss();
        out.losses.push_back(loss.sum / double(loss.tokens));
        adamw.update(m.params(), m.params_bf16(), m.grads(), 1.0f, 1e-2);
    }
    const int64_t n = m.layout().total();
    out.grads.resize(size_t(n)), out.params.resize(size_t(n));
    k.copy(out.grads.data(), m.grads(), size_t(n) * sizeof(float));
    k.copy(out.params.data(), m.params(), size_t(n) * sizeof(float));
    out.recorded = replays.recorded();
    return out;
}

}  // namespace kiln::testing
