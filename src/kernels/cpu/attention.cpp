// Causal attention for the CPU backend. Heads are packed into dense (B, H, T, D) operands in
// the compute dtype (keys/values repeated across a query group for GQA; queries and keys
// rotated by RoPE on the way), then every product is one batched oneDNN matmul over (B, H);
// softmax and its backward run row-parallel in f32.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "core/threads.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/matmul.h"
#include "kernels/cpu/vecmath.h"

namespace kiln::kernels::cpu {
namespace {

template <Precision P>
constexpr size_t compute_size = dtype_size(compute_dtype(P));

size_t round64(size_t n) {
    return (n + 63) / 64 * 64;
}

// What the forward keeps for the backward, in its `saved` buffer: the probabilities and the
// packed operands, so the backward does not pack q, k and v again.
template <Precision P>
struct Saved {
    char* probs;  // (B, H, T, T) compute dtype
    char* q;      // (B, H, T, D) compute dtype, rotated
    char* k;      // (B, H, T, D) compute dtype, rotated, kv heads repeated per group
    char* v;      // (B, H, T, D) compute dtype, kv heads repeated per group

    static size_t bytes(const Attention& a) {
        size_t bhtd = size_t(a.B * a.H * a.T * a.D), bhtt = size_t(a.B * a.H * a.T * a.T);
        return round64(bhtt * compute_size<P>) + 3 * round64(bhtd * compute_size<P>);
    }
    Saved(const void* base, const Attention& a) {
        size_t bhtd = size_t(a.B * a.H * a.T * a.D), bhtt = size_t(a.B * a.H * a.T * a.T);
        probs = static_cast<char*>(const_cast<void*>(base));
        q = probs + round64(bhtt * compute_size<P>);
        k = q + round64(bhtd * compute_size<P>);
        v = k + round64(bhtd * compute_size<P>);
    }
};

// Carves the workspace into the backward's operands and the f32 intermediates.
template <Precision P>
struct Scratch {
    char* do_;  // (B, H, T, D) compute dtype: the output gradient
    char* p;    // (B, H, T, T) compute dtype: dS
    float* dp;  // (B, H, T, T) f32: bf16's scores; in the backward dP, then dQ (B, H, T, D)
    float* dk;  // (B, H, T, D)
    float* dv;  // (B, H, T, D)

    static size_t bytes(const Attention& a) {
        size_t bhtd = size_t(a.B * a.H * a.T * a.D), bhtt = size_t(a.B * a.H * a.T * a.T);
        return round64(bhtd * compute_size<P>) + round64(bhtt * compute_size<P>) +
               round64(std::max(bhtt, bhtd) * 4) + 2 * round64(bhtd * 4);
    }
    Scratch(const Attention& a, Workspace ws) {
        KILN_CHECK(ws.bytes >= bytes(a), "attention workspace too small");
        size_t bhtd = size_t(a.B * a.H * a.T * a.D), bhtt = size_t(a.B * a.H * a.T * a.T);
        char* at = static_cast<char*>(ws.ptr);
        auto take = [&](size_t n) {
            char* p = at;
            at += round64(n);
            return p;
        };
        do_ = take(bhtd * compute_size<P>);
        p = take(bhtt * compute_size<P>);
        dp = reinterpret_cast<float*>(take(std::max(bhtt, bhtd) * 4));
        dk = reinterpret_cast<float*>(take(bhtd * 4));
        dv = reinterpret_cast<float*>(take(bhtd * 4));
    }
};

template <Precision P>
using Packed = std::conditional_t<P == Precision::bf16, uint16_t, float>;

// Copies D values of `heads` heads from rows of src (f32 or bf16; row stride ld, first head at
// column col0) into dst (B, H, T, D); head h reads source head h / repeat. `rotate`: rotated by
// RoPE on the way, when the Attention has tables.
template <Precision P, typename Src>
void pack_heads(char* dst, const Src* src, int64_t ld, int64_t col0, int64_t repeat,
                const Attention& a, bool rotate = false) {
    const int64_t D = a.D, half = D / 2;
    rotate = rotate && a.rope_cos;
    parallel_range(a.B * a.T, 4, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
            int64_t b = r / a.T, t = r % a.T;
            const float* __restrict cr = rotate ? a.rope_cos + t * half : nullptr;
            const float* __restrict sr = rotate ? a.rope_sin + t * half : nullptr;
            for (int64_t h = 0; h < a.H; h++) {
                const Src* __restrict s = src + r * ld + col0 + (h / repeat) * D;
                Packed<P>* __restrict d =
                    reinterpret_cast<Packed<P>*>(dst) + ((b * a.H + h) * a.T + t) * D;
                if (rotate) {
                    for (int64_t i = 0; i < half; i++) {
                        float x1 = get(s + i), x2 = get(s + i + half);
                        put(d + i, x1 * cr[i] - x2 * sr[i]);
                        put(d + i + half, x2 * cr[i] + x1 * sr[i]);
                    }
                } else {
                    for (int64_t i = 0; i < D; i++)
                        put(d + i, get(s + i));
                }
            }
        }
    });
}

// The inverse rotation of one head's gradient, in place (the backward of RoPE).
inline void unrotate(float* __restrict v, const float* __restrict cr, const float* __restrict sr,
                     int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * cr[i] + x2 * sr[i];
        v[i + half] = x2 * cr[i] - x1 * sr[i];
    }
}

MatOperand dense(const void* ptr, DType type, const Attention& a, int64_t rows, int64_t cols,
                 bool transposed) {
    MatOperand m;
    m.ptr = ptr;
    m.type = type;
    m.dims[0] = a.B;
    m.dims[1] = a.H;
    m.dims[2] = transposed ? cols : rows;
    m.dims[3] = transposed ? rows : cols;
    m.strides[0] = a.H * rows * cols;
    m.strides[1] = rows * cols;
    m.strides[2] = transposed ? 1 : cols;
    m.strides[3] = transposed ? cols : 1;
    return m;
}

template <Precision P>
void pack_qkv(const Saved<P>& s, const void* qkv, DType type, const Attention& a) {
    int64_t G = a.H / a.Hkv;
    with_type(const_cast<void*>(qkv), type, [&](const auto* x) {
        pack_heads<P>(s.q, x, a.ldqkv, 0, 1, a, true);
        pack_heads<P>(s.k, x, a.ldqkv, a.H * a.D, G, a, true);
        pack_heads<P>(s.v, x, a.ldqkv, (a.H + a.Hkv) * a.D, G, a);
    });
}

}  // namespace

template <Precision P>
size_t attention_workspace(const Attention& a) {
    return Scratch<P>::bytes(a);
}

template <Precision P>
size_t attention_saved_bytes(const Attention& a) {
    return Saved<P>::bytes(a);
}

template <Precision P>
void attention_forward(void* out, void* saved, const void* qkv, DType in_type, const Attention& a,
                       Workspace ws) {
    Scratch<P> s(a, ws);
    Saved<P> sv(saved, a);
    void* probs = sv.probs;
    const DType ct = compute_dtype(P);
    const int64_t T = a.T, D = a.D;
    pack_qkv<P>(sv, qkv, in_type, a);
    // Scores in f32: in place of the probabilities in fp32, in scratch in bf16.
    float* scores = P == Precision::bf16 ? s.dp : static_cast<float*>(probs);
    const int64_t tt_strides[4] = {a.H * T * T, T * T, T, 1};
    matmul(dense(sv.q, ct, a, T, D, false), dense(sv.k, ct, a, T, D, true), scores, tt_strides,
           1.0f / std::sqrt(float(D)), false);
    // Causal softmax per row, stored in the compute dtype; entries above the diagonal become
    // exact zeros.
    parallel_range(a.B * a.H * T, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
            int64_t t = r % T;
            float* row = scores + r * T;
            float mx = row[0];
#pragma omp simd reduction(max : mx)
            for (int64_t u = 1; u <= t; u++)
                mx = row[u] > mx ? row[u] : mx;
            float sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t u = 0; u <= t; u++) {
                row[u] = fast_exp(row[u] - mx);
                sum += row[u];
            }
            float inv = 1.0f / sum;
            if constexpr (P == Precision::bf16) {
                uint16_t* pr = static_cast<uint16_t*>(probs) + r * T;
                for (int64_t u = 0; u <= t; u++)
                    pr[u] = f32_to_bf16(row[u] * inv);
                std::fill(pr + t + 1, pr + T, uint16_t(0));
            } else {
                for (int64_t u = 0; u <= t; u++)
                    row[u] *= inv;
                std::fill(row + t + 1, row + T, 0.0f);
            }
        }
    });
    // The output in f32, then in bf16 (in the scratch the scores have left) rounded into `out`.
    const int64_t out_strides[4] = {T * a.H * D, D, a.H * D, 1};
    float* wide = P == Precision::bf16 ? s.dp : static_cast<float*>(out);
    matmul(dense(probs, ct, a, T, T, false), dense(sv.v, ct, a, T, D, false), wide, out_strides,
           1.0f, false);
    if constexpr (P == Precision::bf16)
        convert_f32_to_bf16(static_cast<uint16_t*>(out), wide, a.B * T * a.H * D);
}

template <Precision P>
void attention_backward(void* dqkv, DType dqkv_type, const void* dout, const void*, const void*,
                        DType in_type, const void* saved, const Attention& a, Workspace ws) {
    Scratch<P> s(a, ws);
    const Saved<P> sv(saved, a);
    const void* probs = sv.probs;
    const DType ct = compute_dtype(P);
    const int64_t T = a.T, D = a.D, G = a.H / a.Hkv;
    const float scale = 1.0f / std::sqrt(float(D));
    with_type(const_cast<void*>(dout), in_type,
              [&](const auto* x) { pack_heads<P>(s.do_, x, a.H * D, 0, 1, a); });
    // dQ, dK and dV go to dense (B, H, T, D) scratch: with dqkv's strides as the destination,
    // oneDNN's products took a scalar copy out of their own buffer (8% of a small bf16 step).
    // dQ reuses the dP slot once dS is made.
    const int64_t td_strides[4] = {a.H * T * D, T * D, D, 1};
    const int64_t tt_strides[4] = {a.H * T * T, T * T, T, 1};
    // dV = P^T dO ; dP = dO V^T
    matmul(dense(probs, ct, a, T, T, true), dense(s.do_, ct, a, T, D, false), s.dv, td_strides,
           1.0f, false);
    matmul(dense(s.do_, ct, a, T, D, false), dense(sv.v, ct, a, T, D, true), s.dp, tt_strides, 1.0f,
           false);
    // dS = P * (dP - rowsum(P * dP)), into the p slot.
    parallel_range(a.B * a.H * T, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
            int64_t t = r % T;
            const float* dpr = s.dp + r * T;
            float dot = 0;
            if constexpr (P == Precision::bf16) {
                const uint16_t* pr = static_cast<const uint16_t*>(probs) + r * T;
                uint16_t* ds = reinterpret_cast<uint16_t*>(s.p) + r * T;
#pragma omp simd reduction(+ : dot)
                for (int64_t u = 0; u <= t; u++)
                    dot += bf16_to_f32(pr[u]) * dpr[u];
                for (int64_t u = 0; u <= t; u++)
                    ds[u] = f32_to_bf16(bf16_to_f32(pr[u]) * (dpr[u] - dot));
                std::fill(ds + t + 1, ds + T, uint16_t(0));
            } else {
                const float* pr = static_cast<const float*>(probs) + r * T;
                float* ds = reinterpret_cast<float*>(s.p) + r * T;
#pragma omp simd reduction(+ : dot)
                for (int64_t u = 0; u <= t; u++)
                    dot += pr[u] * dpr[u];
                for (int64_t u = 0; u <= t; u++)
                    ds[u] = pr[u] * (dpr[u] - dot);
                std::fill(ds + t + 1, ds + T, 0.0f);
            }
        }
    });
    // dQ = scale dS K ; dK = scale dS^T Q
    float* dq = s.dp;
    matmul(dense(s.p, ct, a, T, T, false), dense(sv.k, ct, a, T, D, false), dq, td_strides, scale,
           false);
    matmul(dense(s.p, ct, a, T, T, true), dense(sv.q, ct, a, T, D, false), s.dk, td_strides, scale,
           false);
    // Into dqkv's rows: dQ as is; dK and dV summed over the query heads of each kv group; dQ
    // and dK back through the rotation. A bf16 row is made in f32 first, then rounded.
    const int64_t half = D / 2;
    const bool f32 = dqkv_type == DType::f32;
    parallel_range(a.B * T, 4, [&](int64_t r0, int64_t r1) {
        std::vector<float> f32_row(f32 ? 0 : size_t(a.ldqkv));
        for (int64_t r = r0; r < r1; r++) {
            const int64_t b = r / T, t = r % T;
            float* __restrict row = f32 ? static_cast<float*>(dqkv) + r * a.ldqkv : f32_row.data();
            for (int64_t h = 0; h < a.H; h++) {
                const float* __restrict src = dq + ((b * a.H + h) * T + t) * D;
                float* __restrict dst = row + h * D;
                for (int64_t i = 0; i < D; i++)
                    dst[i] = src[i];
            }
            for (int64_t j = 0; j < a.Hkv; j++) {
                float* __restrict dk_row = row + (a.H + j) * D;
                float* __restrict dv_row = row + (a.H + a.Hkv + j) * D;
                const int64_t first = ((b * a.H + j * G) * T + t) * D;
                const float* __restrict sk = s.dk + first;
                const float* __restrict sv = s.dv + first;
                for (int64_t i = 0; i < D; i++)
                    dk_row[i] = sk[i], dv_row[i] = sv[i];
                for (int64_t g = 1; g < G; g++) {
                    const float* __restrict gk = sk + g * T * D;
                    const float* __restrict gv = sv + g * T * D;
                    for (int64_t i = 0; i < D; i++)
                        dk_row[i] += gk[i], dv_row[i] += gv[i];
                }
            }
            if (a.rope_cos) {
                for (int64_t h = 0; h < a.H + a.Hkv; h++)
                    unrotate(row + h * D, a.rope_cos + t * half, a.rope_sin + t * half, half);
            }
            if (!f32) {
                uint16_t* __restrict out = static_cast<uint16_t*>(dqkv) + r * a.ldqkv;
                for (int64_t i = 0; i < a.ldqkv; i++)
                    put(out + i, row[i]);
            }
        }
    });
}

template size_t attention_workspace<Precision::fp32>(const Attention&);
template size_t attention_workspace<Precision::bf16>(const Attention&);
template size_t attention_saved_bytes<Precision::fp32>(const Attention&);
template size_t attention_saved_bytes<Precision::bf16>(const Attention&);
template void attention_forward<Precision::fp32>(void*, void*, const void*, DType, const Attention&,
                                                 Workspace);
template void attention_forward<Precision::bf16>(void*, void*, const void*, DType, const Attention&,
                                                 Workspace);
template void attention_backward<Precision::fp32>(void*, DType, const void*, const void*,
                                                  const void*, DType, const void*, const Attention&,
                                                  Workspace);
template void attention_backward<Precision::bf16>(void*, DType, const void*, const void*,
                                                  const void*, DType, const void*, const Attention&,
                                                  Workspace);

}  // namespace kiln::kernels::cpu
