#pragma once
// Causal attention as matrix products with row passes between them (plain C++, host side): the
// products of every (sequence b, query head h) pair run as Gemms, so on a GPU they are cuBLASLt's
// tensor-core products; the row passes are attention_math.h's. An executor runs both:
//   x.gemm(const Gemm&)                         one product (ops.h), in the table's precision
//   x.softmax(probs, scores)                    forward rows: masked softmax of scores into probs
//   x.softmax_backward(ds, dp, probs)           backward rows: ds from dp and probs
// attention.cu's executor launches cuBLASLt and the row kernels; test_kernel_math.cpp's runs the
// reference backend's gemm and replays the rows on the host, so this decomposition (offsets,
// strides, transpositions, the sums over a grouped-query head's queries) is checked on every CI
// run.
//
// Shapes (ops.h): qkv (M, ldqkv) rotated, as `qt` (f32, or its bf16 copy); out (M, H*D) f32;
// probs (B, H, T, T) of `pt`; scores / dp (B, H, T, T) f32 scratch; ds (B, H, T, T) of `dt`
// (may be dp itself when f32); dout (M, H*D) of `ot`; grad (M, ldqkv) f32, every element
// written. The square of scores is computed whole and the mask applied by the row passes: this
// rung spends twice the causal products' work for tensor-core speed; a fused kernel is the next.
#include <cstdint>

#include "core/dtype.h"
#include "kernels/cuda/attention_math.h"
#include "kernels/ops.h"

namespace kiln::kernels::cuda {

// Element `offset` of a buffer of dtype `t`.
inline const void* element(const void* base, DType t, int64_t offset) {
    return static_cast<const char*>(base) + offset * int64_t(dtype_size(t));
}

// The (b, h) square of a (B, H, T, T) buffer, as an element offset.
inline int64_t square_at(const Attention& a, int64_t b, int64_t h) {
    return (b * a.H + h) * a.T * a.T;
}

// C (rows, cols) = alpha op(A) op(B) (+ C), row-major operands given by element offsets.
inline Gemm product(int64_t M, int64_t N, int64_t K, const void* a, DType at, int64_t lda,
                    bool trans_a, const void* b, DType bt, int64_t ldb, bool trans_b, float* c,
                    int64_t ldc, float alpha = 1.0f, bool accumulate = false) {
    Gemm g;
    g.M = M, g.N = N, g.K = K;
    g.a = a, g.a_type = at, g.lda = lda, g.trans_a = trans_a;
    g.b = b, g.b_type = bt, g.ldb = ldb, g.trans_b = trans_b;
    g.c = c, g.ldc = ldc, g.alpha = alpha, g.accumulate = accumulate;
    return g;
}

template <typename Exec>
void attention_products_forward(Exec& x, float* out, void* probs, DType pt, const void* qkv,
                                DType qt, const Attention& a, float* scores) {
    const int64_t T = a.T, D = a.D, HD = a.H * a.D;
    for (int64_t b = 0; b < a.B; b++) {
        for (int64_t h = 0; h < a.H; h++) {  // scores = q k^T / sqrt(D)
            x.gemm(product(T, T, D, element(qkv, qt, q_at(a, b * T, h)), qt, a.ldqkv, false,
                           element(qkv, qt, k_at(a, b * T, h)), qt, a.ldqkv, true,
                           scores + square_at(a, b, h), T, attention_scale(a)));
        }
    }
    x.softmax(probs, scores);
    for (int64_t b = 0; b < a.B; b++) {
        for (int64_t h = 0; h < a.H; h++) {  // out = probs v
            x.gemm(product(T, D, T, element(probs, pt, square_at(a, b, h)), pt, T, false,
                           element(qkv, qt, v_at(a, b * T, h)), qt, a.ldqkv, false,
                           out + b * T * HD + h * D, HD));
        }
    }
}

template <typename Exec>
void attention_products_backward(Exec& x, float* grad, const void* dout, DType ot, const void* qkv,
                                 DType qt, const void* probs, DType pt, const Attention& a,
                                 float* dp, void* ds, DType dt) {
    const int64_t T = a.T, D = a.D, HD = a.H * a.D, G = a.H / a.Hkv;
    for (int64_t b = 0; b < a.B; b++) {
        for (int64_t h = 0; h < a.H; h++) {  // dp = dout v^T
            x.gemm(product(T, T, D, element(dout, ot, b * T * HD + h * D), ot, HD, false,
                           element(qkv, qt, v_at(a, b * T, h)), qt, a.ldqkv, true,
                           dp + square_at(a, b, h), T));
        }
    }
    x.softmax_backward(ds, dp, probs);
    for (int64_t b = 0; b < a.B; b++) {
        for (int64_t h = 0; h < a.H; h++) {  // dq = ds k
            x.gemm(product(T, D, T, element(ds, dt, square_at(a, b, h)), dt, T, false,
                           element(qkv, qt, k_at(a, b * T, h)), qt, a.ldqkv, false,
                           grad + q_at(a, b * T, h), a.ldqkv));
        }
        // dk = sum over the kv head's queries of ds^T q; dv = the same of probs^T dout.
        for (int64_t h = 0; h < a.H; h++) {
            const bool more = h % G > 0;  // the group's first query head writes, the rest add
            x.gemm(product(T, D, T, element(ds, dt, square_at(a, b, h)), dt, T, true,
                           element(qkv, qt, q_at(a, b * T, h)), qt, a.ldqkv, false,
                           grad + k_at(a, b * T, h), a.ldqkv, 1.0f, more));
            x.gemm(product(T, D, T, element(probs, pt, square_at(a, b, h)), pt, T, true,
                           element(dout, ot, b * T * HD + h * D), ot, HD, false,
                           grad + v_at(a, b * T, h), a.ldqkv, 1.0f, more));
        }
    }
}

}  // namespace kiln::kernels::cuda
