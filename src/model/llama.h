#pragma once
// The Llama-2 model on one device: parameters, gradients and activations in one arena each,
// forward and backward of a micro-batch through a kernel table (kernels/table.h).
//
// Memory: the arenas are the kernel backend's memory (a device's for CUDA), touched only through
// the table's ops; so is every pointer the model hands out (params(), grads(), output(), ...)
// or takes for a stage's input and gradient. Token ids, targets and full logits are host memory.
//
// Shapes: B sequences x T tokens per micro-batch, M = B*T rows; see kernels/ops.h for letters.
#include <cstdint>
#include <functional>
#include <initializer_list>
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

// Given to the backward of a step's last micro-batch, and called each time this rank's gradients
// at [offset, layout().total()) have become final for the step: from the top of the layout
// (the head, backpropagated first) down to offset 0. The data-parallel reduction of a region
// may start while the backward goes on below it.
using GradsReady = std::function<void(int64_t offset)>;

// How one rank's model is split beyond tensor parallelism (whose group the model is given).
struct Split {
    // Sequence parallelism (tp > 1): between the tensor-parallel products, the residual stream,
    // the norms and the residual adds hold this rank's 1/tp of the rows; an all-gather comes
    // before each column-parallel product and a reduce-scatter after each row-parallel one.
    bool sp = false;
    int pp = 1, pp_rank = 0;  // pipeline stages, and which one this model is (model/layout.h)
    int inflight = 1;         // micro-batches whose activations the stage keeps at once
    // The tensor-parallel sums of activations (a row-parallel product's output, the embedding,
    // the input gradients of the column-parallel products) carried in bf16: the partial sums
    // rounded to bf16, summed, widened back. Only with bf16 products; the residual stream, the
    // cross-entropy's statistics and the gradients of weights stay f32.
    bool bf16_wire = false;
    // The backward's tensor-parallel collectives run beside the products that do not read them
    // (Collective::start); false ends each before the next product.
    bool tp_overlap = true;
};

class Llama {
public:
    // `capacity` >= layout().total(): the flat buffers' length (padding lets data parallelism
    // split them into equal shards; the padding stays zero). With a tensor-parallel group `tp`
    // of more than one rank, this model holds its rank's shard (Megatron layout: column-parallel
    // QKV and gate/up, row-parallel O and down, vocabulary-parallel embedding and LM head) and
    // calls tp's all-reduces in forward and backward.
    Llama(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B, int64_t T,
          Recompute recompute, int64_t capacity = 0, Collective* tp = nullptr,
          const Split& split = {});
    // The bytes such a model holds on one rank of a tensor-parallel group of `tp_size`, computed
    // from the same declarations, without allocating them.
    static ModelBytes bytes(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B,
                            int64_t T, Recompute recompute, int64_t capacity, int tp_size,
                            const Split& split = {});

    const LlamaConfig& config() const { return config_; }
    const Layout& layout() const { return layout_; }
    float* params() { return params_.get<float>(0); }       // (layout().total()) fp32
    float* grads() { return grads_.get<float>(0); }         // (layout().total()) fp32, accumulated
    const kernels::Kernels& kernels() const { return k_; }  // and so the memory it lives in
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
    // buffer is never cleared whole). grad_scale 0: forward only, grads untouched. `last`: see
    // backward(). The loss is summed where the model lives, for take_loss().
    void forward_backward(const int32_t* tokens, const int32_t* targets, float grad_scale,
                          Grads mode = Grads::accumulate, const GradsReady* last = nullptr);
    // The same in two halves: stage_batch() checks the batch and copies it in; then
    // forward_backward_staged() queues only the backend's ops on its memory (no host memory, no
    // waits) and the same ones for the same arguments, so that a device can record it once and
    // replay it (Kernels::record) while stage_batch() puts each new batch in place.
    void stage_batch(const int32_t* tokens, const int32_t* targets);
    void forward_backward_staged(float grad_scale, Grads mode, const GradsReady* last = nullptr);
    // The losses summed (in double, micro-batch after micro-batch) since the last call, and the
    // rows with a target they cover; then starts again from zero. Reads the sum from the
    // backend's memory: on a device, one wait for the work queued so far.
    LossSum take_loss();
    // Forward only, writing the full logits (B, T, V) to `logits` (tests and sampling; one
    // tensor-parallel rank and one stage only).
    void forward_logits(const int32_t* tokens, float* logits);

    // A pipeline stage, one micro-batch at a time; forward_backward() is these in a row on the
    // only stage. Between stages travel this rank's rows of the residual stream: (rows(), C)
    // fp32. `slot` < Split::inflight names the micro-batch whose activations are kept.
    int64_t rows() const { return Ml_; }  // B*T, or B*T / tp with sequence parallelism
    // From `tokens` (B, T) on the first stage, else from `input` (rows(), C).
    void forward(int slot, const int32_t* tokens, const float* input);
    const float* output(int slot) const;  // what forward() left for the next stage
    // Last stage, right after forward(): the loss of the micro-batch (summed for take_loss()),
    // and with grad_scale != 0 the head's backward (the start of backward()).
    void loss(const int32_t* targets, float grad_scale, Grads mode);
    // From `doutput` (rows(), C), the gradient of output(slot), on a stage that is not the last;
    // on the last, from loss(). On the first stage it ends in the embedding's gradient; on the
    // others input_grad() is then the gradient of the stage's input.
    //
    // `last` marks the step's last micro-batch: the gradients are then made final as the
    // backward goes (with sequence parallelism each rank holds its rows' share of the norm
    // weights' gradients, summed here over the tensor-parallel group block by block) and `last`
    // is told of each region that is. With sequence parallelism the step's last micro-batch
    // must pass it.
    void backward(int slot, const float* doutput, Grads mode, const GradsReady* last = nullptr);
    const float* input_grad() const { return dres_; }

private:
    Llama(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B, int64_t T,
          Recompute recompute, Collective* tp, int tp_size, int tp_rank, const Split& split);
    void build(int64_t capacity, bool allocate);
    struct BlockActs {  // one block's saved activations; pointers into acts_
        float *rstd1, *x2, *rstd2;
        // Read only by products (and attention's output by its backward), so written straight
        // in their dtype (compute_type()): the norms' outputs, attention's, and the SwiGLU's.
        void *xn1, *att, *xn2, *h;
        void *qkv, *gu;   // attention's and SwiGLU's inputs, in op_inputs_
        void* attention;  // what else attention's forward keeps for its backward (the softmax)
    };
    struct Operand {  // a matrix as the products read it
        const void* ptr;
        DType type;
    };
    // The weights every product, lookup and norm reads: the bf16 copy in bf16 precision (so a
    // rank whose fp32 master weights are only a shard, under ZeRO-1, needs only the copy whole).
    Operand weight(int64_t offset) const;
    const float* norm_weight(int64_t offset);  // a norm's C weights as f32 (widened from bf16)
    // What the products read: bf16 in bf16 precision, else f32.
    DType compute_type() const { return kernels::compute_dtype(k_.precision); }
    // An activation kept in compute_type(), from element `offset` on.
    Operand input(const void* x, int64_t offset = 0) const;
    // Saved activations of micro-batch `slot`: block l (local index) and the residual stream.
    const BlockActs& acts(int slot, int64_t l) const;
    float* residual(int slot) const;  // (local layers + 1, rows(), C)
    void block_forward(int slot, int64_t l, const float* x, float* out);
    void block_backward(int slot, int64_t l, float* dres, bool accumulate);
    void put_tokens(const int32_t* tokens);    // checked, into tokens_in_
    void put_targets(const int32_t* targets);  // into targets_in_, counted for take_loss()
    void forward_staged(int slot, const float* input);
    void loss_staged(float grad_scale, Grads mode);
    void embed(int slot);
    void final_norm(int slot);
    void head(float grad_scale, float* logits_out, bool accumulate);
    void zero_added_grads();  // the gradients only ever added to: norms and the embedding
    // Sequence parallelism: the norm weights' gradients at `offsets` (C each, at most two)
    // summed over the tensor-parallel group; without it a no-op.
    void sum_norm_grads(std::initializer_list<int64_t> offsets);
    // Sequence parallelism: this rank's rows `local` (rows(), C) of dtype `type` gathered from
    // every rank into `full` (M, C); without it, `local` itself.
    Operand gather_rows(const void* local, void* full, DType type);
    // The same, started (Collective::start): `full` holds the rows after tp_->finish().
    Operand start_gather_rows(const void* local, void* full, DType type);
    // Sequence parallelism: `full` (M, C) summed over the group, this rank's rows of the sum
    // returned (a pointer into `full`); without it, `full` summed in place. In bf16 on the wire
    // with Split::bf16_wire.
    float* sum_rows(float* full);
    // The same in two halves, so that work queued between them may run beside the sum.
    void start_sum_rows(float* full);
    float* finish_sum_rows(float* full);
    // A product's output: f32, or bf16 where only the table's ops read it (Kernels::op_inputs).
    struct Output {
        void* ptr;
        DType type = DType::f32;
        Output(float* f32) : ptr(f32) {}  // NOLINT(google-explicit-constructor): f32 as it is
        Output(void* p, DType t) : ptr(p), type(t) {}
    };
    // y (M, N) = x · W^T, plus `residual` (M, N) where given (it may be y itself)
    void linear_forward(Output y, Operand x, Operand w, int64_t M, int64_t K, int64_t N,
                        const float* residual = nullptr);
    // dw += (or = without accumulate_dw) the weight's gradient
    void linear_backward(Output dx, float* dw, Operand dy, Operand x, Operand w, int64_t M,
                         int64_t K, int64_t N, bool accumulate_dw);
    void linear_dx(Output dx, Operand dy, Operand w, int64_t M, int64_t K, int64_t N);
    void linear_dw(float* dw, Operand dy, Operand x, int64_t M, int64_t K, int64_t N,
                   bool accumulate_dw);
    void unless_overlapped();  // without Split::tp_overlap, ends the collective started
    const float* column_parallel_backward(float* dw, Operand dy, const void* x_local, Operand w,
                                          int64_t K, int64_t N, bool accumulate_dw);
    // y (M, N) = residual + sum over tensor-parallel ranks of x · W^T (a row-parallel product).
    void row_parallel(float* y, const float* residual, Operand x, Operand w, int64_t M, int64_t K,
                      int64_t N);
    void tp_all_reduce(float* data, int64_t n);  // sum over the tensor-parallel group

    LlamaConfig config_;
    Collective* tp_;  // [nullable] the tensor-parallel group
    int tp_size_, tp_rank_;
    Split split_;
    bool sp_;         // sequence parallelism (split_.sp with more than one tensor-parallel rank)
    bool wire_bf16_;  // split_.bf16_wire with more than one tensor-parallel rank
    Layout layout_;
    const kernels::Kernels& k_;
    int64_t B_, T_, M_, Ml_, head_rows_, L_;  // Ml_: rows of the residual stream; L_: local layers
    // This rank's dims: C, D whole; heads, kv heads, FFN width and vocabulary divided by tp.
    int64_t C_, D_, H_, Hkv_, F_, V_, QKV_;
    Recompute recompute_;
    kernels::Attention attn_;

    Arena params_{"parameters", *k_.memory}, grads_{"gradients", *k_.memory};
    Arena params_bf16_{"bf16 weights", *k_.memory}, acts_{"activations", *k_.memory};
    bool bf16_;

    // [slot] (L+1, Ml, C) residual stream: block inputs, then the final block's output
    std::vector<float*> res_;
    std::vector<BlockActs> blocks_;  // [slot * L + layer] (one set when recomputing all)
    float *rope_cos_, *rope_sin_;    // (T, D/2)
    float* rstdf_;                   // (Ml) final norm
    void* xnf_;                      // (Ml, C) final norm output, compute_type()
    float* norm_w_;                  // (C) norm_weight's widened copy
    float *dres_, *dxn_;             // backward scratch; dres_ (Ml, C), dxn_ (M, C)
    void *datt_, *dh_;               // (M, H*D), (M, F) in op_inputs_
    DType op_inputs_;                // the table's (Kernels::op_inputs) in bf16, else f32
    const float* dxnf_ = nullptr;    // (Ml, C) the head's gradient of xnf, in dxn_
    void *dqkv_, *dgu_;              // backward scratch in compute_type()
    float *logits_, *losses_;        // (head_rows, V), (M)
    // (M) cross-entropy statistics; row_local_max_: this rank's max before the group's
    float *row_max_, *row_sum_, *row_target_, *row_scale_, *row_local_max_;
    double* loss_total_;                // (1) the losses summed since take_loss()
    int64_t loss_tokens_ = 0;           // the rows with a target they cover
    int32_t *tokens_in_, *targets_in_;  // (M) each: the last token ids and targets put in
    // [slot] (M) token ids in this rank's vocabulary slice, or -1; (M) the same for targets
    std::vector<int32_t*> local_tokens_;
    int32_t* local_targets_;
    float* norm_grads_;  // sequence parallelism: the norms' gradients, side by side
    // bf16 precision: dres rounded (Ml, C), which each norm's backward leaves beside it for the
    // products that read it next; the LM head's gradient (rows, V)
    uint16_t *dy_bf_, *dlogits_bf_;
    // Sequence parallelism: the gathered rows of a product's input (M, C) in compute_type(), and
    // a row-parallel product's (M, C) fp32 partial sum before its reduce-scatter.
    void* gathered_;
    float* partial_;  // also without sequence parallelism when activations travel in bf16
    uint16_t* wire_;  // (M, C) bf16 partial sums on the wire (Split::bf16_wire), else null
    kernels::Workspace ws_;
};

}  // namespace kiln::model
