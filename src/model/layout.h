#pragma once
// The named parameter layout: the one table that knows every parameter's name, shape, offset in
// the flat buffers, Hugging Face name, tensor-parallel split axis and weight-decay tag.
// Optimizer, checkpoint and export iterate it; nothing addresses parameters by index.
//
// Within a layer, wq|wk|wv are adjacent (one fused (H+2Hkv)*D x C product) and so are w1|w3
// (gate|up, one fused 2F x C product).
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace kiln::model {

// How tensor parallelism splits a tensor: by output rows (column-parallel linear, vocab-parallel
// embedding), by input columns (row-parallel linear), or not at all (norms).
enum class SplitAxis { none, rows, cols };

struct ParamInfo {
    std::string name;     // kiln name, e.g. "layers.0.attention.wq"
    std::string hf_name;  // e.g. "model.layers.0.self_attn.q_proj.weight"
    std::vector<int64_t> shape;
    int64_t offset = 0;  // in elements, into the flat parameter/gradient buffers
    int64_t numel = 0;
    SplitAxis tp_split = SplitAxis::none;
    bool decay = true;  // AdamW weight decay applies (not to norm weights)
};

// Element offsets of one block's parameters.
struct BlockParams {
    int64_t attention_norm, wqkv, wo, ffn_norm, w13, w2;
};

class Layout {
public:
    explicit Layout(const LlamaConfig& config);

    const std::vector<ParamInfo>& params() const { return params_; }
    int64_t total() const { return total_; }
    const ParamInfo* find(const std::string& name) const;

    int64_t embedding = 0, final_norm = 0, output = 0;  // element offsets
    std::vector<BlockParams> blocks;                    // [layer]

private:
    int64_t add(std::string name, std::string hf_name, std::vector<int64_t> shape, SplitAxis split,
                bool decay);
    std::vector<ParamInfo> params_;
    int64_t total_ = 0;
};

}  // namespace kiln::model
