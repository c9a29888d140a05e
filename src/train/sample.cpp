#include "train/sample.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "kernels/backends.h"
#include "model/llama.h"

namespace kiln::train {

struct Sampler::Impl {
    std::unique_ptr<checkpoint::Checkpoint> ck;
    int64_t T = 0;  // the window the model sees
    std::unique_ptr<model::Llama> model;
};

Sampler::Sampler(const std::string& checkpoint, const std::string& precision,
                 const std::string& backend)
    : impl_(new Impl) {
    const kernels::Precision prec =
        kernels::resolve_precision(backend, precision, "--precision").precision;
    const kernels::Kernels& k = kernels::select_kernels(backend, prec, "--backend");
    impl_->ck = std::make_unique<checkpoint::Checkpoint>(checkpoint);
    const model::LlamaConfig& c = impl_->ck->config();
    impl_->T = std::min<int64_t>(c.max_seq_len, 256);
    impl_->model = std::make_unique<model::Llama>(c, k, 1, impl_->T, model::Recompute::none);
    impl_->ck->load(impl_->model->layout(), impl_->model->params(), nullptr, nullptr, 0, 0,
                    checkpoint::tensor_copy(k));
    impl_->model->sync_compute_weights();
}

Sampler::~Sampler() {
    delete impl_;
}

int64_t Sampler::vocab_size() const {
    return impl_->ck->config().vocab_size;
}

std::string Sampler::text(const data::Tokenizer& tokenizer, const std::string& prompt,
                          const SampleOptions& options) const {
    std::vector<int32_t> ids = {tokenizer.bos_id()};
    for (int id : tokenizer.encode(prompt))
        ids.push_back(id);
    ids = continue_(std::move(ids), options, tokenizer.eos_id());
    std::vector<int> pieces(ids.begin() + 1, ids.end());
    if (!pieces.empty() && pieces.back() == tokenizer.eos_id())
        pieces.pop_back();
    return tokenizer.decode(pieces);
}

std::vector<int32_t> Sampler::continue_(std::vector<int32_t> ids, const SampleOptions& o,
                                        int32_t eos) const {
    if (ids.empty())
        throw error("the prompt has no tokens (it needs at least BOS)");
    const int64_t T = impl_->T, V = vocab_size();
    for (int32_t id : ids) {
        if (id < 0 || id >= V)
            throw error("prompt token {} is outside the model's vocabulary of {}", id, V);
    }
    std::mt19937_64 rng(o.seed);
    std::vector<int32_t> window(size_t(T), 0);
    std::vector<float> logits(size_t(T * V));
    std::vector<int32_t> order(static_cast<size_t>(V));
    std::vector<double> p;
    for (int64_t n = 0; n < o.tokens; n++) {
        // The newest T tokens (causal attention: the padding after them changes nothing).
        int64_t len = std::min<int64_t>(int64_t(ids.size()), T);
        std::copy(ids.end() - len, ids.end(), window.begin());
        impl_->model->forward_logits(window.data(), logits.data());
        const float* row = logits.data() + (len - 1) * V;
        int32_t next;
        if (o.temperature <= 0) {
            next = int32_t(std::max_element(row, row + V) - row);
        } else {
            std::iota(order.begin(), order.end(), 0);
            int64_t k = o.top_k > 0 ? std::min(o.top_k, V) : V;
            std::partial_sort(order.begin(), order.begin() + k, order.end(),
                              [&](int32_t a, int32_t b) { return row[a] > row[b]; });
            p.assign(size_t(k), 0);
            for (int64_t i = 0; i < k; i++)
                p[size_t(i)] = std::exp((row[order[size_t(i)]] - row[order[0]]) / o.temperature);
            std::discrete_distribution<int64_t> pick(p.begin(), p.end());
            next = order[size_t(pick(rng))];
        }
        ids.push_back(next);
        if (next == eos)
            break;
    }
    return ids;
}

}  // namespace kiln::train
