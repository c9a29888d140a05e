// The CPU backend's row-wise ops: embedding, RMSNorm, SwiGLU, cross-entropy, AdamW.
// Each parallelizes over rows (or columns where rows would race) and keeps inner loops simple
// enough for GCC to vectorize.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "core/threads.h"
#include "kernels/cpu/vecmath.h"
#include "kernels/table.h"

namespace kiln::kernels::cpu {

void embedding_forward(float* out, const int32_t* tokens, const void* wte, DType wte_type,
                       int64_t M, int64_t C) {
    parallel_range(M, 16, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; m++) {
            float* dst = out + m * C;
            if (tokens[m] < 0) {
                std::fill(dst, dst + C, 0.0f);
            } else if (wte_type == DType::bf16) {
                const uint16_t* src = static_cast<const uint16_t*>(wte) + int64_t(tokens[m]) * C;
                for (int64_t c = 0; c < C; c++)
                    dst[c] = bf16_to_f32(src[c]);
            } else {
                const float* src = static_cast<const float*>(wte) + int64_t(tokens[m]) * C;
                std::copy(src, src + C, dst);
            }
        }
    });
}

// Parallel over column blocks so that repeated tokens never race.
void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t M,
                        int64_t C) {
    parallel_range(C, 16, [&](int64_t c0, int64_t c1) {
        for (int64_t m = 0; m < M; m++) {
            if (tokens[m] < 0)
                continue;
            float* dst = dwte + int64_t(tokens[m]) * C;
            const float* src = dout + m * C;
            for (int64_t c = c0; c < c1; c++)
                dst[c] += src[c];
        }
    });
}

void rmsnorm_forward(void* out, DType out_type, float* rstd, const float* x, const float* w,
                     int64_t M, int64_t C, float eps) {
    with_type(out, out_type, [&](auto* o) {
        parallel_range(M, 8, [&](int64_t m0, int64_t m1) {
            for (int64_t m = m0; m < m1; m++) {
                const float* xr = x + m * C;
                float ss = 0;
#pragma omp simd reduction(+ : ss)
                for (int64_t c = 0; c < C; c++)
                    ss += xr[c] * xr[c];
                float r = 1.0f / std::sqrt(ss / C + eps);
                rstd[m] = r;
                auto* orow = o + m * C;
                for (int64_t c = 0; c < C; c++)
                    put(orow + c, xr[c] * r * w[c]);
            }
        });
    });
}

void rmsnorm_backward(float* dx, uint16_t* dx_bf16, float* dw, const float* dout, const float* x,
                      const float* w, const float* rstd, int64_t M, int64_t C) {
    parallel_range(M, 8, [&](int64_t m0, int64_t m1) {
        const float* __restrict wl = w;  // local: through the capture GCC emitted gathers
        for (int64_t m = m0; m < m1; m++) {
            const float* __restrict xr = x + m * C;
            const float* __restrict dr = dout + m * C;
            float r = rstd[m];
            float dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < C; c++)
                dot += dr[c] * wl[c] * xr[c];
            float k = r * r * r * dot / C;
            float* __restrict d = dx + m * C;
            for (int64_t c = 0; c < C; c++)
                d[c] += r * dr[c] * wl[c] - k * xr[c];
            if (dx_bf16) {
                uint16_t* __restrict b = dx_bf16 + m * C;
                for (int64_t c = 0; c < C; c++)
                    b[c] = f32_to_bf16(d[c]);
            }
        }
    });
    parallel_range(C, 16, [&](int64_t c0, int64_t c1) {
        for (int64_t m = 0; m < M; m++) {
            const float* xr = x + m * C;
            const float* dr = dout + m * C;
            float r = rstd[m];
            for (int64_t c = c0; c < c1; c++)
                dw[c] += dr[c] * xr[c] * r;
        }
    });
}

void swiglu_forward(void* h, DType h_type, const void* gu, DType in_type, int64_t M, int64_t F) {
    with_type(h, h_type, [&](auto* out) {
        with_type(const_cast<void*>(gu), in_type, [&](auto* in) {
            parallel_range(M, 4, [&](int64_t m0, int64_t m1) {
                for (int64_t m = m0; m < m1; m++) {
                    const auto* g = in + m * 2 * F;
                    const auto* u = g + F;
                    auto* o = out + m * F;
                    for (int64_t f = 0; f < F; f++) {
                        const float gf = get(g + f);
                        put(o + f, gf * sigmoid(gf) * get(u + f));
                    }
                }
            });
        });
    });
}

void swiglu_backward(void* dgu, DType dgu_type, const void* dh, const void* gu, DType in_type,
                     int64_t M, int64_t F) {
    with_type(dgu, dgu_type, [&](auto* out) {
        with_type(const_cast<void*>(gu), in_type, [&](auto* in) {
            using In = std::remove_pointer_t<decltype(in)>;
            const In* dh_in = static_cast<const In*>(dh);
            parallel_range(M, 4, [&](int64_t m0, int64_t m1) {
                for (int64_t m = m0; m < m1; m++) {
                    const In* g = in + m * 2 * F;
                    const In* u = g + F;
                    const In* d = dh_in + m * F;
                    auto* dg = out + m * 2 * F;
                    auto* du = dg + F;
                    for (int64_t f = 0; f < F; f++) {
                        const float gf = get(g + f), uf = get(u + f), df = get(d + f);
                        float s = sigmoid(gf);
                        put(dg + f, df * uf * s * (1.0f + gf * (1.0f - s)));
                        put(du + f, df * gf * s);
                    }
                }
            });
        });
    });
}

namespace {

// One read of a row: max and sum of exp together, block by block (a 256-wide block is read twice
// from L1: its max, then its exps).
inline void row_stats(const float* row, int64_t V, int32_t target, float& max, float& sumexp,
                      float& target_logit) {
    constexpr int64_t kBlock = 256;
    float mx = -INFINITY;
    double sum = 0;
    for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
        int64_t v1 = std::min(V, v0 + kBlock);
        float bmax = row[v0];
#pragma omp simd reduction(max : bmax)
        for (int64_t v = v0; v < v1; v++)
            bmax = row[v] > bmax ? row[v] : bmax;
        if (bmax > mx) {
            sum *= std::exp(double(mx) - bmax);
            mx = bmax;
        }
        float partial = 0;
#pragma omp simd reduction(+ : partial)
        for (int64_t v = v0; v < v1; v++)
            partial += fast_exp(row[v] - mx);
        sum += partial;
    }
    max = mx;
    sumexp = static_cast<float>(sum);
    target_logit = target >= 0 ? row[target] : 0.0f;
}

// A row's gradient, written straight in the dtype the next products read (out: f32 or bf16).
template <typename Out>
void row_gradient(const float* row, int64_t V, int32_t target, float max, float sumexp, float scale,
                  Out* out) {
    const float k = scale / sumexp;
    const float at_target = target >= 0 ? fast_exp(row[target] - max) * k - scale : 0.0f;
    for (int64_t v = 0; v < V; v++)
        put(out + v, fast_exp(row[v] - max) * k);  // out may be row itself (f32)
    if (target >= 0)
        put(out + target, at_target);
}

}  // namespace

void logit_stats(const float* logits, const int32_t* targets, int64_t M, int64_t V, float* max,
                 float* sumexp, float* target_logit) {
    parallel_range(M, 1, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; m++) {
            row_stats(logits + m * V, V, targets[m], max[m], sumexp[m], target_logit[m]);
        }
    });
}

void cross_entropy_backward(const float* logits, const int32_t* targets, const float* max,
                            const float* sumexp, const float* row_scale, int64_t M, int64_t V,
                            void* dlogits, DType dtype) {
    with_type(dlogits, dtype, [&](auto* out) {
        parallel_range(M, 1, [&](int64_t m0, int64_t m1) {
            for (int64_t m = m0; m < m1; m++) {
                row_gradient(logits + m * V, V, targets[m], max[m], sumexp[m], row_scale[m],
                             out + m * V);
            }
        });
    });
}

namespace {

// A row's loss and gradient with one exp per logit: the row's max first, then its exps, kept in
// `exps` (V floats, in L2) between their sum and the gradient.
template <typename Out>
void row_loss_and_gradient(const float* row, int64_t V, int32_t target, float scale,
                           float* __restrict exps, float& loss, Out* out) {
    float mx = row[0];
#pragma omp simd reduction(max : mx)
    for (int64_t v = 0; v < V; v++)
        mx = row[v] > mx ? row[v] : mx;
    constexpr int64_t kBlock = 256;  // float sums per block, added in double
    double sum = 0;
    for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
        const int64_t v1 = std::min(V, v0 + kBlock);
        float partial = 0;
#pragma omp simd reduction(+ : partial)
        for (int64_t v = v0; v < v1; v++) {
            exps[v] = fast_exp(row[v] - mx);
            partial += exps[v];
        }
        sum += partial;
    }
    const float se = static_cast<float>(sum);
    loss = target >= 0 ? std::log(se) + mx - row[target] : 0.0f;
    const float k = scale / se;
    const float at_target = target >= 0 ? exps[target] * k - scale : 0.0f;
    for (int64_t v = 0; v < V; v++)
        put(out + v, exps[v] * k);  // out may be row itself (f32): row is read no more
    if (target >= 0)
        put(out + target, at_target);
}

}  // namespace

// Both halves row by row, while the row is still in cache.
void cross_entropy(const float* logits, const int32_t* targets, const float* row_scale, int64_t M,
                   int64_t V, float* losses, void* dlogits, DType dtype) {
    if (!dlogits) {
        parallel_range(M, 1, [&](int64_t m0, int64_t m1) {
            for (int64_t m = m0; m < m1; m++) {
                float mx, se, tl;
                row_stats(logits + m * V, V, targets[m], mx, se, tl);
                losses[m] = targets[m] >= 0 ? std::log(se) + mx - tl : 0.0f;
            }
        });
        return;
    }
    with_type(dlogits, dtype, [&](auto* out) {
        parallel_range(M, 1, [&](int64_t m0, int64_t m1) {
            std::vector<float> exps(static_cast<size_t>(V));
            for (int64_t m = m0; m < m1; m++) {
                row_loss_and_gradient(logits + m * V, V, targets[m], row_scale[m], exps.data(),
                                      losses[m], out + m * V);
            }
        });
    });
}

// One pass over the optimizer state; the bf16 copy of the weights is written in the same pass.
void adamw(float* p, uint16_t* p_bf16, float* m, float* v, const float* g, int64_t n,
           const AdamWStep& s) {
    const float bc1 = static_cast<float>(1.0 - std::pow(double(s.beta1), double(s.t)));
    const float inv_bc2_sqrt =
        static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(double(s.beta2), double(s.t))));
    const float step = s.lr / bc1, decay = s.lr * s.weight_decay, gs = s.grad_scale;
    const float b1 = s.beta1, b2 = s.beta2, eps = s.eps;
    parallel_range(n, 1 << 14, [&](int64_t c0, int64_t c1) {
        // Local restrict pointers: through the lambda's captures the compiler cannot tell that
        // the stores leave the pointers alone, and the loop stayed scalar (sqrt and divide).
        float* __restrict pp = p;
        float* __restrict mp = m;
        float* __restrict vp = v;
        const float* __restrict gp = g;
        for (int64_t b0 = c0; b0 < c1; b0 += 2048) {  // blocks, so p is re-read from L1
            int64_t b1e = std::min(c1, b0 + 2048);
#pragma omp simd
            for (int64_t i = b0; i < b1e; i++) {
                float gi = gs * gp[i];
                float mi = b1 * mp[i] + (1.0f - b1) * gi;
                float vi = b2 * vp[i] + (1.0f - b2) * gi * gi;
                mp[i] = mi;
                vp[i] = vi;
                pp[i] -= step * mi / (std::sqrt(vi) * inv_bc2_sqrt + eps) + decay * pp[i];
            }
            if (p_bf16) {
                for (int64_t i = b0; i < b1e; i++)
                    p_bf16[i] = f32_to_bf16(p[i]);
            }
        }
    });
}

void to_bf16(uint16_t* dst, const float* src, int64_t n) {
    convert_f32_to_bf16(dst, src, n);
}

}  // namespace kiln::kernels::cpu
