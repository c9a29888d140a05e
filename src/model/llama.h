#pragma once
// The Llama-2 model on one device: parameters, gradients and activations in one arena each,
// forward and backward of a micro-batch through a kernel table (kernels/table.h).
//
// Shapes: B sequences x T tokens per micro-batch, M = B*T rows; see kernels/ops.h for letters.
#include <cstdint>
#include <string>

#include "core/arena.h"
#include "core/collective.h"
#include "kernels/table.h"
#include "model/config.h"
#include "model/layout.h"

namespace kiln::model {

// Which activations the backward recomputes instead of keeping:
//   none       keep everything (fastest, most memory)
//   selective  recompute the attention probabilities (the (B,H,T,T) tensor) per block
//   full       keep only each block's input; rerun the block's forward before its backward
enum class Recompute { none, selective, full };
Recompute parse_recompute(const std::string& name);  // throws Error

struct ModelBytes {
    int64_t params = 0, grads = 0, params_bf16 = 0, activations = 0;  // activations: + workspace
};

struct LossSum {
    double sum = 0;      // summed cross-entropy over the rows with a target
    int64_t tokens = 0;  // rows with a target (target >= 0)
};

enum class Grads { accumulate, overwrite };

class Llama {
public:
    // `capacity` >= layout().total(): the flat buffers' length (padding lets data parallelism
    // split them into equal shards; the padding stays zero). With a tensor-parallel group `tp`
    // of more than one rank, this model holds its rank's shard (Megatron layout: column-parallel
    // QKV and gate/up, row-parallel O and down, vocabulary-parallel embedding and LM head) and
    // calls tp's all-reduces in forward and backward.
    Llama(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B, int64_t T,
          Recompute recompute, int64_t capacity = 0, Collective* tp = nullptr);
    // The bytes such a model holds on one rank of a tensor-parallel group of `tp_size`, computed
    // from the same declarations, without allocating them.
    static ModelBytes bytes(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B,
                            int64_t T, Recompute recompute, int64_t capacity, int tp_size);

    const LlamaConfig& config() const { return config_; }
    const Layout& layout() const { return layout_; }
    float* params() { return params_.get<float>(0); }  // (layout().total()) fp32
    float* grads() { return grads_.get<float>(0); }    // (layout().total()) fp32, accumulated
    // The bf16 copy of params() that the forward and backward read in bf16 precision (every
    // weight: products, embedding and norms; layout().total()); null in fp32.
    uint16_t* params_bf16() { return bf16_ ? params_bf16_.get<uint16_t>(0) : nullptr; }
    size_t activation_bytes() const { return acts_.bytes(); }

    // N(0, std) for matrices and embeddings, 1 for norm weights; deterministic in seed, and the
    // same model whatever the tensor-parallel split.
    void init_weights(uint64_t seed, double std);
    // Refreshes params_bf16() from params(); call after changing params() other than through
    // an optimizer that writes both. A no-op in fp32.
    void sync_compute_weights();

    // One micro-batch. tokens, targets (B, T); a target < 0 is ignored. grads() += the
    // gradient of grad_scale * (summed loss), or = it with Grads::overwrite (a step's first
    // micro-batch: the products write the weight gradients instead of adding to them, so the
    // buffer is never cleared whole). grad_scale 0: forward only, grads untouched.
    LossSum forward_backward(const int32_t* tokens, const int32_t* targets, float grad_scale,
                             Grads mode = Grads::accumulate);
    // Forward only, writing the full logits (B, T, V) to `logits` (tests and sampling; one
    // tensor-parallel rank only).
    void forward_logits(const int32_t* tokens, float* logits);

private:
    Llama(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B, int64_t T,
          Recompute recompute, Collective* tp, int tp_size, int tp_rank);
    void build(int64_t capacity, bool allocate);
    struct BlockActs {  // one block's saved activations; pointers into acts_
        float *rstd1, *qkv, *att, *x2, *rstd2, *gu;
        // Read only by products, so written straight in their dtype (compute_type()): the
        // norms' outputs and the SwiGLU output.
        void *xn1, *xn2, *h;
        void* attention;   // what attention's forward keeps for its backward (the softmax, ...)
        uint16_t* att_bf;  // bf16 precision: the attention output rounded for its product
    };
    struct Operand {  // a matrix as the products read it
        const void* ptr;
        DType type;
    };
    // The weights every product, lookup and norm reads: the bf16 copy in bf16 precision (so a
    // rank whose fp32 master weights are only a shard, under ZeRO-1, needs only the copy whole).
    Operand weight(int64_t offset) const;
    const float* norm_weight(int64_t offset);  // a norm's C weights as f32 (widened from bf16)
    // x itself in fp32; in bf16, x rounded into `copy` (n elements) once, for every product.
    Operand operand(const float* x, uint16_t* copy, int64_t n) const;
    // An activation saved by the forward: its bf16 copy in bf16 precision.
    Operand saved(const float* x, const uint16_t* copy) const;
    // What the products read: bf16 in bf16 precision, else f32.
    DType compute_type() const { return kernels::compute_dtype(k_.precision); }
    // An activation kept in compute_type(), from element `offset` on.
    Operand input(const void* x, int64_t offset = 0) const;
    void block_forward(int64_t l, const float* x, float* out);
    void block_backward(int64_t l, float* dres, bool accumulate);
    void embed(const int32_t* tokens);
    LossSum head(const int32_t* targets, float grad_scale, float* logits_out, bool accumulate);
    void linear_forward(float* y, Operand x, Operand w, int64_t M, int64_t K, int64_t N,
                        bool accumulate = false);
    // dw += (or = without accumulate_dw) the weight's gradient
    void linear_backward(float* dx, float* dw, Operand dy, Operand x, Operand w, int64_t M,
                         int64_t K, int64_t N, bool accumulate_dw);
    // y (M, N) = residual + sum over tensor-parallel ranks of x · W^T (a row-parallel product).
    void row_parallel(float* y, const float* residual, Operand x, Operand w, int64_t M, int64_t K,
                      int64_t N);
    void tp_all_reduce(float* data, int64_t n);  // sum over the tensor-parallel group

    LlamaConfig config_;
    Collective* tp_;  // [nullable] the tensor-parallel group
    int tp_size_, tp_rank_;
    Layout layout_;
    const kernels::Kernels& k_;
    int64_t B_, T_, M_, head_rows_;
    // This rank's dims: C, D whole; heads, kv heads, FFN width and vocabulary divided by tp.
    int64_t C_, D_, H_, Hkv_, F_, V_, QKV_;
    Recompute recompute_;
    kernels::Attention attn_;

    Arena params_{"parameters"}, grads_{"gradients"}, params_bf16_{"bf16 weights"};
    Arena acts_{"activations"};
    bool bf16_;

    float* res_;  // (L+1, M, C) residual stream: block inputs, then the final block's output
    std::vector<BlockActs> blocks_;     // [layer] (aliases one set when recomputing everything)
    float *rope_cos_, *rope_sin_;       // (T, D/2)
    float* rstdf_;                      // (M) final norm
    void* xnf_;                         // (M, C) final norm output, compute_type()
    float* norm_w_;                     // (C) norm_weight's widened copy
    float *dres_, *dxn_, *datt_, *dh_;  // backward scratch
    void *dqkv_, *dgu_;                 // backward scratch in compute_type()
    float *logits_, *losses_;           // (head_rows, V), (M)
    float *row_max_, *row_sum_, *row_target_, *row_scale_;  // (M) cross-entropy statistics
    int32_t *local_tokens_, *local_targets_;  // (M) ids in this rank's vocabulary slice, or -1
    uint16_t *dy_bf_, *dlogits_bf_;           // bf16 precision: dy scratch, (rows, V)
    kernels::Workspace ws_;
};

}  // namespace kiln::model
