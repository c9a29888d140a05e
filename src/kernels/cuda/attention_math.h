#pragma once
// The arithmetic of the CUDA causal attention (the simple rung: exact softmax rows kept in
// `saved` as the table's contract asks, no tiling), host- and device-callable like
// kernel_math.h, whose index-space conventions it follows. qkv here holds queries and keys
// already rotated (attention.cu rotates a copy with rope_at); `P` is the probabilities' dtype
// (float, or uint16_t for bf16).
//
// Forward: one block per query row (b, h, t): scores s_u = q_t . k_u / sqrt(D) for u <= t into
// a row of T floats (shared memory), their max (block reduction), s_u = exp(s_u - max) and
// their sum (block reduction), probs row = s / sum (0 above the diagonal); then out, elementwise
// over (b, t, h, i): sum_u p_u v_u[i], reading the probabilities as stored.
// Backward: one block per query row: dp_u = dout_t . v_u, rowdot = sum_u p_u dp_u (block
// reduction), ds_u = p_u (dp_u - rowdot) / sqrt(D) into a (B, H, T, T) f32 scratch; then
// elementwise: dq[t][i] = sum_u ds_tu k_u[i]; and per key/value row (b, kv head, u):
// dk[u][i] = sum over the group's heads and t >= u of ds_tu q_t[i], dv[u][i] = sum p_tu dout_t[i].
// Each output element is written once by one thread: no atomics, the same bits every run.
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

// Forward phase 1: thread tid's scores s[u], u <= t; returns their max.
KILN_HD float attention_scores(float* s, const float* qkv, const Attention& a, QueryRow r, int tid,
                               int threads) {
    const float scale = attention_scale(a);
    const float* q = qkv + q_at(a, r.m(a, r.t), r.h);
    float mx = -INFINITY;
    for (int64_t u = tid; u <= r.t; u += threads) {
        const float* k = qkv + k_at(a, r.m(a, u), r.h);
        float d = 0.0f;
        for (int64_t i = 0; i < a.D; i++)
            d += q[i] * k[i];
        s[u] = d * scale;
        mx = fmaxf(mx, s[u]);
    }
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

// Forward, elementwise: element i of out (M, H*D) = sum_u p_tu v_u, the probabilities
// (B, H, T, T) read as stored.
template <typename P>
KILN_HD void attention_output_at(float* out, const P* probs, const float* qkv, const Attention& a,
                                 int64_t i) {
    const int64_t d = i % a.D, h = i / a.D % a.H, m = i / (a.D * a.H);
    const int64_t b = m / a.T, t = m % a.T;
    const P* p = probs + ((b * a.H + h) * a.T + t) * a.T;
    float o = 0.0f;
    for (int64_t u = 0; u <= t; u++)
        o += load(p + u) * qkv[v_at(a, b * a.T + u, h) + d];
    out[i] = o;
}

// Backward phase 1: s[u] = dout_t . v_u for thread tid's u <= t; returns its part of
// rowdot = sum_u p_u dp_u.
template <typename P>
KILN_HD float attention_dp(float* s, const P* probs_row, const float* dout, const float* qkv,
                           const Attention& a, QueryRow r, int tid, int threads) {
    const float* dO = dout + r.m(a, r.t) * a.H * a.D + r.h * a.D;
    float rowdot = 0.0f;
    for (int64_t u = tid; u <= r.t; u += threads) {
        const float* v = qkv + v_at(a, r.m(a, u), r.h);
        float d = 0.0f;
        for (int64_t i = 0; i < a.D; i++)
            d += dO[i] * v[i];
        s[u] = d;
        rowdot += load(probs_row + u) * d;
    }
    return rowdot;
}

// Backward phase 2: ds_row[u] = p_u (dp_u - rowdot) / sqrt(D) for thread tid's u <= t.
template <typename P>
KILN_HD void attention_ds(float* ds_row, const float* s, const P* probs_row, int64_t t,
                          float rowdot, float scale, int tid, int threads) {
    for (int64_t u = tid; u <= t; u += threads)
        ds_row[u] = load(probs_row + u) * (s[u] - rowdot) * scale;
}

// Backward, elementwise over the query part of grad (M, ldqkv): element i of (M, H, D).
KILN_HD void attention_dq_at(float* grad, const float* ds, const float* qkv, const Attention& a,
                             int64_t i) {
    const int64_t d = i % a.D, h = i / a.D % a.H, m = i / (a.D * a.H);
    const int64_t b = m / a.T, t = m % a.T;
    const float* dsr = ds + ((b * a.H + h) * a.T + t) * a.T;
    float g = 0.0f;
    for (int64_t u = 0; u <= t; u++)
        g += dsr[u] * qkv[k_at(a, b * a.T + u, h) + d];
    grad[q_at(a, m, h) + d] = g;
}

// Backward, elementwise over the key and value parts of grad: element i of (M, Hkv, D), summing
// over the query heads of kv head hk and the query times t >= u.
template <typename P>
KILN_HD void attention_dkv_at(float* grad, const float* ds, const P* probs, const float* dout,
                              const float* qkv, const Attention& a, int64_t i) {
    const int64_t d = i % a.D, hk = i / a.D % a.Hkv, m = i / (a.D * a.Hkv);
    const int64_t b = m / a.T, u = m % a.T, G = a.H / a.Hkv;
    float gk = 0.0f, gv = 0.0f;
    for (int64_t h = hk * G; h < (hk + 1) * G; h++) {
        for (int64_t t = u; t < a.T; t++) {
            const int64_t row = ((b * a.H + h) * a.T + t) * a.T;
            const int64_t mt = b * a.T + t;
            gk += ds[row + u] * qkv[q_at(a, mt, h) + d];
            gv += load(probs + row + u) * dout[mt * a.H * a.D + h * a.D + d];
        }
    }
    grad[m * a.ldqkv + (a.H + hk) * a.D + d] = gk;
    grad[m * a.ldqkv + (a.H + a.Hkv + hk) * a.D + d] = gv;
}

}  // namespace kiln::kernels::cuda
