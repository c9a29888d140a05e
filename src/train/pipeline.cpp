#include "train/pipeline.h"

#include <algorithm>
#include <chrono>
#include <vector>

#include "core/error.h"

namespace kiln::train {

Pipeline::Pipeline(model::Llama& model, Collective& pp)
    : model_(model), pp_(pp), io_("pipeline stage inputs", *model.kernels().memory) {
    const int64_t numel = model.rows() * model.config().dim;
    const size_t x_at = io_.add("activation", numel, DType::f32);
    const size_t g_at = io_.add("gradient", numel, DType::f32);
    io_.allocate();
    x_ = io_.get<float>(x_at), g_ = io_.get<float>(g_at);
}

PipelineStats Pipeline::run(int64_t m, float grad_scale,
                            const std::function<void(int64_t, int32_t*, int32_t*)>& read,
                            int64_t tokens_per_micro_batch, const model::GradsReady& ready) {
    model::Llama& model = model_;
    Collective& pp = pp_;
    const int p = pp.size(), s = pp.rank();
    const bool first = s == 0, last = s == p - 1;
    const int64_t inflight = std::min<int64_t>(p - s, m);
    const int64_t warmup = std::min<int64_t>(p - s - 1, m);
    const size_t bytes = size_t(model.rows() * model.config().dim) * sizeof(float);
    float *x = x_, *g = g_;
    const size_t n = size_t(tokens_per_micro_batch);
    std::vector<int32_t> tokens(n), targets(n);
    PipelineStats stats;
    const int next = last ? -1 : s + 1, prev = first ? -1 : s - 1;

    // The exchanges, each a no-op where the neighbour does not exist.
    auto exchange = [&](const void* send, int to, void* recv, int from) {
        const auto t0 = std::chrono::steady_clock::now();
        pp.exchange(send, to >= 0 && send ? bytes : 0, to, recv, from >= 0 && recv ? bytes : 0,
                    from);
        stats.wait_s +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    auto slot = [&](int64_t k) { return int(k % inflight); };
    auto mode = [](int64_t k) {
        return k == 0 ? model::Grads::overwrite : model::Grads::accumulate;
    };
    // Forward of micro-batch k from x (ignored on the first stage); on the last, its loss.
    auto forward = [&](int64_t k) {
        read(k, tokens.data(), targets.data());
        model.forward(slot(k), tokens.data(), x);
        if (last)
            model.loss(targets.data(), grad_scale, mode(k));
    };
    auto backward = [&](int64_t k) {
        model.backward(slot(k), g, mode(k), k + 1 == m ? &ready : nullptr);
    };
    auto output = [&](int64_t k) { return last ? nullptr : model.output(slot(k)); };
    auto input_grad = [&] { return first ? nullptr : model.input_grad(); };

    for (int64_t k = 0; k < warmup; k++) {
        exchange(nullptr, -1, x, prev);
        forward(k);
        exchange(output(k), next, nullptr, -1);
    }
    const int64_t steady = m - warmup;
    if (steady > 0)
        exchange(nullptr, -1, x, prev);
    for (int64_t k = 0; k < steady; k++) {
        const int64_t f = warmup + k;
        forward(f);
        exchange(output(f), next, g, next);  // send activation f, receive gradient k
        backward(k);
        if (k + 1 < steady)
            exchange(input_grad(), prev, x, prev);  // gradient k back, activation f + 1 in
        else
            exchange(input_grad(), prev, nullptr, -1);
    }
    for (int64_t k = steady; k < m; k++) {
        exchange(nullptr, -1, g, next);
        backward(k);
        exchange(input_grad(), prev, nullptr, -1);
    }
    if (last)
        stats.loss = model.take_loss();
    return stats;
}

}  // namespace kiln::train
