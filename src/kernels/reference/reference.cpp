#include "kernels/reference/reference.h"

#include <cmath>
#include <vector>

#include "kernels/host.h"

namespace kiln::kernels {
namespace {

template <Precision P>
double operand(const void* base, DType type, int64_t index) {
    if (type == DType::bf16) {
        return bf16_to_f32(static_cast<const uint16_t*>(base)[index]);
    }
    float f = static_cast<const float*>(base)[index];
    if constexpr (P == Precision::bf16) {
        f = bf16_to_f32(f32_to_bf16(f));
    }
    return f;
}

void store(void* base, DType type, int64_t i, double x) {
    if (type == DType::bf16) {
        static_cast<uint16_t*>(base)[i] = f32_to_bf16(static_cast<float>(x));
    } else {
        static_cast<float*>(base)[i] = static_cast<float>(x);
    }
}

size_t workspace_bytes(int64_t, const Attention&) {
    return 0;
}

template <Precision P>
void gemm(const Gemm& g, Workspace) {
    for (int64_t i = 0; i < g.M; i++) {
        for (int64_t j = 0; j < g.N; j++) {
            double acc = 0;
            for (int64_t k = 0; k < g.K; k++) {
                int64_t ia = g.trans_a ? k * g.lda + i : i * g.lda + k;
                int64_t ib = g.trans_b ? j * g.ldb + k : k * g.ldb + j;
                acc += operand<P>(g.a, g.a_type, ia) * operand<P>(g.b, g.b_type, ib);
            }
            const int64_t at = i * g.ldc + j;
            const float* add = g.c_in ? g.c_in : static_cast<const float*>(g.c);
            store(g.c, g.c_type, at,
                  static_cast<float>(g.alpha * acc + (g.accumulate ? add[at] : 0.0)));
        }
    }
}

void embedding_forward(float* out, const int32_t* tokens, const void* wte, DType wte_type,
                       int64_t M, int64_t C) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t c = 0; c < C; c++) {
            out[m * C + c] = tokens[m] < 0 ? 0.0f
                                           : static_cast<float>(operand<Precision::fp32>(
                                                 wte, wte_type, tokens[m] * C + c));
        }
    }
}

void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t M,
                        int64_t C) {
    for (int64_t m = 0; m < M; m++) {
        if (tokens[m] < 0)
            continue;
        for (int64_t c = 0; c < C; c++) {
            dwte[tokens[m] * C + c] += dout[m * C + c];
        }
    }
}

void rmsnorm_forward(void* out, DType out_type, float* rstd, const float* x, const float* w,
                     int64_t M, int64_t C, float eps) {
    for (int64_t m = 0; m < M; m++) {
        double ss = 0;
        for (int64_t c = 0; c < C; c++)
            ss += double(x[m * C + c]) * x[m * C + c];
        double r = 1.0 / std::sqrt(ss / C + eps);
        rstd[m] = static_cast<float>(r);
        for (int64_t c = 0; c < C; c++)
            store(out, out_type, m * C + c, x[m * C + c] * r * w[c]);
    }
}

void rmsnorm_backward(float* dx, uint16_t* dx_bf16, float* dw, const float* dout, const float* x,
                      const float* w, const float* rstd, int64_t M, int64_t C) {
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * C;
        const float* dr = dout + m * C;
        double r = rstd[m];
        double dot = 0;  // sum_c dout_c w_c x_c
        for (int64_t c = 0; c < C; c++)
            dot += double(dr[c]) * w[c] * xr[c];
        for (int64_t c = 0; c < C; c++) {
            dx[m * C + c] += static_cast<float>(r * dr[c] * w[c] - r * r * r * xr[c] * dot / C);
            dw[c] += static_cast<float>(dr[c] * xr[c] * r);
            if (dx_bf16)
                dx_bf16[m * C + c] = f32_to_bf16(dx[m * C + c]);
        }
    }
}

void rope(float* x, int64_t ld, int64_t M, int64_t T, int64_t n_heads, int64_t D, const float* cos,
          const float* sin, double sign) {
    int64_t half = D / 2;
    for (int64_t m = 0; m < M; m++) {
        int64_t t = m % T;
        for (int64_t h = 0; h < n_heads; h++) {
            float* v = x + m * ld + h * D;
            for (int64_t i = 0; i < half; i++) {
                double c = cos[t * half + i], s = sign * sin[t * half + i];
                double a = v[i], b = v[i + half];
                v[i] = static_cast<float>(a * c - b * s);
                v[i + half] = static_cast<float>(b * c + a * s);
            }
        }
    }
}

// x (n elements of `type`) as f32: itself, or widened into `copy`.
const float* widened(std::vector<float>& copy, const void* x, DType type, int64_t n) {
    if (type == DType::f32)
        return static_cast<const float*>(x);
    copy.resize(size_t(n));
    for (int64_t i = 0; i < n; i++)
        copy[size_t(i)] = static_cast<float>(operand<Precision::fp32>(x, type, i));
    return copy.data();
}

// qkv (of `type`) in f32, with the queries and keys rotated when `a` has rope tables.
const float* rotated(std::vector<float>& copy, const void* qkv, DType type, const Attention& a) {
    const int64_t n = a.B * a.T * a.ldqkv;
    const float* x = widened(copy, qkv, type, n);
    if (!a.rope_cos)
        return x;
    if (x != copy.data())
        copy.assign(x, x + n);
    rope(copy.data(), a.ldqkv, a.B * a.T, a.T, a.H + a.Hkv, a.D, a.rope_cos, a.rope_sin, 1.0);
    return copy.data();
}

// Index helpers into the packed qkv rows.
struct QKV {
    const Attention& a;
    int64_t q(int64_t b, int64_t t, int64_t h) const { return (b * a.T + t) * a.ldqkv + h * a.D; }
    int64_t k(int64_t b, int64_t t, int64_t h) const {
        return (b * a.T + t) * a.ldqkv + (a.H + h / (a.H / a.Hkv)) * a.D;
    }
    int64_t v(int64_t b, int64_t t, int64_t h) const {
        return (b * a.T + t) * a.ldqkv + (a.H + a.Hkv + h / (a.H / a.Hkv)) * a.D;
    }
};

// The reference keeps only the probabilities; it reads q, k and v from qkv again.
template <Precision P>
size_t attention_saved_bytes(const Attention& a) {
    return size_t(a.B * a.H * a.T * a.T) * dtype_size(compute_dtype(P));
}

template <Precision P>
void attention_forward(void* out, void* probs, const void* unrotated, DType in_type,
                       const Attention& a, Workspace) {
    std::vector<float> copy;
    const float* qkv = rotated(copy, unrotated, in_type, a);
    QKV ix{a};
    double scale = 1.0 / std::sqrt(double(a.D));
    std::vector<double> s(a.T);
    for (int64_t b = 0; b < a.B; b++) {
        for (int64_t h = 0; h < a.H; h++) {
            for (int64_t t = 0; t < a.T; t++) {
                double mx = -INFINITY;
                for (int64_t u = 0; u <= t; u++) {
                    double d = 0;
                    for (int64_t i = 0; i < a.D; i++) {
                        d += double(qkv[ix.q(b, t, h) + i]) * qkv[ix.k(b, u, h) + i];
                    }
                    s[u] = d * scale;
                    mx = std::max(mx, s[u]);
                }
                double sum = 0;
                for (int64_t u = 0; u <= t; u++)
                    sum += (s[u] = std::exp(s[u] - mx));
                int64_t row = ((b * a.H + h) * a.T + t) * a.T;
                for (int64_t u = 0; u < a.T; u++)
                    store(probs, compute_dtype(P), row + u, u <= t ? s[u] / sum : 0.0);
                for (int64_t i = 0; i < a.D; i++) {
                    double o = 0;
                    for (int64_t u = 0; u <= t; u++)
                        o += s[u] / sum * qkv[ix.v(b, u, h) + i];
                    store(out, compute_dtype(P), (b * a.T + t) * a.H * a.D + h * a.D + i, o);
                }
            }
        }
    }
}

template <Precision P>
void attention_backward(void* out, DType out_type, const void* dout_in, const void*,
                        const void* unrotated, DType in_type, const void* probs, const Attention& a,
                        Workspace) {
    std::vector<float> copy, dout_copy;
    const float* qkv = rotated(copy, unrotated, in_type, a);
    const float* dout = widened(dout_copy, dout_in, in_type, a.B * a.T * a.H * a.D);
    QKV ix{a};
    double scale = 1.0 / std::sqrt(double(a.D));
    std::vector<float> grad(size_t(a.B * a.T * a.ldqkv), 0.0f);
    float* dqkv = grad.data();
    std::vector<double> dp(a.T);
    for (int64_t b = 0; b < a.B; b++) {
        for (int64_t h = 0; h < a.H; h++) {
            for (int64_t t = 0; t < a.T; t++) {
                const int64_t row = ((b * a.H + h) * a.T + t) * a.T;
                auto p = [&](int64_t u) {
                    return operand<Precision::fp32>(probs, compute_dtype(P), row + u);
                };
                const float* dO = dout + (b * a.T + t) * a.H * a.D + h * a.D;
                double rowdot = 0;
                for (int64_t u = 0; u <= t; u++) {
                    double d = 0;
                    for (int64_t i = 0; i < a.D; i++)
                        d += double(dO[i]) * qkv[ix.v(b, u, h) + i];
                    dp[u] = d;
                    rowdot += d * p(u);
                    for (int64_t i = 0; i < a.D; i++)
                        dqkv[ix.v(b, u, h) + i] += p(u) * dO[i];
                }
                for (int64_t u = 0; u <= t; u++) {
                    double ds = p(u) * (dp[u] - rowdot) * scale;
                    for (int64_t i = 0; i < a.D; i++) {
                        dqkv[ix.q(b, t, h) + i] += static_cast<float>(ds * qkv[ix.k(b, u, h) + i]);
                        dqkv[ix.k(b, u, h) + i] += static_cast<float>(ds * qkv[ix.q(b, t, h) + i]);
                    }
                }
            }
        }
    }
    if (a.rope_cos)  // back through the rotation: its inverse, on the gradient
        rope(dqkv, a.ldqkv, a.B * a.T, a.T, a.H + a.Hkv, a.D, a.rope_cos, a.rope_sin, -1.0);
    for (size_t i = 0; i < grad.size(); i++)
        store(out, out_type, int64_t(i), grad[i]);
}

double silu(double x) {
    return x / (1 + std::exp(-x));
}

void swiglu_forward(void* h, DType h_type, const void* gu, DType in_type, int64_t M, int64_t F) {
    auto in = [&](int64_t i) { return operand<Precision::fp32>(gu, in_type, i); };
    for (int64_t m = 0; m < M; m++) {
        for (int64_t f = 0; f < F; f++)
            store(h, h_type, m * F + f, silu(in(m * 2 * F + f)) * in(m * 2 * F + F + f));
    }
}

void swiglu_backward(void* dgu, DType dgu_type, const void* dh, const void* gu, DType in_type,
                     int64_t M, int64_t F) {
    auto in = [&](const void* x, int64_t i) { return operand<Precision::fp32>(x, in_type, i); };
    for (int64_t m = 0; m < M; m++) {
        for (int64_t f = 0; f < F; f++) {
            double g = in(gu, m * 2 * F + f), u = in(gu, m * 2 * F + F + f), d = in(dh, m * F + f);
            double sig = 1 / (1 + std::exp(-g));
            store(dgu, dgu_type, m * 2 * F + f, d * u * sig * (1 + g * (1 - sig)));
            store(dgu, dgu_type, m * 2 * F + F + f, d * g * sig);
        }
    }
}

void logit_stats(const float* logits, const int32_t* targets, int64_t M, int64_t V, float* max,
                 float* sumexp, float* target_logit) {
    for (int64_t m = 0; m < M; m++) {
        const float* row = logits + m * V;
        double mx = -INFINITY;
        for (int64_t v = 0; v < V; v++)
            mx = std::max(mx, double(row[v]));
        double sum = 0;
        for (int64_t v = 0; v < V; v++)
            sum += std::exp(row[v] - mx);
        max[m] = static_cast<float>(mx);
        sumexp[m] = static_cast<float>(sum);
        target_logit[m] = targets[m] >= 0 ? row[targets[m]] : 0.0f;
    }
}

void cross_entropy_backward(const float* logits, const int32_t* targets, const float* max,
                            const float* sumexp, const float* row_scale, int64_t M, int64_t V,
                            void* dlogits, DType dtype) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t v = 0; v < V; v++) {
            double p = std::exp(double(logits[m * V + v]) - max[m]) / sumexp[m];
            store(dlogits, dtype, m * V + v, row_scale[m] * (p - (v == targets[m] ? 1.0 : 0.0)));
        }
    }
}

void cross_entropy(const float* logits, const int32_t* targets, const float* row_scale, int64_t M,
                   int64_t V, float* losses, void* dlogits, DType dtype) {
    std::vector<float> mx(M), se(M), tl(M);
    logit_stats(logits, targets, M, V, mx.data(), se.data(), tl.data());
    for (int64_t m = 0; m < M; m++) {
        losses[m] =
            targets[m] >= 0 ? static_cast<float>(std::log(double(se[m])) + mx[m] - tl[m]) : 0.0f;
    }
    if (dlogits) {
        cross_entropy_backward(logits, targets, mx.data(), se.data(), row_scale, M, V, dlogits,
                               dtype);
    }
}

void adamw(float* p, uint16_t* p_bf16, float* m, float* v, const float* g, int64_t n,
           const AdamWStep& s) {
    double bc1 = 1 - std::pow(double(s.beta1), double(s.t));
    double bc2 = 1 - std::pow(double(s.beta2), double(s.t));
    for (int64_t i = 0; i < n; i++) {
        double gi = double(s.grad_scale) * g[i];
        double mi = s.beta1 * double(m[i]) + (1 - double(s.beta1)) * gi;
        double vi = s.beta2 * double(v[i]) + (1 - double(s.beta2)) * gi * gi;
        m[i] = static_cast<float>(mi);
        v[i] = static_cast<float>(vi);
        double update = (mi / bc1) / (std::sqrt(vi / bc2) + s.eps) + double(s.weight_decay) * p[i];
        p[i] = static_cast<float>(p[i] - double(s.lr) * update);
        if (p_bf16)
            p_bf16[i] = f32_to_bf16(p[i]);
    }
}

void to_bf16(uint16_t* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        dst[i] = f32_to_bf16(src[i]);
}

template <Precision P>
const Kernels table = {
    P == Precision::bf16 ? "reference-bf16" : "reference-fp32",
    P,
    DType::f32,
    workspace_bytes,
    gemm<P>,
    embedding_forward,
    embedding_backward,
    rmsnorm_forward,
    rmsnorm_backward,
    attention_saved_bytes<P>,
    attention_forward<P>,
    attention_backward<P>,
    swiglu_forward,
    swiglu_backward,
    logit_stats,
    cross_entropy_backward,
    cross_entropy,
    adamw,
    to_bf16,
    &host_memory,
    &host_memory,
    host::copy,
    host::zero,
    host::widen,
    host::add,
    host::slice_ids,
    host::rescale_sumexp,
    host::row_losses,
    host::sum_into,
    static_cast<double (*)(const float*, const std::vector<Range>&)>(host::sum_squares),
    host::wait,
    nullptr,  // nothing to tune
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,  // nothing to record: the ops run as they are called
    nullptr,
    nullptr,
};

}  // namespace

const Kernels& reference_kernels(Precision precision) {
    return precision == Precision::bf16 ? table<Precision::bf16> : table<Precision::fp32>;
}

}  // namespace kiln::kernels
