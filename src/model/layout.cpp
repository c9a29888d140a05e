#include "model/layout.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace kiln::model {

int64_t Layout::add(std::string name, std::string hf_name, std::vector<int64_t> full_shape,
                    SplitAxis split, bool decay) {
    std::vector<int64_t> shape = full_shape;
    if (split == SplitAxis::rows)
        shape[0] /= tp;
    if (split == SplitAxis::cols)
        shape[1] /= tp;
    ParamInfo p{
        std::move(name), std::move(hf_name), shape, std::move(full_shape), total_, 1, split, decay};
    for (int64_t d : p.shape)
        p.numel *= d;
    total_ += p.numel;
    params_.push_back(std::move(p));
    return params_.back().offset;
}

std::pair<int64_t, int64_t> Layout::stage_layers(int64_t n_layers, int pp, int stage) {
    return {stage * n_layers / pp, (stage + 1) * n_layers / pp};
}

Layout::Layout(const LlamaConfig& c, int tp_size, int rank, int pp_size, int stage)
    : tp(tp_size), tp_rank(rank), pp(pp_size), pp_rank(stage) {
    const int64_t C = c.dim, D = c.head_dim(), F = c.ffn_dim();
    const int64_t H = c.n_heads, Hkv = c.n_kv_heads, V = c.vocab_size;
    vocab_begin = rank * (V / tp);
    const double residual_scale = 1.0 / std::sqrt(2.0 * double(c.n_layers));
    const auto [first, last] = stage_layers(c.n_layers, pp, pp_rank);
    first_layer = first;
    if (first_stage())
        embedding =
            add("tok_embeddings", "model.embed_tokens.weight", {V, C}, SplitAxis::rows, true);
    for (int64_t l = first; l < last; l++) {
        auto n = [l](const char* s) { return fmt::format("layers.{}.{}", l, s); };
        auto hf = [l](const char* s) { return fmt::format("model.layers.{}.{}.weight", l, s); };
        BlockParams b;
        b.attention_norm =
            add(n("attention_norm"), hf("input_layernorm"), {C}, SplitAxis::none, false);
        b.wqkv = add(n("attention.wq"), hf("self_attn.q_proj"), {H * D, C}, SplitAxis::rows, true);
        add(n("attention.wk"), hf("self_attn.k_proj"), {Hkv * D, C}, SplitAxis::rows, true);
        add(n("attention.wv"), hf("self_attn.v_proj"), {Hkv * D, C}, SplitAxis::rows, true);
        b.wo = add(n("attention.wo"), hf("self_attn.o_proj"), {C, H * D}, SplitAxis::cols, true);
        params_.back().init_scale = residual_scale;
        b.ffn_norm =
            add(n("ffn_norm"), hf("post_attention_layernorm"), {C}, SplitAxis::none, false);
        b.w13 = add(n("feed_forward.w1"), hf("mlp.gate_proj"), {F, C}, SplitAxis::rows, true);
        add(n("feed_forward.w3"), hf("mlp.up_proj"), {F, C}, SplitAxis::rows, true);
        b.w2 = add(n("feed_forward.w2"), hf("mlp.down_proj"), {C, F}, SplitAxis::cols, true);
        params_.back().init_scale = residual_scale;
        blocks.push_back(b);
    }
    if (!last_stage())
        return;
    final_norm = add("norm", "model.norm.weight", {C}, SplitAxis::none, false);
    output = add("output", "lm_head.weight", {V, C}, SplitAxis::rows, true);
}

void Layout::shard_from_full(const ParamInfo& p, const float* full, float* shard) const {
    if (p.tp_split == SplitAxis::cols) {
        const int64_t rows = p.shape[0], cols = p.shape[1], full_cols = p.full_shape[1];
        for (int64_t r = 0; r < rows; r++) {
            std::copy(full + r * full_cols + tp_rank * cols,
                      full + r * full_cols + (tp_rank + 1) * cols, shard + r * cols);
        }
    } else {
        const int64_t skip = p.tp_split == SplitAxis::rows ? tp_rank * p.numel : 0;
        std::copy(full + skip, full + skip + p.numel, shard);
    }
}

void Layout::full_from_shard(const ParamInfo& p, const float* shard, int rank, float* full) const {
    if (p.tp_split == SplitAxis::cols) {
        const int64_t rows = p.shape[0], cols = p.shape[1], full_cols = p.full_shape[1];
        for (int64_t r = 0; r < rows; r++) {
            std::copy(shard + r * cols, shard + (r + 1) * cols, full + r * full_cols + rank * cols);
        }
    } else {
        const int64_t skip = p.tp_split == SplitAxis::rows ? rank * p.numel : 0;
        std::copy(shard, shard + p.numel, full + skip);
    }
}

const ParamInfo* Layout::find(const std::string& name) const {
    for (const auto& p : params_) {
        if (p.name == name)
            return &p;
    }
    return nullptr;
}

}  // namespace kiln::model
