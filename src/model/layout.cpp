#include "model/layout.h"

#include <fmt/format.h>

namespace kiln::model {

int64_t Layout::add(std::string name, std::string hf_name, std::vector<int64_t> shape,
                    SplitAxis split, bool decay) {
    ParamInfo p{std::move(name), std::move(hf_name), std::move(shape), total_, 1, split, decay};
    for (int64_t d : p.shape)
        p.numel *= d;
    total_ += p.numel;
    params_.push_back(std::move(p));
    return params_.back().offset;
}

Layout::Layout(const LlamaConfig& c) {
    const int64_t C = c.dim, D = c.head_dim(), F = c.ffn_dim();
    const int64_t H = c.n_heads, Hkv = c.n_kv_heads, V = c.vocab_size;
    embedding = add("tok_embeddings", "model.embed_tokens.weight", {V, C}, SplitAxis::rows, true);
    for (int64_t l = 0; l < c.n_layers; l++) {
        auto n = [l](const char* s) { return fmt::format("layers.{}.{}", l, s); };
        auto hf = [l](const char* s) { return fmt::format("model.layers.{}.{}.weight", l, s); };
        BlockParams b;
        b.attention_norm =
            add(n("attention_norm"), hf("input_layernorm"), {C}, SplitAxis::none, false);
        b.wqkv = add(n("attention.wq"), hf("self_attn.q_proj"), {H * D, C}, SplitAxis::rows, true);
        add(n("attention.wk"), hf("self_attn.k_proj"), {Hkv * D, C}, SplitAxis::rows, true);
        add(n("attention.wv"), hf("self_attn.v_proj"), {Hkv * D, C}, SplitAxis::rows, true);
        b.wo = add(n("attention.wo"), hf("self_attn.o_proj"), {C, H * D}, SplitAxis::cols, true);
        b.ffn_norm =
            add(n("ffn_norm"), hf("post_attention_layernorm"), {C}, SplitAxis::none, false);
        b.w13 = add(n("feed_forward.w1"), hf("mlp.gate_proj"), {F, C}, SplitAxis::rows, true);
        add(n("feed_forward.w3"), hf("mlp.up_proj"), {F, C}, SplitAxis::rows, true);
        b.w2 = add(n("feed_forward.w2"), hf("mlp.down_proj"), {C, F}, SplitAxis::cols, true);
        blocks.push_back(b);
    }
    final_norm = add("norm", "model.norm.weight", {C}, SplitAxis::none, false);
    output = add("output", "lm_head.weight", {V, C}, SplitAxis::rows, true);
}

const ParamInfo* Layout::find(const std::string& name) const {
    for (const auto& p : params_) {
        if (p.name == name)
            return &p;
    }
    return nullptr;
}

}  // namespace kiln::model
