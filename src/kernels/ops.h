#pragma once
// The operations of a Llama training step, one signature per op, forward and backward in pairs.
// Every backend (reference/, cpu/, cuda/) implements these; model/ calls them through the
// Kernels table (table.h) and never knows which backend it runs on.
//
// Shape letters: B batch (sequences), T time (tokens per sequence), M = B*T rows,
// C model dim, H query heads, Hkv key/value heads, G = H/Hkv, D = C/H head dim,
// F ffn hidden dim, V vocabulary.
//
// Conventions: row-major; `ld*` is the distance in elements between consecutive rows; outputs
// are overwritten (=) unless the comment says they accumulate (+=); no op allocates, logs or
// throws, except that a device's failure (CUDA, cuBLAS) is an Error (core/error.h's
// library_failed); inputs and outputs never alias unless the comment says in place.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace kiln::kernels {

enum class Precision : uint8_t { fp32, bf16 };

// The dtype a precision's products read, and so the dtype of the activations only they read.
constexpr DType compute_dtype(Precision p) {
    return p == Precision::bf16 ? DType::bf16 : DType::f32;
}

// C (M, N) = alpha * op(A) · op(B) (+ C when accumulate; + c_in instead where c_in is set).
// op(A) is (M, K): A is stored (M, K) with row stride lda, or (K, M) when trans_a.
// op(B) is (K, N): B is stored (K, N) with row stride ldb, or (N, K) when trans_b.
// A and B are f32 or bf16; C is f32, or bf16 (c_type, not when accumulating: the f32 sums
// rounded once) on a table whose ops' inputs are bf16 (Kernels::op_inputs), for those. With
// Precision::bf16 an f32 operand is rounded to bf16 (in `workspace`) before the product, which then
// runs in bf16 with f32 accumulation. c_in (M, N), f32 with C's row stride, is what an accumulating
// product adds when it is not C itself (a residual stream's input, with its output C): a device
// reads it in the product's epilogue, where C = c_in first and then += would move the whole of it
// twice more.
struct Gemm {
    int64_t M = 0, N = 0, K = 0;
    const void* a = nullptr;
    int64_t lda = 0;
    bool trans_a = false;
    DType a_type = DType::f32;
    const void* b = nullptr;
    int64_t ldb = 0;
    bool trans_b = false;
    DType b_type = DType::f32;
    void* c = nullptr;
    int64_t ldc = 0;
    DType c_type = DType::f32;
    const float* c_in = nullptr;  // with accumulate: added in place of C (null: C)
    float alpha = 1.0f;
    bool accumulate = false;
};

// Scratch memory a backend may use inside one call; sized by workspace_bytes().
struct Workspace {
    void* ptr = nullptr;
    size_t bytes = 0;
};

// Causal self-attention over the packed qkv rows of one micro-batch.
// qkv (M, ldqkv): per row, H*D query values, then Hkv*D keys, then Hkv*D values. With rope
// tables, the queries and keys are rotated inside (RoPE, Hugging Face's convention: pairs
// (i, i + D/2) of each head, position of row m = m % T, rope_cos/rope_sin (T, D/2)): qkv holds
// them before the rotation and dqkv is the gradient w.r.t. those unrotated values.
struct Attention {
    int64_t B = 0, T = 0, H = 0, Hkv = 0, D = 0;
    int64_t ldqkv = 0;  // = (H + 2*Hkv) * D
    const float* rope_cos = nullptr;
    const float* rope_sin = nullptr;
};

// One AdamW update (see Kernels::adamw). grad_scale multiplies the gradient first (clipping).
struct AdamWStep {
    float lr = 0, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0, grad_scale = 1;
    int64_t t = 1;  // bias-correction step, >= 1
};

// The implementation chosen for each product shape (autotuning, see Kernels::tune): shape ->
// choice, both in the backend's own words.
using Plan = std::map<std::string, std::string>;

// Autotuning's choice among a shape's candidates, given each one's least time in one pass
// (interference only ever adds time; [0] is the default): the fastest, but the default unless
// another beats it by `margin` (noise is not a gain).
inline size_t fastest_candidate(const std::vector<double>& fastest, double margin) {
    size_t best = 0;
    for (size_t i = 1; i < fastest.size(); i++) {
        if (fastest[i] < fastest[best] && fastest[i] < (1 - margin) * fastest[0])
            best = i;
    }
    return best;
}

}  // namespace kiln::kernels
