#pragma once
// The named parameter layout: the one table that knows every parameter's name, shape, offset in
// the flat buffers, Hugging Face name, tensor-parallel split axis and weight-decay tag.
// Optimizer, checkpoint and export iterate it; nothing addresses parameters by index.
//
// Within a layer, wq|wk|wv are adjacent (one fused (H+2Hkv)*D x C product) and so are w1|w3
// (gate|up, one fused 2F x C product).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"

namespace kiln::model {

// How tensor parallelism splits a tensor: by output rows (column-parallel linear, vocab-parallel
// embedding), by input columns (row-parallel linear), or not at all (norms).
enum class SplitAxis { none, rows, cols };

struct ParamInfo {
    std::string name;                 // kiln name, e.g. "layers.0.attention.wq"
    std::string hf_name;              // e.g. "model.layers.0.self_attn.q_proj.weight"
    std::vector<int64_t> shape;       // this tensor-parallel rank's shard
    std::vector<int64_t> full_shape;  // the whole tensor (checkpoints and exports hold this)
    int64_t offset = 0;               // in elements, into the flat parameter/gradient buffers
    int64_t numel = 0;
    SplitAxis tp_split = SplitAxis::none;
    bool decay = true;  // AdamW weight decay applies (not to norm weights)
    // The initial weights' std is train.init_std times this: 1/sqrt(2 n_layers) for the two
    // products that write into the residual stream (wo, w2), as Megatron-LM and GPT-2 scale
    // them, so that the stream's variance does not grow with depth; 1 elsewhere.
    double init_scale = 1.0;
};

// Element offsets of one block's parameters.
struct BlockParams {
    int64_t attention_norm, wqkv, wo, ffn_norm, w13, w2;
};

// The layout of one rank's shard of the model (tp = pp = 1: the whole model).
//
// Tensor parallelism: column-parallel tensors (wq, wk, wv, w1, w3, embedding and output by
// vocabulary) keep rows [r*n/tp, (r+1)*n/tp); row-parallel ones (wo, w2) keep those columns;
// norms are whole on every rank.
//
// Pipeline parallelism: stage s of pp holds blocks [s*L/pp, (s+1)*L/pp) (stage_layers()); the
// first stage also the embedding, the last the final norm and the output. A parameter's name
// is the same whatever stage holds it, which is how checkpoints move between layouts.
class Layout {
public:
    explicit Layout(const LlamaConfig& config, int tp = 1, int tp_rank = 0, int pp = 1,
                    int pp_rank = 0);
    // The global layers [first, last) of stage `stage` of `pp`.
    static std::pair<int64_t, int64_t> stage_layers(int64_t n_layers, int pp, int stage);
    bool first_stage() const { return pp_rank == 0; }
    bool last_stage() const { return pp_rank == pp - 1; }

    const std::vector<ParamInfo>& params() const { return params_; }
    int64_t total() const { return total_; }
    const ParamInfo* find(const std::string& name) const;

    // Element offsets; -1 for a tensor another pipeline stage holds.
    int64_t embedding = -1, final_norm = -1, output = -1;
    std::vector<BlockParams> blocks;  // [layer - first_layer], this stage's blocks
    int64_t first_layer = 0;          // the global index of blocks[0]
    int tp = 1, tp_rank = 0, pp = 1, pp_rank = 0;
    int64_t vocab_begin = 0;  // first token id of this rank's vocabulary slice

    // Copies between a whole tensor (full_shape) and this rank's shard of it (shape).
    void shard_from_full(const ParamInfo& p, const float* full, float* shard) const;
    void full_from_shard(const ParamInfo& p, const float* shard, int rank, float* full) const;

private:
    int64_t add(std::string name, std::string hf_name, std::vector<int64_t> shape, SplitAxis split,
                bool decay);
    std::vector<ParamInfo> params_;
    int64_t total_ = 0;
};

}  // namespace kiln::model
