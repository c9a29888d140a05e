// Every op of the CPU backend against the double-precision reference, and every backward of the
// reference against central finite differences of its forward.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/cpu.h"
#include "kernels/products.h"
#include "kernels/reference/reference.h"
#include "kernels/tensors.h"

namespace kiln::kernels {
namespace {

using kiln::testing::randn;

// |got - ref| <= atol + rtol |ref| elementwise.
std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
    std::vector<uint16_t> out(x.size());
    for (size_t i = 0; i < x.size(); i++)
        out[i] = f32_to_bf16(x[i]);
    return out;
}

std::vector<float> from_bf16(const std::vector<uint16_t>& x) {
    std::vector<float> out(x.size());
    for (size_t i = 0; i < x.size(); i++)
        out[i] = bf16_to_f32(x[i]);
    return out;
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double atol,
                  double rtol, const char* what) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    int bad = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!(std::fabs(got[i] - ref[i]) <= atol + rtol * std::fabs(ref[i]))) {
            if (bad++ < 5) {
                ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << " want " << ref[i];
            }
        }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " out of tolerance";
}

struct Workspaces {
    std::vector<char> bytes;
    Workspace get(size_t n) {
        bytes.assign(n + 64, 0);
        return {bytes.data(), n};
    }
};

// d loss / d x[i] by central differences, in double, over the step x[i] actually took.
double central_difference(std::vector<float>& x, size_t i, const std::function<double()>& loss) {
    const float saved = x[i];
    const float h = 1e-2f * std::max(1.0f, std::fabs(saved));
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    return (up - down) / (double(saved + h) - double(saved - h));
}

// Central differences of a scalar function of x, compared with an analytic grad entry by entry.
void expect_fd(std::vector<float>& x, const std::vector<float>& analytic,
               const std::function<double()>& loss, const char* what, int max_checks = 40) {
    std::mt19937_64 rng(7);
    for (int c = 0; c < max_checks; c++) {
        size_t i = rng() % x.size();
        double fd = central_difference(x, i, loss);
        EXPECT_NEAR(analytic[i], fd, 2e-3 + 2e-2 * std::fabs(fd)) << what << "[" << i << "]";
    }
}

// Central differences at the given entries, compared as a whole: the normalized squared error
// sum (analytic - fd)^2 / sum fd^2 (NMSE) must stay under `nmse`. Unlike a per-entry absolute
// tolerance it cannot pass a gradient whose small entries are all wrong, as long as `entries`
// holds the ones that carry the gradient's mass.
void expect_fd_nmse(std::vector<float>& x, const std::vector<float>& analytic,
                    const std::function<double()>& loss, const std::vector<size_t>& entries,
                    double nmse, const char* what) {
    double err = 0, norm = 0;
    for (size_t i : entries) {
        double fd = central_difference(x, i, loss);
        err += (analytic[i] - fd) * (analytic[i] - fd);
        norm += fd * fd;
    }
    ASSERT_GT(norm, 0) << what;
    EXPECT_LT(err / norm, nmse) << what << ": NMSE over " << entries.size() << " entries";
}

// Weighted sum of outputs: a loss whose gradient w.r.t. the output is `weights`.
double dot(const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++)
        s += double(a[i]) * b[i];
    return s;
}

const Kernels& ref() {
    return reference_kernels(Precision::fp32);
}

class GemmIn : public ::testing::TestWithParam<Precision> {};
INSTANTIATE_TEST_SUITE_P(Precision, GemmIn, ::testing::Values(Precision::fp32, Precision::bf16),
                         testing::precision_param_name);

TEST_P(GemmIn, CpuMatchesReferenceAllTranspositions) {
    const Precision prec = GetParam();
    KILN_REQUIRE_PRODUCTS(prec);
    const int64_t M = 37, N = 29, K = 53;
    {
        for (int ta = 0; ta < 2; ta++) {
            for (int tb = 0; tb < 2; tb++) {
                for (int acc = 0; acc < 3; acc++) {  // 2: accumulating onto another matrix
                    auto a = randn(M * K + 8, 1), b = randn(K * N + 8, 2);
                    auto c0 = randn(M * N, 3), c_in = randn(M * N, 4);
                    Gemm g;
                    g.M = M, g.N = N, g.K = K, g.trans_a = ta, g.trans_b = tb;
                    g.a = a.data(), g.lda = ta ? M : K;
                    g.b = b.data(), g.ldb = tb ? K : N;
                    g.ldc = N, g.alpha = 0.5f, g.accumulate = acc > 0;
                    g.c_in = acc == 2 ? c_in.data() : nullptr;
                    std::vector<float> got = c0, want = c0;
                    Workspaces ws;
                    g.c = got.data();
                    const Kernels& cpu = cpu_kernels(prec);
                    cpu.gemm(g, ws.get(cpu.workspace_bytes(M * K + N * K, Attention{})));
                    g.c = want.data();
                    reference_kernels(prec).gemm(g, {});
                    expect_close(got, want, prec == Precision::bf16 ? 2e-3 : 1e-4, 1e-3, "gemm");
                    if (acc == 2) {  // as accumulating onto a copy of c_in, which is left as is
                        std::vector<float> onto = c_in;
                        g.c = onto.data(), g.c_in = nullptr;
                        reference_kernels(prec).gemm(g, {});
                        EXPECT_EQ(onto, want);
                        EXPECT_EQ(c_in, randn(M * N, 4));
                    }
                }
            }
        }
    }
}

// A product written in bf16 (where a table keeps SwiGLU's inputs in bf16) is its f32 output
// rounded once.
TEST(Gemm, Bf16OutputIsTheF32OneRounded) {
    const int64_t M = 9, N = 7, K = 5;
    auto a = randn(M * K, 1), b = randn(K * N, 2);
    Gemm g;
    g.M = M, g.N = N, g.K = K, g.a = a.data(), g.lda = K, g.b = b.data(), g.ldb = N, g.ldc = N;
    std::vector<float> wide(M * N);
    g.c = wide.data();
    ref().gemm(g, {});
    std::vector<uint16_t> narrow(M * N);
    g.c = narrow.data(), g.c_type = DType::bf16;
    ref().gemm(g, {});
    EXPECT_EQ(narrow, to_bf16(wide));
}

// A oneDNN 2.6 AMX defect: short products (M <= 32) with N in 49..63 split over threads gave
// wrong values. Every call here must match the reference, repeatedly.
TEST(Gemm, ShortBf16ProductsAreRightEveryTime) {
    KILN_REQUIRE_PRODUCTS(Precision::bf16);
    for (int64_t M : {1, 16, 32, 47}) {
        for (int64_t N : {49, 50, 57, 63}) {
            const int64_t K = 32;
            auto a = randn(M * K, 1), b = randn(N * K, 2);
            Gemm g;
            g.M = M, g.N = N, g.K = K, g.a = a.data(), g.lda = K;
            g.b = b.data(), g.ldb = K, g.trans_b = true, g.ldc = N;
            std::vector<float> want(M * N);
            g.c = want.data();
            reference_kernels(Precision::bf16).gemm(g, {});
            Workspaces ws;
            Workspace w = ws.get(cpu_kernels(Precision::bf16).workspace_bytes(M * K + N * K, {}));
            for (int rep = 0; rep < 5; rep++) {
                std::vector<float> got(M * N);
                g.c = got.data();
                cpu_kernels(Precision::bf16).gemm(g, w);
                expect_close(got, want, 1e-3, 1e-3, "short bf16 gemm");
            }
        }
    }
}

// Autotuning: passes over a few products (one accumulating, one transposed) pick one choice per
// shape; the plan then computes what the reference does, as does a plan naming a choice this
// library lacks (which falls back to the default).
TEST_P(GemmIn, TunedPlanComputesTheSameProducts) {
    const Precision prec = GetParam();
    KILN_REQUIRE_PRODUCTS(prec);
    struct Shape {
        int64_t M, N, K;
        bool trans_b, acc;
    };
    const Shape shapes[] = {{128, 96, 64, false, false}, {256, 64, 96, true, true}};
    {
        const Kernels& cpu = cpu_kernels(prec);
        ASSERT_NE(cpu.platform, nullptr);
        EXPECT_NE(cpu.platform().find("oneDNN"), std::string::npos) << cpu.platform();
        Workspaces ws;
        Workspace w = ws.get(cpu.workspace_bytes(256 * 96 * 2, Attention{}));
        auto run_all = [&](const Kernels& k, std::vector<std::vector<float>>* out) {
            out->clear();
            for (const Shape& s : shapes) {
                auto a = randn(s.M * s.K, 1), b = randn(s.K * s.N, 2);
                out->push_back(randn(s.M * s.N, 3));
                Gemm g;
                g.M = s.M, g.N = s.N, g.K = s.K, g.trans_b = s.trans_b, g.accumulate = s.acc;
                g.a = a.data(), g.lda = s.K, g.b = b.data(), g.ldb = s.trans_b ? s.K : s.N;
                g.c = out->back().data(), g.ldc = s.N;
                k.gemm(g, &k == &cpu ? w : Workspace{});
            }
        };
        std::vector<std::vector<float>> want, got;
        run_all(reference_kernels(prec), &want);
        cpu.tune(0, 1);
        int passes = 0;
        do {
            run_all(cpu, &got);
            passes++;
        } while (cpu.tune_next() && passes < 100);
        Plan plan = cpu.tuned();
        EXPECT_EQ(plan.size(), 2u);
        for (const auto& [shape, choice] : plan)
            EXPECT_NE(choice.find(" threads="), std::string::npos) << shape;
        const double atol = prec == Precision::bf16 ? 2e-3 : 1e-4;
        cpu.use(plan);
        run_all(cpu, &got);
        for (size_t i = 0; i < got.size(); i++)
            expect_close(got[i], want[i], atol, 1e-3, "tuned gemm");
        for (auto& [shape, choice] : plan)
            choice = "no-such-implementation threads=1";
        cpu.use(plan);
        run_all(cpu, &got);
        for (size_t i = 0; i < got.size(); i++)
            expect_close(got[i], want[i], atol, 1e-3, "gemm with an unknown choice");
        cpu.use({});
    }
}

TEST(Gemm, Bf16WeightsOperand) {
    KILN_REQUIRE_PRODUCTS(Precision::bf16);
    const int64_t M = 16, N = 24, K = 40;
    auto a = randn(M * K, 1), bf = randn(N * K, 2);
    std::vector<uint16_t> b(N * K);
    for (size_t i = 0; i < b.size(); i++)
        b[i] = f32_to_bf16(bf[i]);
    Gemm g;
    g.M = M, g.N = N, g.K = K, g.a = a.data(), g.lda = K;
    g.b = b.data(), g.b_type = DType::bf16, g.ldb = K, g.trans_b = true, g.ldc = N;
    std::vector<float> got(M * N), want(M * N);
    Workspaces ws;
    g.c = got.data();
    cpu_kernels(Precision::bf16).gemm(g, ws.get(1 << 16));
    g.c = want.data();
    reference_kernels(Precision::bf16).gemm(g, {});
    expect_close(got, want, 1e-3, 1e-3, "gemm bf16 weights");
}

TEST(RmsNorm, ForwardAndBackward) {
    const int64_t M = 7, C = 48;
    auto x = randn(M * C, 1), w = randn(C, 2), dout = randn(M * C, 3);
    for (auto& v : w)
        v += 1.0f;
    std::vector<float> out_c(M * C), out_r(M * C), rstd_c(M), rstd_r(M);
    cpu_kernels(Precision::fp32)
        .rmsnorm_forward(out_c.data(), DType::f32, rstd_c.data(), x.data(), w.data(), M, C, 1e-5f);
    ref().rmsnorm_forward(out_r.data(), DType::f32, rstd_r.data(), x.data(), w.data(), M, C, 1e-5f);
    expect_close(out_c, out_r, 1e-5, 1e-5, "rmsnorm out");
    // A bf16 output is the f32 one rounded.
    std::vector<uint16_t> out_bf(M * C);
    cpu_kernels(Precision::bf16)
        .rmsnorm_forward(out_bf.data(), DType::bf16, rstd_c.data(), x.data(), w.data(), M, C,
                         1e-5f);
    EXPECT_EQ(out_bf, to_bf16(out_c));
    ref().rmsnorm_forward(out_bf.data(), DType::bf16, rstd_r.data(), x.data(), w.data(), M, C,
                          1e-5f);
    expect_close(from_bf16(out_bf), out_r, 1e-5, 4e-3, "rmsnorm bf16 out");
    std::vector<float> dx_c(M * C, 0.5f), dx_r(M * C, 0.5f), dw_c(C, 0.25f), dw_r(C, 0.25f);
    std::vector<uint16_t> dx_bf(M * C, 0x7fc0);
    cpu_kernels(Precision::fp32)
        .rmsnorm_backward(dx_c.data(), dx_bf.data(), dw_c.data(), dout.data(), x.data(), w.data(),
                          rstd_c.data(), M, C);
    ref().rmsnorm_backward(dx_r.data(), nullptr, dw_r.data(), dout.data(), x.data(), w.data(),
                           rstd_r.data(), M, C);
    expect_close(dx_c, dx_r, 1e-5, 1e-4, "rmsnorm dx");
    expect_close(dw_c, dw_r, 1e-5, 1e-4, "rmsnorm dw");
    EXPECT_EQ(dx_bf, to_bf16(dx_c)) << "dx's bf16 copy is the sum rounded";
    // Finite differences of sum(out * dout) (the accumulate base 0.5/0.25 subtracted).
    for (auto& v : dx_r)
        v -= 0.5f;
    for (auto& v : dw_r)
        v -= 0.25f;
    auto loss = [&] {
        std::vector<float> o(M * C), r(M);
        ref().rmsnorm_forward(o.data(), DType::f32, r.data(), x.data(), w.data(), M, C, 1e-5f);
        return dot(o, dout);
    };
    expect_fd(x, dx_r, loss, "rmsnorm fd dx");
    expect_fd(w, dw_r, loss, "rmsnorm fd dw");
}

// Rotary tables of Hugging Face's convention: angle(t, i) = t * 10000^(-2i/D), i < D/2.
struct RopeTables {
    std::vector<float> cos, sin;
    RopeTables(int64_t T, int64_t D) : cos(T * D / 2), sin(T * D / 2) {
        for (int64_t t = 0; t < T; t++) {
            for (int64_t i = 0; i < D / 2; i++) {
                double angle = t * std::pow(10000.0, -2.0 * i / D);
                cos[t * D / 2 + i] = float(std::cos(angle));
                sin[t * D / 2 + i] = float(std::sin(angle));
            }
        }
    }
};

// Attention with tables rotates queries and keys as Hugging Face does (out[i] = x[i] cos -
// x[i + D/2] sin, out[i + D/2] = x[i + D/2] cos + x[i] sin, position = row % T), written out
// here independently: the same as attention without tables on rotated inputs; values untouched.
TEST(Rope, AttentionRotatesQueriesAndKeysTheHuggingFaceWay) {
    const int64_t B = 2, T = 5, H = 4, Hkv = 2, D = 8;
    RopeTables rt(T, D);
    Attention plain{B, T, H, Hkv, D, (H + 2 * Hkv) * D};
    Attention rope = plain;
    rope.rope_cos = rt.cos.data(), rope.rope_sin = rt.sin.data();
    auto qkv = randn(B * T * plain.ldqkv, 4);
    auto turned = qkv;
    for (int64_t m = 0; m < B * T; m++) {
        const int64_t t = m % T;
        for (int64_t h = 0; h < H + Hkv; h++) {  // queries, then keys; not the values
            float* x = turned.data() + m * plain.ldqkv + h * D;
            const float* y = qkv.data() + m * plain.ldqkv + h * D;
            for (int64_t i = 0; i < D / 2; i++) {
                double c = std::cos(t * std::pow(10000.0, -2.0 * i / D));
                double s = std::sin(t * std::pow(10000.0, -2.0 * i / D));
                x[i] = float(y[i] * c - y[i + D / 2] * s);
                x[i + D / 2] = float(y[i + D / 2] * c + y[i] * s);
            }
        }
    }
    std::vector<float> out_a(B * T * H * D), out_b(out_a.size()), p(B * H * T * T);
    ref().attention_forward(out_a.data(), p.data(), qkv.data(), DType::f32, rope, {});
    ref().attention_forward(out_b.data(), p.data(), turned.data(), DType::f32, plain, {});
    expect_close(out_a, out_b, 1e-5, 1e-5, "attention with rope tables vs on rotated inputs");
    // Position 0 is not rotated at all.
    std::vector<float> first(out_a.begin(), out_a.begin() + H * D);
    ref().attention_forward(out_b.data(), p.data(), qkv.data(), DType::f32, plain, {});
    expect_close(first, std::vector<float>(out_b.begin(), out_b.begin() + H * D), 1e-6, 1e-6,
                 "position 0");
}

// The CPU backend against the reference, forward and backward, with RoPE inside (as the model
// runs it) or without; the reference's backward against finite differences in fp32.
void check_attention(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, Precision prec,
                     bool rope = true) {
    Attention a{B, T, H, Hkv, D, (H + 2 * Hkv) * D};
    RopeTables rt(T, D);
    if (rope)
        a.rope_cos = rt.cos.data(), a.rope_sin = rt.sin.data();
    const int64_t M = B * T;
    auto qkv = randn(M * a.ldqkv, 5), dout = randn(M * H * D, 6);
    std::vector<float> out_c(M * H * D), out_r(M * H * D), p_c(B * H * T * T), p_r(B * H * T * T);
    const Kernels& cpu = cpu_kernels(prec);
    // What the CPU forward keeps: the softmax first (bf16 in bf16), then its packed operands.
    std::vector<float> saved_c(cpu.attention_saved_bytes(a) / 4 + 1);
    EXPECT_GE(cpu.attention_saved_bytes(a), ref().attention_saved_bytes(a));
    void* probs_c = saved_c.data();
    Workspaces ws;
    Workspace w = ws.get(cpu.workspace_bytes(0, a));
    // The output in the compute dtype: bf16's widened into out_c.
    std::vector<uint16_t> out_bf(out_c.size(), 0x7fc0);
    const bool bf16 = prec == Precision::bf16;
    cpu.attention_forward(bf16 ? static_cast<void*>(out_bf.data()) : out_c.data(), probs_c,
                          qkv.data(), DType::f32, a, w);
    if (bf16) {
        for (size_t i = 0; i < out_c.size(); i++)
            out_c[i] = bf16_to_f32(out_bf[i]);
    }
    ref().attention_forward(out_r.data(), p_r.data(), qkv.data(), DType::f32, a, {});
    for (size_t i = 0; i < p_c.size(); i++) {
        p_c[i] = prec == Precision::bf16 ? bf16_to_f32(reinterpret_cast<uint16_t*>(probs_c)[i])
                                         : saved_c[i];
    }
    double tol = bf16 ? 3e-2 : 1e-4;
    expect_close(out_c, out_r, tol, tol, "attention out");
    expect_close(p_c, p_r, tol, tol, "attention probs");
    for (int64_t r = 0; r < B * H * T; r++) {  // exact zeros above the diagonal
        for (int64_t u = r % T + 1; u < T; u++)
            ASSERT_EQ(p_c[r * T + u], 0.0f) << "row " << r << " column " << u;
    }
    std::vector<float> dq_c(M * a.ldqkv, 9.0f), dq_r(M * a.ldqkv);
    const void* out = bf16 ? static_cast<const void*>(out_bf.data()) : out_c.data();
    cpu.attention_backward(dq_c.data(), DType::f32, dout.data(), out, qkv.data(), DType::f32,
                           probs_c, a, w);
    ref().attention_backward(dq_r.data(), DType::f32, dout.data(), out_r.data(), qkv.data(),
                             DType::f32, p_r.data(), a, {});
    expect_close(dq_c, dq_r, prec == Precision::bf16 ? 6e-2 : 1e-4, tol, "attention dqkv");
    // Written as bf16 (what the model asks for in bf16): the same values, rounded once.
    std::vector<uint16_t> dq_bf(dq_c.size(), 0x7fc0);
    cpu.attention_backward(dq_bf.data(), DType::bf16, dout.data(), out, qkv.data(), DType::f32,
                           probs_c, a, w);
    for (size_t i = 0; i < dq_bf.size(); i++)
        ASSERT_EQ(dq_bf[i], f32_to_bf16(dq_c[i])) << "dqkv as bf16, element " << i;
    // qkv and dout in bf16 (as a device's products write them) are read widened: the same bits
    // as f32 inputs holding the rounded values, in the forward and the backward.
    const std::vector<uint16_t> qkv16 = to_bf16(qkv), dout16 = to_bf16(dout);
    const std::vector<float> qkv_r = from_bf16(qkv16), dout_r = from_bf16(dout16);
    const size_t out_bytes = out_c.size() * (bf16 ? 2 : 4);
    std::vector<char> o16(out_bytes), o32(out_bytes);
    std::vector<float> dq16(dq_c.size()), dq32(dq_c.size());
    cpu.attention_forward(o16.data(), probs_c, qkv16.data(), DType::bf16, a, w);
    cpu.attention_backward(dq16.data(), DType::f32, dout16.data(), o16.data(), qkv16.data(),
                           DType::bf16, probs_c, a, w);
    cpu.attention_forward(o32.data(), probs_c, qkv_r.data(), DType::f32, a, w);
    cpu.attention_backward(dq32.data(), DType::f32, dout_r.data(), o32.data(), qkv_r.data(),
                           DType::f32, probs_c, a, w);
    EXPECT_EQ(o16, o32) << "attention of bf16 qkv";
    EXPECT_EQ(dq16, dq32) << "attention's gradient from bf16 qkv and dout";
    if (prec == Precision::fp32) {
        auto loss = [&] {
            std::vector<float> o(M * H * D), p(B * H * T * T);
            ref().attention_forward(o.data(), p.data(), qkv.data(), DType::f32, a, {});
            return dot(o, dout);
        };
        expect_fd(qkv, dq_r, loss, "attention fd");
    }
}

TEST(Attention, MultiHead) {
    check_attention(2, 9, 4, 4, 8, Precision::fp32);
}
TEST(Attention, MultiHeadWithoutRope) {
    check_attention(2, 9, 4, 4, 8, Precision::fp32, false);
}
TEST(Attention, GroupedQuery) {
    check_attention(2, 7, 6, 2, 8, Precision::fp32);
}
TEST(Attention, GroupedQueryBf16) {
    KILN_REQUIRE_PRODUCTS(Precision::bf16);
    check_attention(2, 16, 4, 2, 16, Precision::bf16);
}
TEST(Attention, MultiHeadBf16) {
    KILN_REQUIRE_PRODUCTS(Precision::bf16);
    check_attention(2, 16, 4, 4, 16, Precision::bf16);
}

TEST(SwiGlu, ForwardAndBackward) {
    const int64_t M = 6, F = 37;
    auto gu = randn(M * 2 * F, 7, 2.0f), dh = randn(M * F, 8);
    std::vector<float> h_c(M * F), h_r(M * F), d_c(M * 2 * F), d_r(M * 2 * F);
    const Kernels& cpu = cpu_kernels(Precision::fp32);
    cpu.swiglu_forward(h_c.data(), DType::f32, gu.data(), DType::f32, M, F);
    ref().swiglu_forward(h_r.data(), DType::f32, gu.data(), DType::f32, M, F);
    expect_close(h_c, h_r, 1e-6, 1e-5, "swiglu");
    cpu.swiglu_backward(d_c.data(), DType::f32, dh.data(), gu.data(), DType::f32, M, F);
    ref().swiglu_backward(d_r.data(), DType::f32, dh.data(), gu.data(), DType::f32, M, F);
    expect_close(d_c, d_r, 1e-6, 1e-5, "swiglu backward");
    // bf16 outputs are the f32 ones rounded.
    std::vector<uint16_t> h_bf(M * F), d_bf(M * 2 * F);
    cpu.swiglu_forward(h_bf.data(), DType::bf16, gu.data(), DType::f32, M, F);
    EXPECT_EQ(h_bf, to_bf16(h_c));
    cpu.swiglu_backward(d_bf.data(), DType::bf16, dh.data(), gu.data(), DType::f32, M, F);
    EXPECT_EQ(d_bf, to_bf16(d_c));
    ref().swiglu_backward(d_bf.data(), DType::bf16, dh.data(), gu.data(), DType::f32, M, F);
    expect_close(from_bf16(d_bf), d_r, 1e-6, 4e-3, "swiglu backward bf16");
    // bf16 inputs are read widened: the same as f32 inputs holding the rounded values.
    const std::vector<uint16_t> gu16 = to_bf16(gu), dh16 = to_bf16(dh);
    const std::vector<float> gu_r = from_bf16(gu16), dh_r = from_bf16(dh16);
    std::vector<float> h_in(M * F), h_want(M * F), d_in(M * 2 * F), d_want(M * 2 * F);
    cpu.swiglu_forward(h_in.data(), DType::f32, gu16.data(), DType::bf16, M, F);
    cpu.swiglu_forward(h_want.data(), DType::f32, gu_r.data(), DType::f32, M, F);
    EXPECT_EQ(h_in, h_want);
    cpu.swiglu_backward(d_in.data(), DType::f32, dh16.data(), gu16.data(), DType::bf16, M, F);
    cpu.swiglu_backward(d_want.data(), DType::f32, dh_r.data(), gu_r.data(), DType::f32, M, F);
    EXPECT_EQ(d_in, d_want);
    ref().swiglu_forward(h_r.data(), DType::f32, gu16.data(), DType::bf16, M, F);
    expect_close(h_in, h_r, 1e-6, 1e-5, "swiglu of bf16 inputs");
    auto loss = [&] {
        std::vector<float> h(M * F);
        ref().swiglu_forward(h.data(), DType::f32, gu.data(), DType::f32, M, F);
        return dot(h, dh);
    };
    expect_fd(gu, d_r, loss, "swiglu fd");
}

// Loss from the row statistics: log(sumexp) + max - target logit.
std::vector<double> losses_from_stats(const Kernels& k, const std::vector<float>& logits,
                                      const std::vector<int32_t>& targets, int64_t M, int64_t V) {
    std::vector<float> mx(M), se(M), tl(M);
    k.logit_stats(logits.data(), targets.data(), M, V, mx.data(), se.data(), tl.data());
    std::vector<double> out(M);
    for (int64_t m = 0; m < M; m++) {
        out[m] = targets[m] < 0 ? 0 : std::log(double(se[m])) + mx[m] - tl[m];
    }
    return out;
}

TEST(CrossEntropy, StatsAndBackward) {
    const int64_t M = 5, V = 5000;
    auto logits = randn(M * V, 9, 3.0f);
    std::vector<int32_t> targets = {3, 4999, -1, 0, 1234};
    const Kernels& cpu = cpu_kernels(Precision::fp32);
    auto lc = losses_from_stats(cpu, logits, targets, M, V);
    auto lr = losses_from_stats(ref(), logits, targets, M, V);
    for (int64_t m = 0; m < M; m++)
        EXPECT_NEAR(lc[m], lr[m], 1e-5 * (1 + std::fabs(lr[m])));
    EXPECT_EQ(lr[2], 0.0);
    // Backward, with a per-row scale (0 ignores a row).
    std::vector<float> mx(M), se(M), tl(M), scale = {0.5f, 0.5f, 0.0f, 0.25f, 0.5f};
    ref().logit_stats(logits.data(), targets.data(), M, V, mx.data(), se.data(), tl.data());
    std::vector<float> gc(M * V), gr(M * V);
    cpu.cross_entropy_backward(logits.data(), targets.data(), mx.data(), se.data(), scale.data(), M,
                               V, gc.data(), DType::f32);
    ref().cross_entropy_backward(logits.data(), targets.data(), mx.data(), se.data(), scale.data(),
                                 M, V, gr.data(), DType::f32);
    expect_close(gc, gr, 1e-7, 1e-4, "xent grad");
    for (int64_t v = 0; v < V; v++)
        ASSERT_EQ(gr[2 * V + v], 0.0f);
    // The bf16 gradient is the rounded f32 one; in place over the logits works too.
    std::vector<uint16_t> gb(M * V);
    cpu.cross_entropy_backward(logits.data(), targets.data(), mx.data(), se.data(), scale.data(), M,
                               V, gb.data(), DType::bf16);
    std::vector<float> gbf(M * V);
    for (int64_t i = 0; i < M * V; i++)
        gbf[i] = bf16_to_f32(gb[i]);
    expect_close(gbf, gr, 1e-7, 1e-2, "xent grad bf16");
    auto inplace = logits;
    cpu.cross_entropy_backward(inplace.data(), targets.data(), mx.data(), se.data(), scale.data(),
                               M, V, inplace.data(), DType::f32);
    expect_close(inplace, gr, 1e-7, 1e-4, "xent grad in place");
    // Finite differences of sum_m scale[m] * loss[m].
    std::vector<double> sc(scale.begin(), scale.end());
    auto loss = [&] {
        auto l = losses_from_stats(ref(), logits, targets, M, V);
        double s = 0;
        for (int64_t m = 0; m < M; m++)
            s += sc[m] * l[m];
        return s;
    };
    // Where the gradient is: each row's target and its 8 largest logits; and 16 entries anywhere.
    std::vector<size_t> entries;
    std::mt19937_64 rng(11);
    for (int64_t m = 0; m < M; m++) {
        if (scale[m] == 0)
            continue;
        if (targets[m] >= 0)
            entries.push_back(size_t(m * V + targets[m]));
        std::vector<size_t> row(V);
        std::iota(row.begin(), row.end(), size_t(m * V));
        std::partial_sort(row.begin(), row.begin() + 8, row.end(),
                          [&](size_t a, size_t b) { return logits[a] > logits[b]; });
        entries.insert(entries.end(), row.begin(), row.begin() + 8);
    }
    for (int i = 0; i < 16; i++)
        entries.push_back(size_t(rng() % uint64_t(M * V)));
    expect_fd_nmse(logits, gr, loss, entries, 1e-5, "xent fd");
}

// The fused form equals the two halves, on both backends.
TEST(CrossEntropy, FusedEqualsStatsThenBackward) {
    const int64_t M = 4, V = 3000;
    auto logits = randn(M * V, 11, 2.0f);
    std::vector<int32_t> targets = {5, -1, 2999, 0};
    std::vector<float> scale = {0.5f, 0.0f, 0.25f, 1.0f};
    auto want = losses_from_stats(ref(), logits, targets, M, V);
    std::vector<float> mx(M), se(M), tl(M), gr(M * V);
    ref().logit_stats(logits.data(), targets.data(), M, V, mx.data(), se.data(), tl.data());
    ref().cross_entropy_backward(logits.data(), targets.data(), mx.data(), se.data(), scale.data(),
                                 M, V, gr.data(), DType::f32);
    for (const Kernels* k : {&ref(), &cpu_kernels(Precision::fp32)}) {
        std::vector<float> loss(M), g(M * V);
        k->cross_entropy(logits.data(), targets.data(), scale.data(), M, V, loss.data(), g.data(),
                         DType::f32);
        for (int64_t m = 0; m < M; m++)
            EXPECT_NEAR(loss[m], want[m], 1e-5 * (1 + want[m]));
        expect_close(g, gr, 1e-7, 1e-4, "fused xent grad");
    }
}

// A vocabulary split in two halves: combining the halves' statistics gives the full loss.
TEST(CrossEntropy, SplitVocabularyCombines) {
    const int64_t M = 3, V = 100, half = V / 2;
    auto logits = randn(M * V, 10, 2.0f);
    std::vector<int32_t> targets = {7, 77, 50};
    auto full = losses_from_stats(ref(), logits, targets, M, V);
    std::vector<float> mx[2], se[2], tl[2];
    for (int r = 0; r < 2; r++) {
        std::vector<float> part(M * half);
        std::vector<int32_t> local(M);
        for (int64_t m = 0; m < M; m++) {
            for (int64_t v = 0; v < half; v++)
                part[m * half + v] = logits[m * V + r * half + v];
            int32_t t = targets[m] - int32_t(r * half);
            local[m] = t >= 0 && t < half ? t : -1;
        }
        mx[r].resize(M), se[r].resize(M), tl[r].resize(M);
        cpu_kernels(Precision::fp32)
            .logit_stats(part.data(), local.data(), M, half, mx[r].data(), se[r].data(),
                         tl[r].data());
    }
    for (int64_t m = 0; m < M; m++) {
        double g = std::max(mx[0][m], mx[1][m]);
        double s = se[0][m] * std::exp(mx[0][m] - g) + se[1][m] * std::exp(mx[1][m] - g);
        EXPECT_NEAR(std::log(s) + g - (tl[0][m] + tl[1][m]), full[m], 1e-5);
    }
}

TEST(Embedding, ForwardAndBackwardWithRepeats) {
    const int64_t M = 6, C = 20, V = 4;
    auto wte = randn(V * C, 10), dout = randn(M * C, 11);
    std::vector<int32_t> tokens = {1, 3, 1, 0, -1, 2};  // -1: a zero row, no gradient
    std::vector<float> o_c(M * C), o_r(M * C), d_c(V * C, 1.0f), d_r(V * C, 1.0f);
    cpu_kernels(Precision::fp32)
        .embedding_forward(o_c.data(), tokens.data(), wte.data(), DType::f32, M, C);
    ref().embedding_forward(o_r.data(), tokens.data(), wte.data(), DType::f32, M, C);
    EXPECT_EQ(o_c, o_r);
    EXPECT_EQ(o_c[2 * C + 5], wte[1 * C + 5]);
    EXPECT_EQ(o_c[4 * C + 5], 0.0f);
    // A bf16 table gives its values widened: the rows are the same up to bf16 rounding.
    std::vector<uint16_t> wte_bf(V * C);
    for (size_t i = 0; i < wte_bf.size(); i++)
        wte_bf[i] = f32_to_bf16(wte[i]);
    cpu_kernels(Precision::bf16)
        .embedding_forward(o_c.data(), tokens.data(), wte_bf.data(), DType::bf16, M, C);
    ref().embedding_forward(o_r.data(), tokens.data(), wte_bf.data(), DType::bf16, M, C);
    EXPECT_EQ(o_c, o_r);
    EXPECT_EQ(o_c[3 * C + 7], bf16_to_f32(wte_bf[7]));
    expect_close(
        o_c,
        [&] {
            std::vector<float> exact(M * C);
            ref().embedding_forward(exact.data(), tokens.data(), wte.data(), DType::f32, M, C);
            return exact;
        }(),
        1e-6, 4e-3, "bf16 embedding");
    cpu_kernels(Precision::fp32).embedding_backward(d_c.data(), dout.data(), tokens.data(), M, C);
    ref().embedding_backward(d_r.data(), dout.data(), tokens.data(), M, C);
    expect_close(d_c, d_r, 1e-6, 1e-6, "embedding backward");
}

TEST(AdamW, MatchesReference) {
    const int64_t n = 1000;
    auto p = randn(n, 12), g = randn(n, 13), m = randn(n, 14, 0.1f), v = randn(n, 15, 0.1f);
    for (auto& x : v)
        x = x * x;
    auto pc = p, mc = m, vc = v, pr = p, mr = m, vr = v;
    AdamWStep s{1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.7f, 3};
    std::vector<uint16_t> pb(n);
    cpu_kernels(Precision::fp32).adamw(pc.data(), pb.data(), mc.data(), vc.data(), g.data(), n, s);
    ref().adamw(pr.data(), nullptr, mr.data(), vr.data(), g.data(), n, s);
    for (int64_t i = 0; i < n; i++)
        ASSERT_EQ(pb[i], f32_to_bf16(pc[i]));
    expect_close(pc, pr, 1e-6, 1e-5, "adamw p");
    expect_close(mc, mr, 1e-7, 1e-6, "adamw m");
    expect_close(vc, vr, 1e-7, 1e-6, "adamw v");
}

}  // namespace
}  // namespace kiln::kernels
