#pragma once
// The arithmetic of the CUDA kernels, callable from host and device (KILN_HD): each op's work for
// one element, or for one thread's share of a row, and the combining step of a row's reduction.
// The kernels in cuda/*.cu are thin loops over these functions; tests/kernels/test_kernel_math.cpp
// runs the same functions over the same index space on the CPU and compares them with the
// reference backend, so every CI run checks the arithmetic without a GPU. Plain C++ outside nvcc.
//
// Index spaces. Elementwise ops are grid-stride loops over a flat index i, each visit calling
// `<op>_at(..., i)`. Row ops run one thread block of `threads` threads per row, in phases
// separated by the block's barrier: thread t first folds the row's elements c = t, t + threads,
// t + 2 threads, ... (in that order, in fp32) into one partial; the block combines the partials
// (below); then thread t writes the same elements c it read.
//
// Order of a block reduction (block_reduce in rows.cu, replayed by block_reduce_host here):
//   1. in each warp of 32 lanes, for o = 16, 8, 4, 2, 1: lane l := combine(lane l, lane l ^ o);
//      every combine here is commutative bit for bit, so all 32 lanes end with the same value;
//   2. lane 0 of warp w stores it in slot w; warp 0 loads slot l into lane l (the identity for
//      l >= threads / 32) and runs step 1 again; its result is the block's.
// So the sum of a row is a sum of strided fp32 partials combined as a fixed binary tree: the
// same bits on every run and on the host replay, unlike atomics.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/ops.h"

#if defined(__CUDACC__)
#define KILN_HD __host__ __device__ __forceinline__
#else
#define KILN_HD inline
#endif

namespace kiln::kernels::cuda {

// Threads of the block that runs one row of a row op; the host replay uses the same count, so it
// reduces in the same order.
constexpr int kRowThreads = 256;

// --- bf16, bit for bit as core/dtype.h converts (round to nearest even, NaN stays NaN) ---

KILN_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}

KILN_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

KILN_HD uint16_t bf16_round(float f) {
    const uint32_t u = float_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

KILN_HD float bf16_widen(uint16_t h) {
    return bits_float(static_cast<uint32_t>(h) << 16);
}

// An element in f32, or in bf16 where only products read it.
KILN_HD void store(float* p, float x) {
    *p = x;
}
KILN_HD void store(uint16_t* p, float x) {
    *p = bf16_round(x);
}
KILN_HD float load(const float* p) {
    return *p;
}
KILN_HD float load(const uint16_t* p) {
    return bf16_widen(*p);
}

KILN_HD float sigmoid(float x) {
    return 1.0f / (1.0f + expf(-x));
}

// --- block reductions: the combining steps, and their host replay ---

struct Sum {
    template <typename T>
    KILN_HD T operator()(T a, T b) const {
        return a + b;
    }
};

// A softmax denominator folded online: sum = sum_j exp(x_j - max) over the elements seen.
// Logits are finite; the identity is {-inf, 0}.
struct MaxSum {
    float max;
    float sum;
};

KILN_HD MaxSum maxsum_identity() {
    return {-INFINITY, 0.0f};
}

// One more element x. The sum is rescaled only when the max moves.
KILN_HD MaxSum maxsum_push(MaxSum a, float x) {
    if (x > a.max)
        return {x, a.sum * expf(a.max - x) + 1.0f};
    return {a.max, a.sum + expf(x - a.max)};
}

// Two partials of the same row; commutative bit for bit (max, and one addition of two terms).
struct MaxSumCombine {
    KILN_HD MaxSum operator()(MaxSum a, MaxSum b) const {
        const float m = fmaxf(a.max, b.max);
        const float sa = a.max == m ? a.sum : a.sum * expf(a.max - m);
        const float sb = b.max == m ? b.sum : b.sum * expf(b.max - m);
        return {m, sa + sb};
    }
};

// Steps 1 and 2 above on the partials of a block's `threads` threads (a multiple of 32, at most
// 1024), in the order the device runs them: the block's result, bit for bit. Host only.
template <typename T, typename Combine>
T block_reduce_host(const T* partials, int threads, T identity, Combine combine) {
    auto warp = [&](T* lane) {
        for (int o = 16; o > 0; o /= 2) {
            T next[32];
            for (int l = 0; l < 32; l++)
                next[l] = combine(lane[l], lane[l ^ o]);
            for (int l = 0; l < 32; l++)
                lane[l] = next[l];
        }
        return lane[0];
    };
    const int warps = threads / 32;
    T slots[32];
    for (int w = 0; w < warps; w++) {
        T lane[32];
        for (int l = 0; l < 32; l++)
            lane[l] = partials[w * 32 + l];
        slots[w] = warp(lane);
    }
    T lane[32];
    for (int l = 0; l < 32; l++)
        lane[l] = l < warps ? slots[l] : identity;
    return warp(lane);
}

// --- operands of a product, converted to the dtype it reads ---

// Element i of dst (rows, cols), dense: src (rows, cols) with row stride ld, converted (f32 to
// bf16 rounds to nearest even, bf16 to f32 is exact).
template <typename Out, typename In>
KILN_HD void pack_at(Out* dst, const In* src, int64_t cols, int64_t ld, int64_t i) {
    store(dst + i, load(src + (i / cols) * ld + i % cols));
}

// --- embedding: out (M, C) = wte[tokens], dwte (V, C) += scatter of dout ---

// Element i of out (M, C); a zero where the token is < 0 (held by another rank).
template <typename W>
KILN_HD void embedding_forward_at(float* out, const int32_t* tokens, const W* wte, int64_t C,
                                  int64_t i) {
    const int32_t token = tokens[i / C];
    out[i] = token < 0 ? 0.0f : load(wte + int64_t(token) * C + i % C);
}

// Column c of dwte over the rows, in order, whose token is in group `group` of `groups` (token %
// groups): one thread owns a column of a group's tokens, so repeated tokens never race and every
// (token, column) sums its rows in row order, the same bits however many groups and every run
// (no atomics). The groups let C x groups threads share the work: a column a thread over all the
// rows kept 8 blocks busy at C = 2048, each thread a chain of M dependent read-add-writes.
constexpr int kEmbeddingGroups = 128;

KILN_HD void embedding_backward_column(float* dwte, const float* dout, const int32_t* tokens,
                                       int64_t M, int64_t C, int64_t c, int group, int groups) {
    for (int64_t m = 0; m < M; m++) {
        const int32_t t = tokens[m];
        if (t >= 0 && t % groups == group)
            dwte[int64_t(t) * C + c] += dout[m * C + c];
    }
}

// --- RMSNorm: out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) ---

// Thread t's partial of sum_c x_c^2 over its strided elements of row x (C).
KILN_HD float rmsnorm_sumsq(const float* x, int64_t C, int t, int threads) {
    float ss = 0.0f;
    for (int64_t c = t; c < C; c += threads)
        ss += x[c] * x[c];
    return ss;
}

KILN_HD float rmsnorm_rstd(float sumsq, int64_t C, float eps) {
    return 1.0f / sqrtf(sumsq / static_cast<float>(C) + eps);
}

// Thread t writes its elements of the output row.
template <typename Out>
KILN_HD void rmsnorm_scale(Out* out, const float* x, const float* w, float rstd, int64_t C, int t,
                           int threads) {
    for (int64_t c = t; c < C; c += threads)
        store(out + c, x[c] * rstd * w[c]);
}

// Backward. dx_c = rstd dout_c w_c - rstd^3 x_c (sum_j dout_j w_j x_j) / C.
// Thread t's partial of the row's sum_j dout_j w_j x_j.
KILN_HD float rmsnorm_dot(const float* dout, const float* w, const float* x, int64_t C, int t,
                          int threads) {
    float dot = 0.0f;
    for (int64_t c = t; c < C; c += threads)
        dot += dout[c] * w[c] * x[c];
    return dot;
}

// Thread t adds its elements of the row's dx, given the row's dot, and rounds the sums into
// dx_bf16 where that is not null.
KILN_HD void rmsnorm_dx(float* dx, uint16_t* dx_bf16, const float* dout, const float* w,
                        const float* x, float rstd, float dot, int64_t C, int t, int threads) {
    const float k = rstd * rstd * rstd * dot / static_cast<float>(C);
    for (int64_t c = t; c < C; c += threads) {
        const float v = dx[c] + (rstd * dout[c] * w[c] - k * x[c]);
        dx[c] = v;
        if (dx_bf16)
            dx_bf16[c] = bf16_round(v);
    }
}

// dw (C) += sum_m dout[m][c] x[m][c] rstd[m] in two steps, so that every multiprocessor takes
// part and the bits stay the same on every run: a block of the backward takes the rows
// [chunk * rows, chunk * rows + rows) (rmsnorm_dw_rows), and thread t adds each row's terms of
// its columns into the block's sums (acc, C), in row order; then each column's sum of the chunks'
// sums, in chunk order, is added to dw.
constexpr int64_t kRmsnormDwChunks = 512;  // at most; M alone decides how many, not the GPU

KILN_HD int64_t rmsnorm_dw_rows(int64_t M) {
    return M <= kRmsnormDwChunks ? 1 : (M + kRmsnormDwChunks - 1) / kRmsnormDwChunks;
}

KILN_HD void rmsnorm_dw_add(float* acc, const float* dout, const float* x, float rstd, int64_t C,
                            int t, int threads) {
    for (int64_t c = t; c < C; c += threads)
        acc[c] += dout[c] * x[c] * rstd;
}

KILN_HD void rmsnorm_dw_column(float* dw, const float* chunk_sums, int64_t chunks, int64_t C,
                               int64_t c) {
    float acc = 0.0f;
    for (int64_t r = 0; r < chunks; r++)
        acc += chunk_sums[r * C + c];
    dw[c] += acc;
}

// --- SwiGLU: h (M, F) = silu(gate) * up, gu (M, 2F) = [gate | up] per row ---

template <typename Out, typename In>
KILN_HD void swiglu_forward_at(Out* h, const In* gu, int64_t F, int64_t i) {
    const int64_t m = i / F, f = i % F;
    const float g = load(gu + m * 2 * F + f), u = load(gu + m * 2 * F + F + f);
    store(h + i, g * sigmoid(g) * u);
}

// Element i of dh (M, F) gives both of its gradients in dgu (M, 2F).
template <typename Out, typename In>
KILN_HD void swiglu_backward_at(Out* dgu, const In* dh, const In* gu, int64_t F, int64_t i) {
    const int64_t m = i / F, f = i % F;
    const float g = load(gu + m * 2 * F + f), u = load(gu + m * 2 * F + F + f), d = load(dh + i);
    const float s = sigmoid(g);
    store(dgu + m * 2 * F + f, d * u * s * (1.0f + g * (1.0f - s)));
    store(dgu + m * 2 * F + F + f, d * g * s);
}

// --- rotary embedding (Hugging Face pairing, see ops.h), in place on n_heads heads of D ---

// Pair i of the index space (M, n_heads, D/2): rotates x[m][h*D + j] with x[m][h*D + j + D/2]
// by the angle of position m % T; sign -1 rotates back (the backward, on gradients).
KILN_HD void rope_at(float* x, int64_t ld, int64_t T, int64_t n_heads, int64_t D,
                     const float* cos_table, const float* sin_table, float sign, int64_t i) {
    const int64_t half = D / 2;
    const int64_t j = i % half, h = (i / half) % n_heads, m = i / (half * n_heads);
    const float c = cos_table[(m % T) * half + j], s = sign * sin_table[(m % T) * half + j];
    float* v = x + m * ld + h * D;
    const float a = v[j], b = v[j + half];
    v[j] = a * c - b * s;
    v[j + half] = b * c + a * s;
}

// Column `col` of one row, out of place: the row's element with its head rotated as rope_at
// rotates it (the same products of the same values) where it lies in the first n_heads heads,
// else as it is, read as In and written as Out (rounded to bf16 by store()). The rotation and
// the rounding the
// products need in one pass over x, instead of a copy, a rotation in place and a conversion.
// cos_row, sin_row: the tables' row of the row's position (m % T); 32-bit column arithmetic, the
// row's own done once by the caller.
template <typename Out, typename In>
KILN_HD void rotated_at(Out* dst_row, const In* x_row, int col, int n_heads, int D,
                        const float* cos_row, const float* sin_row, float sign) {
    float v = load(x_row + col);
    if (col < n_heads * D) {
        const int half = D / 2, j = col % D, p = j < half ? j : j - half;
        const float c = cos_row[p], s = sign * sin_row[p];
        const In* head = x_row + (col - j);
        const float a = load(head + p), b = load(head + p + half);
        v = j < half ? a * c - b * s : b * c + a * s;
    }
    store(dst_row + col, v);
}

// --- cross-entropy of one logits row (V), from its MaxSum and target logit ---

// Thread t's fold of its strided logits.
KILN_HD MaxSum xent_fold(const float* row, int64_t V, int t, int threads) {
    MaxSum s = maxsum_identity();
    for (int64_t v = t; v < V; v += threads)
        s = maxsum_push(s, row[v]);
    return s;
}

// log(sum_v exp(logit_v)) - logit[target]; 0 for a target < 0 (ignored).
KILN_HD float xent_loss(MaxSum s, float target_logit, int32_t target) {
    return target >= 0 ? logf(s.sum) + s.max - target_logit : 0.0f;
}

// Thread t writes its elements of scale * (softmax - onehot(target)). out may be row itself
// (f32): each element is read before the same thread overwrites it.
template <typename Out>
KILN_HD void xent_gradient(Out* out, const float* row, int64_t V, int32_t target, float max,
                           float sumexp, float scale, int t, int threads) {
    for (int64_t v = t; v < V; v += threads) {
        const float p = expf(row[v] - max) / sumexp;
        store(out + v, scale * (v == target ? p - 1.0f : p));
    }
}

// --- the small ops around the products (table.h, "Memory"), element by element ---

KILN_HD void slice_id_at(int32_t* local, float* weight, const int32_t* ids, int64_t begin,
                         int64_t count, float value, int64_t i) {
    const int32_t t = ids[i];
    local[i] = t >= begin && t < begin + count ? static_cast<int32_t>(t - begin) : -1;
    if (weight)
        weight[i] = t >= 0 ? value : 0.0f;
}

// A row's sum of exponentials moved from this rank's maximum to the group's.
KILN_HD void rescale_sumexp_at(float* sumexp, const float* local_max, const float* max, int64_t i) {
    sumexp[i] *= expf(local_max[i] - max[i]);
}

KILN_HD void row_loss_at(float* losses, const float* max, const float* sumexp,
                         const float* target_logit, const int32_t* targets, int64_t i) {
    losses[i] = xent_loss(MaxSum{max[i], sumexp[i]}, target_logit[i], targets[i]);
}

// Thread `first` of a grid-stride loop of `stride` threads: its share of the sum of squares, in
// double, in index order. The shares are combined as block_reduce orders them, then the blocks'
// sums in block order.
KILN_HD double sum_squares_share(const float* x, int64_t n, int64_t first, int64_t stride) {
    double s = 0;
    for (int64_t i = first; i < n; i += stride)
        s += double(x[i]) * double(x[i]);
    return s;
}

// The same share of the plain sum (Kernels::sum_into, one block: the shares combined as
// block_reduce orders them).
KILN_HD double sum_share(const float* x, int64_t n, int64_t first, int64_t stride) {
    double s = 0;
    for (int64_t i = first; i < n; i += stride)
        s += double(x[i]);
    return s;
}

// --- AdamW, element by element (see Kernels::adamw), with fp32 master weights ---

// The step's scalars, computed once on the host in double as the CPU backend computes them.
struct AdamWScalars {
    float step;          // lr / (1 - beta1^t)
    float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^t)
    float decay;         // lr * weight_decay
    float beta1, beta2, eps, grad_scale;
};

inline AdamWScalars adamw_scalars(const AdamWStep& s) {
    const double bc1 = 1.0 - std::pow(double(s.beta1), double(s.t));
    const double bc2 = 1.0 - std::pow(double(s.beta2), double(s.t));
    return {static_cast<float>(s.lr / bc1),
            static_cast<float>(1.0 / std::sqrt(bc2)),
            s.lr * s.weight_decay,
            s.beta1,
            s.beta2,
            s.eps,
            s.grad_scale};
}

// Updates p[i], m[i], v[i] from g[i]; p_bf16[i] = bf16(p[i]) after, when p_bf16 is not null.
KILN_HD void adamw_at(float* p, uint16_t* p_bf16, float* m, float* v, const float* g,
                      const AdamWScalars& k, int64_t i) {
    const float gi = k.grad_scale * g[i];
    const float mi = k.beta1 * m[i] + (1.0f - k.beta1) * gi;
    const float vi = k.beta2 * v[i] + (1.0f - k.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i] - (k.step * mi / (sqrtf(vi) * k.inv_bc2_sqrt + k.eps) + k.decay * p[i]);
    p[i] = pi;
    if (p_bf16)
        p_bf16[i] = bf16_round(pi);
}

}  // namespace kiln::kernels::cuda
