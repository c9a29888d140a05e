#pragma once
// The backend seam: a table of function pointers, one per op (see ops.h for the conventions).
// cpu/ and reference/ fill one each (cuda/ when built with CUDA); model/ receives a table.
//
// Every pointer an op takes is the backend's memory (`memory`: host memory for the CPU tables,
// device memory for CUDA), except `copy`'s, either side of which may be host memory. A caller
// holding the backend's memory touches it only through these ops, so the same caller runs on
// every backend.
#include <functional>
#include <vector>

#include "core/arena.h"
#include "kernels/ops.h"

namespace kiln::kernels {

struct Range {  // elements [begin, end)
    int64_t begin = 0, end = 0;
};

struct Kernels {
    const char* name;
    Precision precision;
    // The dtype of what products write for this table's ops alone to read: the packed qkv and
    // attention's output gradient (attention's inputs), gate/up and h's gradient (SwiGLU's).
    // f32 on the host tables, whose bits must not move; bf16 on a device's bf16 table, as
    // autocast keeps them, where in f32 they were about a quarter of a block's memory traffic.
    DType op_inputs;

    // Bytes of scratch that gemm (operands of at most `max_operand` elements) and attention
    // (shape `a`) need; the caller hands that much to every call as a Workspace.
    size_t (*workspace_bytes)(int64_t max_operand, const Attention& a);

    void (*gemm)(const Gemm& g, Workspace ws);

    // out (M, C) = wte[tokens[m]], a zero row where tokens[m] < 0 (a token another tensor-
    // parallel rank holds)                       tokens (M), wte (V, C) f32 or bf16 (wte_type)
    void (*embedding_forward)(float* out, const int32_t* tokens, const void* wte, DType wte_type,
                              int64_t M, int64_t C);
    // dwte (V, C) += scatter of dout (M, C) by tokens; rows with tokens[m] < 0 are skipped
    void (*embedding_backward)(float* dwte, const float* dout, const int32_t* tokens, int64_t M,
                               int64_t C);

    // out (M, C) = x * rstd * w, written as out_type (f32, or bf16 when only products read
    // it); rstd (M) = 1 / sqrt(mean(x^2) + eps)
    void (*rmsnorm_forward)(void* out, DType out_type, float* rstd, const float* x, const float* w,
                            int64_t M, int64_t C, float eps);
    // dx (M, C) += d/dx, and where dx_bf16 is not null, dx_bf16 (M, C) = bf16(dx) after the
    // sum (for the products that read it next); dw (C) += d/dw; given dout (M, C), x, w, rstd
    // from the forward
    void (*rmsnorm_backward)(float* dx, uint16_t* dx_bf16, float* dw, const float* dout,
                             const float* x, const float* w, const float* rstd, int64_t M,
                             int64_t C);

    // Bytes one attention forward leaves for its backward (`saved`), beside its output.
    size_t (*attention_saved_bytes)(const Attention& a);
    // out (M, H*D) = softmax(q k^T / sqrt(D) + causal mask) v, with q and k rotated first when
    // the Attention has rope tables (see ops.h), written in the compute dtype (f32, or bf16 in a
    // bf16 table: only products and the backward read it); qkv read as in_type (f32 or bf16).
    // `saved` (attention_saved_bytes) keeps what else the backward needs: the softmax (B, H, T,
    // T), entries above the diagonal 0, in the compute dtype, or (a fused kernel's) each row's
    // log-sum-exp.
    void (*attention_forward)(void* out, void* saved, const void* qkv, DType in_type,
                              const Attention& a, Workspace ws);
    // dqkv (M, ldqkv) = gradient of the attention output dout (M, H*D) w.r.t. the packed qkv
    // (overwritten, all three parts), written as dqkv_type (f32 or bf16: its readers are
    // products); dout and qkv read as in_type; out, qkv and saved as given to the forward, out
    // as it left it.
    void (*attention_backward)(void* dqkv, DType dqkv_type, const void* dout, const void* out,
                               const void* qkv, DType in_type, const void* saved,
                               const Attention& a, Workspace ws);

    // h (M, F) = silu(gate) * up where gu (M, 2F) holds gate in [0, F) and up in [F, 2F);
    // written as h_type (f32 or bf16); gu read as in_type (f32 or bf16)
    void (*swiglu_forward)(void* h, DType h_type, const void* gu, DType in_type, int64_t M,
                           int64_t F);
    // dgu (M, 2F) = gradient w.r.t. gate and up, given dh (M, F); written as dgu_type; dh and gu
    // read as in_type
    void (*swiglu_backward)(void* dgu, DType dgu_type, const void* dh, const void* gu,
                            DType in_type, int64_t M, int64_t F);

    // Cross-entropy in two halves, so that a vocabulary split over tensor-parallel ranks can
    // combine the row statistics in between. logits (M, V); targets (M) index this V, or are
    // < 0 (ignored, or held by another rank).
    // Per row: max[m] = max_v logits; sumexp[m] = sum_v exp(logits - max[m]);
    // target_logit[m] = logits[m][targets[m]] (0 when targets[m] < 0).
    void (*logit_stats)(const float* logits, const int32_t* targets, int64_t M, int64_t V,
                        float* max, float* sumexp, float* target_logit);
    // dlogits (M, V) = row_scale[m] * (exp(logits - max[m]) / sumexp[m] - onehot(targets[m])),
    // written as dlogits_type (f32 or bf16); f32 dlogits may alias logits.
    void (*cross_entropy_backward)(const float* logits, const int32_t* targets, const float* max,
                                   const float* sumexp, const float* row_scale, int64_t M,
                                   int64_t V, void* dlogits, DType dlogits_type);

    // Both of the above for a whole vocabulary on one rank, row by row while each row is in
    // cache: losses[m] = log(sumexp) + max - target logit (0 where targets[m] < 0) and, when
    // dlogits is not null, the gradient as cross_entropy_backward writes it.
    void (*cross_entropy)(const float* logits, const int32_t* targets, const float* row_scale,
                          int64_t M, int64_t V, float* losses, void* dlogits, DType dlogits_type);

    // AdamW on n elements with g' = grad_scale * g, decoupled weight decay, bias correction:
    // m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2; p -= lr (mhat / (sqrt(vhat) + eps) + wd p).
    // When p_bf16 is not null it receives bf16(p) after the update.
    void (*adamw)(float* p, uint16_t* p_bf16, float* m, float* v, const float* g, int64_t n,
                  const AdamWStep& s);

    // dst (n) = bf16(src), round to nearest even
    void (*to_bf16)(uint16_t* dst, const float* src, int64_t n);

    // --- Memory, and the small ops around the products that touch it ---
    const Memory* memory;  // where arenas of this backend's tensors are allocated
    // Host memory that copies of those tensors are best staged in: pinned memory for a device
    // (copies run at the link's speed), plain host memory for the host tables.
    const Memory* staging;
    // dst = src, `bytes` of them; either may be host memory (the only op that takes it). Done
    // when it returns.
    void (*copy)(void* dst, const void* src, size_t bytes);
    void (*zero)(void* dst, size_t bytes);
    // dst (n) = f32(src), bf16 widened
    void (*widen)(float* dst, const uint16_t* src, int64_t n);
    // y (n) = a + b; y may alias a or b
    void (*add)(float* y, const float* a, const float* b, int64_t n);
    // local (n) = ids - begin where begin <= ids < begin + count, else -1: the ids of one
    // tensor-parallel rank's vocabulary slice. With `weight` not null also weight (n) = value
    // where ids >= 0, else 0 (the cross-entropy's row weights).
    void (*slice_ids)(int32_t* local, float* weight, const int32_t* ids, int64_t n, int64_t begin,
                      int64_t count, float value);
    // Cross-entropy over a vocabulary split over tensor-parallel ranks, between and after the
    // all-reduces of logit_stats' statistics (max by maximum, the others by sum):
    // sumexp (M) *= exp(local_max - max), where local_max is this rank's max before its
    // all-reduce; then losses (M) = log(sumexp) + max - target_logit where targets >= 0, else 0.
    void (*rescale_sumexp)(float* sumexp, const float* local_max, const float* max, int64_t M);
    void (*row_losses)(float* losses, const float* max, const float* sumexp,
                       const float* target_logit, const int32_t* targets, int64_t M);
    // total[0] += the sum of x (n), accumulated in double from zero in index order on a host
    // (on a device in the order of a block reduction), then added: a step's summed loss, kept
    // where the losses are so that nothing waits for it until the step ends.
    void (*sum_into)(double* total, const float* x, int64_t n);
    // Sum of the squares of x's elements in `ranges`, accumulated in double (the gradient
    // norm), returned to the host: one wait on a device, however many ranges.
    double (*sum_squares)(const float* x, const std::vector<Range>& ranges);
    // Returns once every op called so far has run: a device's ops only queue their work. For
    // timings that say where a step's time went; host tables' ops are done when they return.
    void (*wait)();

    // Autotuning of the products (gemm and attention's). platform: what a plan holds for (the
    // hardware, the threads, the libraries' versions), also the key of the measured peak; null
    // when there is nothing to name. tune and the rest: null when there is nothing to tune.
    std::string (*platform)();
    // Tuning runs as passes of the caller's work (a training step's forward and backward, the
    // same products in the same order each time): tune(part, parts) starts the first, in which
    // each new product shape whose name hashes to `part` of `parts` finds its candidate
    // implementations, drops those that compute other numbers than the default or are plainly
    // slower, and leaves meaningless values in its output (the caller's pass is throwaway);
    // the other shapes run their default. After each pass tune_next() says whether another is
    // needed; in those, each candidate is timed where the step runs it. When it says no, every
    // tuned shape runs its fastest candidate and tuned() lists those choices.
    void (*tune)(int part, int parts);
    bool (*tune_next)();
    Plan (*tuned)();  // the choices made since tune()
    // Stops tuning. From now on every product runs its choice in `plan` (the default for a
    // shape it lacks or a choice this library does not offer); shapes already seen are redone.
    void (*use)(const Plan& plan);

    // Recorded device work, replayed without the host's launches: record(work) calls `work`
    // with the ops it queues recorded instead of run, and returns the recording, an executable
    // graph; replay(graph) queues the same work again (the same pointers, sizes and scalars);
    // release(graph) frees it. Throws Error where the work cannot be recorded (an op in it waits
    // for the device or reads host memory); nothing of it has run then. Null on the host tables,
    // whose ops run as they are called.
    void* (*record)(const std::function<void()>& work);
    void (*replay)(void* graph);
    void (*release)(void* graph);
};

}  // namespace kiln::kernels
