#pragma once
// The row passes of the CUDA causal attention, host- and device-callable like kernel_math.h,
// whose index-space conventions they follow; the products around them are matrix products
// (attention_products.h). `P` is the probabilities' dtype (float, or uint16_t for bf16).
//
// Forward: the products leave the scaled scores s = q k^T / sqrt(D) of every (b, h) pair as
// (B, H, T, T) f32, the whole square. One block per query row (b, h, t) then takes the max of
// s_u over u <= t (block reduction), s_u = exp(s_u - max) and their sum (block reduction), and
// writes the probabilities row s / sum, 0 above the diagonal (the causal mask).
// Backward: the products leave dp = dout v^T the same way. One block per query row takes
// rowdot = sum_u p_u dp_u (block reduction) and writes the whole row of
// ds_u = p_u (dp_u - rowdot) / sqrt(D), 0 above the diagonal, for the products that follow.
// Every element is written once by one thread: no atomics, the same bits every run.
#include "kernels/cuda/kernel_math.h"

namespace kiln::kernels::cuda {

// Offsets of head vectors in the packed rows of qkv (ops.h): query head h of row m; key and
// value of the kv head query head h reads (grouped-query: h / (H / Hkv)).
KILN_HD int64_t q_at(const Attention& a, int64_t m, int64_t h) {
    return m * a.ldqkv + h * a.D;
}
KILN_HD int64_t k_at(const Attention& a, int64_t m, int64_t h) {
    return m * a.ldqkv + (a.H + h / (a.H / a.Hkv)) * a.D;
}
KILN_HD int64_t v_at(const Attention& a, int64_t m, int64_t h) {
    return m * a.ldqkv + (a.H + a.Hkv + h / (a.H / a.Hkv)) * a.D;
}

struct Max {
    KILN_HD float operator()(float a, float b) const { return fmaxf(a, b); }
};

KILN_HD float attention_scale(const Attention& a) {
    return 1.0f / sqrtf(static_cast<float>(a.D));
}

// Query row r = (b, h, t) of the (B, H, T) rows.
struct QueryRow {
    int64_t b, h, t;
    KILN_HD QueryRow(const Attention& a, int64_t r)
        : b(r / (a.H * a.T)), h(r / a.T % a.H), t(r % a.T) {}
    KILN_HD int64_t m(const Attention& a, int64_t time) const { return b * a.T + time; }
};

// Forward phase 1: thread tid's max of the scores s[u], u <= t.
KILN_HD float attention_row_max(const float* s, int64_t t, int tid, int threads) {
    float mx = -INFINITY;
    for (int64_t u = tid; u <= t; u += threads)
        mx = fmaxf(mx, s[u]);
    return mx;
}

// Forward phase 2: s[u] = exp(s[u] - max) for thread tid's u; returns their sum.
KILN_HD float attention_exp(float* s, int64_t t, float max, int tid, int threads) {
    float sum = 0.0f;
    for (int64_t u = tid; u <= t; u += threads) {
        s[u] = expf(s[u] - max);
        sum += s[u];
    }
    return sum;
}

// Forward phase 3: thread tid's entries of the probabilities row (T), 0 above the diagonal.
template <typename P>
KILN_HD void attention_store_probs(P* probs_row, const float* s, int64_t T, int64_t t, float sum,
                                   int tid, int threads) {
    for (int64_t u = tid; u < T; u += threads)
        store(probs_row + u, u <= t ? s[u] / sum : 0.0f);
}

// Backward phase 1: thread tid's part of rowdot = sum_u p_u dp_u over u <= t.
template <typename P>
KILN_HD float attention_rowdot(const float* dp, const P* probs_row, int64_t t, int tid,
                               int threads) {
    float rowdot = 0.0f;
    for (int64_t u = tid; u <= t; u += threads)
        rowdot += load(probs_row + u) * dp[u];
    return rowdot;
}

// Backward phase 2: thread tid's entries of the row ds (T) = p (dp - rowdot) / sqrt(D), 0 above
// the diagonal. ds may be dp itself (f32): each entry is read before the same thread writes it.
template <typename P, typename Out>
KILN_HD void attention_ds_row(Out* ds, const float* dp, const P* probs_row, int64_t T, int64_t t,
                              float rowdot, float scale, int tid, int threads) {
    for (int64_t u = tid; u < T; u += threads)
        store(ds + u, u <= t ? load(probs_row + u) * (dp[u] - rowdot) * scale : 0.0f);
}

}  // namespace kiln::kernels::cuda
