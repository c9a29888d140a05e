// The CUDA ops on a device against the double-precision reference; each case skips, saying why,
// on a machine without a GPU. Their arithmetic is also checked without one, on every run, by
// test_kernel_math.cpp; these cases add what only a device shows (launch shapes, the warp
// shuffles of the block reduction, device expf/sqrtf).
//
// Tolerances are those of test_kernel_math.cpp (rel L2 error over the tensor, see there), with
// a factor 4 for the device's math library (expf within 2 units of roundoff, not glibc's ~0.5).
#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/fs.h"
#include "fixture.h"
#include "kernels/backends.h"
#include "kernels/cpu/cpu.h"
#include "kernels/reference/reference.h"
#include "kernels/tensors.h"
#include "model/llama.h"
#include "model/replayed_steps.h"
#include "optim/adamw.h"

#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/attention_flash.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cudnn_attention.h"
#endif

namespace kiln::kernels {
namespace {

using kiln::testing::expect_bf16_within_one_ulp;
using kiln::testing::randn;
using kiln::testing::rel_err;

#ifdef KILN_HAVE_CUDA
// Rotary tables of T positions and D / 2 frequencies (base 10000), as the model makes them.
std::pair<std::vector<float>, std::vector<float>> rope_tables(int64_t T, int64_t D) {
    std::vector<float> cos(T * D / 2), sin(T * D / 2);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < D / 2; i++) {
            const double angle = t * std::pow(10000.0, -2.0 * i / D);
            cos[t * D / 2 + i] = float(std::cos(angle));
            sin[t * D / 2 + i] = float(std::sin(angle));
        }
    }
    return {cos, sin};
}

#define KILN_REQUIRE_CUDA() \
    if (!cuda_available())  \
    GTEST_SKIP() << "no CUDA device here (" << kiln::kernels::no_cuda_reason() << ")"

constexpr double kTol = 4e-6;

// A device copy of a host vector, freed at scope exit.
template <typename T>
struct Dev {
    T* ptr = nullptr;
    size_t n = 0;
    explicit Dev(const std::vector<T>& host) : n(host.size()) {
        EXPECT_EQ(cudaMalloc(&ptr, n * sizeof(T)), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    }
    explicit Dev(size_t count) : n(count) {  // zeros
        EXPECT_EQ(cudaMalloc(&ptr, n * sizeof(T)), cudaSuccess);
        EXPECT_EQ(cudaMemset(ptr, 0, n * sizeof(T)), cudaSuccess);
    }
    std::vector<T> host() const {
        std::vector<T> h(n);
        EXPECT_EQ(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
        return h;
    }
    ~Dev() { cudaFree(ptr); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
};

const Kernels& ref() {
    return reference_kernels(Precision::fp32);
}

TEST(Cuda, Embedding) {
    KILN_REQUIRE_CUDA();
    const int64_t M = 300, C = 100, V = 17;
    std::vector<int32_t> tokens(M);
    for (int64_t m = 0; m < M; m++)
        tokens[m] = m % 7 == 3 ? -1 : int32_t((m * 5) % V);
    auto wte = randn(V * C, 1);
    std::vector<float> want(M * C);
    Dev<int32_t> d_tokens(tokens);
    Dev<float> d_wte(wte), d_out(std::vector<float>(M * C, 9.0f));
    cuda::embedding_forward(d_out.ptr, d_tokens.ptr, d_wte.ptr, DType::f32, M, C);
    ref().embedding_forward(want.data(), tokens.data(), wte.data(), DType::f32, M, C);
    EXPECT_EQ(d_out.host(), want);
    // Column by column in row order, as the reference adds: the same bits.
    auto dout = randn(M * C, 2), dwte = randn(V * C, 3);
    Dev<float> d_dout(dout), d_dwte(dwte);
    cuda::embedding_backward(d_dwte.ptr, d_dout.ptr, d_tokens.ptr, M, C);
    ref().embedding_backward(dwte.data(), dout.data(), tokens.data(), M, C);
    EXPECT_EQ(d_dwte.host(), dwte);
}

// Shapes: 3 rows a block of the backward and 2 in the last; 12,288 columns (48 KB of sums a
// block, which must ask for more than the default shared memory); 60,000 columns, whose sums do
// not fit one block's shared memory and go to device memory instead.
TEST(Cuda, RmsNormForwardAndBackward) {
    KILN_REQUIRE_CUDA();
    for (auto [M, C] : {std::pair<int64_t, int64_t>{1100, 1000}, {40, 12288}, {5, 60000}}) {
        const std::string what = "M=" + std::to_string(M) + " C=" + std::to_string(C);
        auto x = randn(M * C, 1, 2.5f), w = randn(C, 2), dout = randn(M * C, 3);
        std::vector<float> out(M * C), rstd(M);
        ref().rmsnorm_forward(out.data(), DType::f32, rstd.data(), x.data(), w.data(), M, C, 1e-5f);
        Dev<float> d_x(x), d_w(w), d_out{size_t(M * C)}, d_rstd{size_t(M)};
        cuda::rmsnorm_forward(d_out.ptr, DType::f32, d_rstd.ptr, d_x.ptr, d_w.ptr, M, C, 1e-5f);
        EXPECT_LT(rel_err(d_out.host(), out), kTol) << what;
        EXPECT_LT(rel_err(d_rstd.host(), rstd), kTol) << what;
        std::vector<uint16_t> out_bf(M * C);
        ref().rmsnorm_forward(out_bf.data(), DType::bf16, rstd.data(), x.data(), w.data(), M, C,
                              1e-5f);
        Dev<uint16_t> d_out_bf{size_t(M * C)};
        cuda::rmsnorm_forward(d_out_bf.ptr, DType::bf16, d_rstd.ptr, d_x.ptr, d_w.ptr, M, C, 1e-5f);
        expect_bf16_within_one_ulp(d_out_bf.host(), out_bf, "rmsnorm bf16 out");

        // dx and dw accumulate: start both at zero and compare the sums; dx's bf16 copy is the
        // sum rounded.
        std::vector<float> dx(M * C), dw(C);
        ref().rmsnorm_backward(dx.data(), nullptr, dw.data(), dout.data(), x.data(), w.data(),
                               rstd.data(), M, C);
        Dev<float> d_dout(dout), d_rs(rstd), d_dx{size_t(M * C)}, d_dw{size_t(C)};
        Dev<uint16_t> d_dx_bf{size_t(M * C)};
        cuda::rmsnorm_backward(d_dx.ptr, d_dx_bf.ptr, d_dw.ptr, d_dout.ptr, d_x.ptr, d_w.ptr,
                               d_rs.ptr, M, C);
        const auto got = d_dx.host();
        EXPECT_LT(rel_err(got, dx), kTol) << what;
        EXPECT_LT(rel_err(d_dw.host(), dw), kTol) << what;
        std::vector<uint16_t> want(got.size());
        for (size_t i = 0; i < got.size(); i++)
            want[i] = f32_to_bf16(got[i]);
        EXPECT_EQ(d_dx_bf.host(), want) << what;
    }
}

TEST(Cuda, SwiGluForwardAndBackward) {
    KILN_REQUIRE_CUDA();
    const int64_t M = 33, F = 500;
    auto gu = randn(M * 2 * F, 1, 2.0f), dh = randn(M * F, 2);
    std::vector<float> h(M * F), dgu(M * 2 * F);
    ref().swiglu_forward(h.data(), DType::f32, gu.data(), DType::f32, M, F);
    ref().swiglu_backward(dgu.data(), DType::f32, dh.data(), gu.data(), DType::f32, M, F);
    Dev<float> d_gu(gu), d_dh(dh), d_h{size_t(M * F)}, d_dgu{size_t(M * 2 * F)};
    cuda::swiglu_forward(d_h.ptr, DType::f32, d_gu.ptr, DType::f32, M, F);
    cuda::swiglu_backward(d_dgu.ptr, DType::f32, d_dh.ptr, d_gu.ptr, DType::f32, M, F);
    EXPECT_LT(rel_err(d_h.host(), h), kTol);
    EXPECT_LT(rel_err(d_dgu.host(), dgu), kTol);
    std::vector<uint16_t> hb(M * F);
    ref().swiglu_forward(hb.data(), DType::bf16, gu.data(), DType::f32, M, F);
    Dev<uint16_t> d_hb{size_t(M * F)};
    cuda::swiglu_forward(d_hb.ptr, DType::bf16, d_gu.ptr, DType::f32, M, F);
    expect_bf16_within_one_ulp(d_hb.host(), hb, "swiglu bf16 h");
    // bf16 inputs, as the gate/up and dh products write them in bf16.
    std::vector<uint16_t> gu16(gu.size()), dh16(dh.size());
    for (size_t i = 0; i < gu.size(); i++)
        gu16[i] = f32_to_bf16(gu[i]);
    for (size_t i = 0; i < dh.size(); i++)
        dh16[i] = f32_to_bf16(dh[i]);
    ref().swiglu_forward(h.data(), DType::f32, gu16.data(), DType::bf16, M, F);
    ref().swiglu_backward(dgu.data(), DType::f32, dh16.data(), gu16.data(), DType::bf16, M, F);
    Dev<uint16_t> d_gu16(gu16), d_dh16(dh16);
    cuda::swiglu_forward(d_h.ptr, DType::f32, d_gu16.ptr, DType::bf16, M, F);
    cuda::swiglu_backward(d_dgu.ptr, DType::f32, d_dh16.ptr, d_gu16.ptr, DType::bf16, M, F);
    EXPECT_LT(rel_err(d_h.host(), h), kTol);
    EXPECT_LT(rel_err(d_dgu.host(), dgu), kTol);
}

// The fused loss and gradient, in place over the logits as the chunked LM head runs it, and the
// two halves the vocabulary-parallel head uses.
TEST(Cuda, CrossEntropy) {
    KILN_REQUIRE_CUDA();
    const int64_t M = 6, V = 32000;
    auto logits = randn(M * V, 1, 3.0f);
    std::vector<int32_t> targets = {3, 31999, -1, 0, 1234, 77};
    std::vector<float> scale = {0.5f, 0.5f, 0.0f, 0.25f, 0.5f, 1.0f};
    std::vector<float> loss(M), g(M * V), mx(M), se(M), tl(M);
    ref().cross_entropy(logits.data(), targets.data(), scale.data(), M, V, loss.data(), g.data(),
                        DType::f32);
    ref().logit_stats(logits.data(), targets.data(), M, V, mx.data(), se.data(), tl.data());
    Dev<float> d_logits(logits), d_scale(scale), d_loss{size_t(M)};
    Dev<int32_t> d_targets(targets);
    Dev<float> d_mx{size_t(M)}, d_se{size_t(M)}, d_tl{size_t(M)}, d_g{size_t(M * V)};
    cuda::logit_stats(d_logits.ptr, d_targets.ptr, M, V, d_mx.ptr, d_se.ptr, d_tl.ptr);
    EXPECT_EQ(d_mx.host(), mx);
    EXPECT_EQ(d_tl.host(), tl);
    EXPECT_LT(rel_err(d_se.host(), se), kTol);
    cuda::cross_entropy_backward(d_logits.ptr, d_targets.ptr, d_mx.ptr, d_se.ptr, d_scale.ptr, M, V,
                                 d_g.ptr, DType::f32);
    EXPECT_LT(rel_err(d_g.host(), g), kTol);
    cuda::cross_entropy(d_logits.ptr, d_targets.ptr, d_scale.ptr, M, V, d_loss.ptr, d_logits.ptr,
                        DType::f32);
    EXPECT_LT(rel_err(d_loss.host(), loss), kTol);
    EXPECT_LT(rel_err(d_logits.host(), g), kTol);
}

TEST(Cuda, AdamWAndBf16Weights) {
    KILN_REQUIRE_CUDA();
    const int64_t n = 100000;
    auto p = randn(n, 4), g = randn(n, 5), m = randn(n, 6, 0.1f), v = randn(n, 7, 0.1f);
    for (auto& e : v)
        e = e * e;
    Dev<float> d_p(p), d_m(m), d_v(v), d_g(g);
    Dev<uint16_t> d_pb{size_t(n)};
    const auto p0 = p;
    std::vector<uint16_t> pb(n);
    AdamWStep s{1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 2};
    ref().adamw(p.data(), pb.data(), m.data(), v.data(), g.data(), n, s);
    cuda::adamw(d_p.ptr, d_pb.ptr, d_m.ptr, d_v.ptr, d_g.ptr, n, s);
    auto got = d_p.host();
    std::vector<float> moved(n), moved_ref(n);
    for (int64_t i = 0; i < n; i++)
        moved[i] = got[i] - p0[i], moved_ref[i] = p[i] - p0[i];
    EXPECT_LT(rel_err(moved, moved_ref), 3e-6);
    EXPECT_LT(rel_err(d_m.host(), m), kTol);
    EXPECT_LT(rel_err(d_v.host(), v), kTol);
    expect_bf16_within_one_ulp(d_pb.host(), pb, "adamw bf16 weights");
    std::vector<uint16_t> want(n);
    ref().to_bf16(want.data(), got.data(), n);
    Dev<uint16_t> d_bf{size_t(n)};
    cuda::to_bf16(d_bf.ptr, d_p.ptr, n);
    EXPECT_EQ(d_bf.host(), want);
}

// Every transposition, with and without accumulation, in both precisions, against the
// reference (which rounds f32 operands to bf16 as the bf16 product does); then a bf16 weight
// operand. rel is over C; K = 200 fp32 products in fp32 stay near 1e-7 of the result; in bf16
// the reference rounds the same operands, leaving only the accumulation order and the tensor
// cores' fp32 accumulation, so 1e-5 in fp32 and 1e-4 in bf16 leave room and still catch a
// transposition mixed up (rel ~1).
TEST(Cuda, GemmMatchesReference) {
    KILN_REQUIRE_CUDA();
    const int64_t M = 70, N = 50, K = 200;
    for (Precision prec : {Precision::fp32, Precision::bf16}) {
        const double tol = prec == Precision::bf16 ? 1e-4 : 1e-5;
        Dev<char> ws{cuda::gemm_workspace_bytes(M * K + N * K)};
        for (int ta = 0; ta < 2; ta++) {
            for (int tb = 0; tb < 2; tb++) {
                for (int acc = 0; acc < 3; acc++) {  // 2: accumulating onto another matrix
                    // Row strides past the dense ones, so ld is honoured.
                    const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
                    auto a = randn((ta ? K : M) * lda, 1), b = randn((tb ? N : K) * ldb, 2);
                    auto c = randn(M * ldc, 3), c_in = randn(M * ldc, 6);
                    Dev<float> d_a(a), d_b(b), d_c(c), d_c_in(c_in);
                    Gemm g;
                    g.M = M, g.N = N, g.K = K, g.trans_a = ta, g.trans_b = tb;
                    g.lda = lda, g.ldb = ldb, g.ldc = ldc, g.alpha = 0.5f, g.accumulate = acc > 0;
                    g.a = a.data(), g.b = b.data(), g.c = c.data();
                    g.c_in = acc == 2 ? c_in.data() : nullptr;
                    reference_kernels(prec).gemm(g, {});
                    g.a = d_a.ptr, g.b = d_b.ptr, g.c = d_c.ptr;
                    g.c_in = acc == 2 ? d_c_in.ptr : nullptr;
                    cuda::gemm(g, prec, {ws.ptr, ws.n});
                    EXPECT_LT(rel_err(d_c.host(), c), tol)
                        << precision_name(prec) << " ta=" << ta << " tb=" << tb << " acc=" << acc;
                    EXPECT_EQ(d_c_in.host(), c_in) << "c_in is only read";
                }
            }
        }
        // A bf16 weight stored (N, K), as the model's products read them.
        auto a = randn(M * K, 4), w = randn(N * K, 5);
        std::vector<uint16_t> w_bf(w.size());
        for (size_t i = 0; i < w.size(); i++)
            w_bf[i] = f32_to_bf16(w[i]);
        std::vector<float> c(M * N);
        Gemm g;
        g.M = M, g.N = N, g.K = K, g.trans_b = true, g.lda = K, g.ldb = K, g.ldc = N;
        g.b_type = DType::bf16;
        g.a = a.data(), g.b = w_bf.data(), g.c = c.data();
        reference_kernels(prec).gemm(g, {});
        Dev<float> d_a(a), d_c{size_t(M * N)};
        Dev<uint16_t> d_w(w_bf);
        g.a = d_a.ptr, g.b = d_w.ptr, g.c = d_c.ptr;
        cuda::gemm(g, prec, {ws.ptr, ws.n});
        EXPECT_LT(rel_err(d_c.host(), c), tol) << precision_name(prec) << " bf16 weight";
    }
}

// Autotuning the products: one shape, accumulating or not, tuned over passes as the trainer
// runs them, on zero operands as a pipeline stage's throwaway pass has (where every summation
// order agrees); it gets a choice among cuBLASLt's ranks, and on real operands the chosen
// algorithm gives the default's bits, through tune_next()'s choice and again through use().
TEST(Cuda, TunedProductsKeepTheDefaultsBits) {
    KILN_REQUIRE_CUDA();
    const int64_t M = 512, N = 384, K = 1024;
    auto a = randn(M * K, 1), b = randn(N * K, 2), c0 = randn(M * N, 3);
    Dev<float> d_a(a), d_zeros{size_t(M * K)}, d_b(b), d_c(c0);
    Dev<char> ws{cuda::gemm_workspace_bytes(M * K + N * K)};
    auto pass = [&](const float* first) {
        std::vector<std::vector<float>> outs;
        for (int acc = 0; acc < 2; acc++) {
            EXPECT_EQ(cudaMemcpy(d_c.ptr, c0.data(), c0.size() * 4, cudaMemcpyHostToDevice),
                      cudaSuccess);
            Gemm g;
            g.M = M, g.N = N, g.K = K, g.trans_b = true, g.lda = K, g.ldb = K, g.ldc = N;
            g.accumulate = acc;
            g.a = first, g.b = d_b.ptr, g.c = d_c.ptr;
            cuda::gemm(g, Precision::bf16, {ws.ptr, ws.n});
            outs.push_back(d_c.host());
        }
        return outs;
    };
    cuda::use({});
    const auto want = pass(d_a.ptr);
    cuda::tune(0, 1);
    pass(d_zeros.ptr);
    while (cuda::tune_next())
        pass(d_zeros.ptr);
    const Plan plan = cuda::tuned();
    ASSERT_EQ(plan.size(), 1u) << "the two products share a shape, accumulating or not";
    for (const auto& [shape, choice] : plan)
        EXPECT_EQ(choice.rfind("heuristic ", 0), 0u) << shape << ": " << choice;
    EXPECT_EQ(pass(d_a.ptr), want) << "the tuned choice";
    cuda::use(plan);
    EXPECT_EQ(pass(d_a.ptr), want) << "the plan used";
    cuda::use({});
}

// An attention shape, its qkv packed as the model packs it.
struct AttentionShape {
    int64_t B, T, H, Hkv, D;
    Attention attention() const { return {B, T, H, Hkv, D, (H + 2 * Hkv) * D}; }
};

std::vector<float> widened(const std::vector<uint16_t>& h) {
    std::vector<float> f(h.size());
    for (size_t i = 0; i < h.size(); i++)
        f[i] = bf16_to_f32(h[i]);
    return f;
}

// Grouped-query attention with RoPE (tables on the device) against the reference, in both
// precisions; tolerances as test_kernel_math.cpp's host replays: in fp32 times 4 (device expf,
// cuBLASLt's summation order), in bf16 as there (the operands' rounding dominates). Shapes: T =
// 300, longer than a row block and 4 tiles and a part of the fused kernels; the widest fused head
// (D = 128, the most shared memory); D = 8, which bf16 runs as products. The output is in the
// compute dtype; a bf16 gradient is its f32 value rounded.

TEST(Cuda, AttentionMatchesReference) {
    KILN_REQUIRE_CUDA();
    for (const AttentionShape sh :
         {AttentionShape{2, 300, 4, 2, 32}, AttentionShape{1, 130, 4, 1, 128},
          AttentionShape{1, 40, 2, 1, 8}}) {
        const auto [cos, sin] = rope_tables(sh.T, sh.D);
        Attention a = sh.attention();
        const int64_t M = a.B * a.T, HD = a.H * a.D;
        auto qkv = randn(M * a.ldqkv, 1), dout = randn(M * HD, 2);
        Dev<float> d_cos(cos), d_sin(sin), d_qkv(qkv), d_dout(dout);
        for (Precision prec : {Precision::fp32, Precision::bf16}) {
            const std::string what = std::string(precision_name(prec)) +
                                     " T=" + std::to_string(a.T) + " D=" + std::to_string(a.D);
            Dev<char> ws{cuda::attention_workspace_bytes(a, prec)};
            Attention host = a;
            host.rope_cos = cos.data(), host.rope_sin = sin.data();
            Attention dev = a;
            dev.rope_cos = d_cos.ptr, dev.rope_sin = d_sin.ptr;
            const Kernels& r = reference_kernels(prec);
            const bool bf16 = prec == Precision::bf16;
            std::vector<char> saved(r.attention_saved_bytes(host));
            std::vector<float> out(M * HD), dqkv(M * a.ldqkv);
            std::vector<uint16_t> out16(bf16 ? M * HD : 0);
            void* out_r = bf16 ? static_cast<void*>(out16.data()) : out.data();
            r.attention_forward(out_r, saved.data(), qkv.data(), DType::f32, host, {});
            r.attention_backward(dqkv.data(), DType::f32, dout.data(), out_r, qkv.data(),
                                 DType::f32, saved.data(), host, {});
            if (bf16)
                out = widened(out16);
            if (!cuda::flash_attention(a, prec)) {  // the products rung keeps the probabilities
                ASSERT_EQ(cuda::attention_saved_bytes(a, prec), saved.size()) << what;
            }
            Dev<char> d_saved{cuda::attention_saved_bytes(a, prec)};
            Dev<float> d_out32{size_t(M * HD)}, d_dqkv{size_t(M * a.ldqkv)};
            Dev<uint16_t> d_out16{size_t(M * HD)};
            void* d_out = bf16 ? static_cast<void*>(d_out16.ptr) : d_out32.ptr;
            cuda::attention_forward(d_out, d_saved.ptr, d_qkv.ptr, DType::f32, dev, prec,
                                    {ws.ptr, ws.n});
            cuda::attention_backward(d_dqkv.ptr, DType::f32, d_dout.ptr, d_out, d_qkv.ptr,
                                     DType::f32, d_saved.ptr, dev, prec, {ws.ptr, ws.n});
            const std::vector<float> got = bf16 ? widened(d_out16.host()) : d_out32.host();
            EXPECT_LT(rel_err(got, out), bf16 ? 1e-2 : kTol) << what;
            EXPECT_LT(rel_err(d_dqkv.host(), dqkv), bf16 ? 1e-2 : kTol) << what;
            if (bf16) {
                // The same bits on a second run (no atomics), and a bf16 gradient is the f32
                // one rounded.
                const auto f32 = d_dqkv.host();
                cuda::attention_backward(d_dqkv.ptr, DType::f32, d_dout.ptr, d_out, d_qkv.ptr,
                                         DType::f32, d_saved.ptr, dev, prec, {ws.ptr, ws.n});
                EXPECT_EQ(d_dqkv.host(), f32) << what;
                Dev<uint16_t> d_dqkv_bf{size_t(M * a.ldqkv)};
                cuda::attention_backward(d_dqkv_bf.ptr, DType::bf16, d_dout.ptr, d_out, d_qkv.ptr,
                                         DType::f32, d_saved.ptr, dev, prec, {ws.ptr, ws.n});
                std::vector<uint16_t> want(f32.size());
                for (size_t i = 0; i < f32.size(); i++)
                    want[i] = f32_to_bf16(f32[i]);
                EXPECT_EQ(d_dqkv_bf.host(), want) << what;
            }
            // qkv and dout in bf16 (as the bf16 table's products write them) are read widened:
            // in bf16 the same bits as f32 inputs that hold the rounded values; in f32 the same
            // values, though a widened dout is a dense copy, whose products cuBLASLt may run
            // with another algorithm than the strided original's.
            std::vector<uint16_t> qkv16(qkv.size()), dout16(dout.size());
            std::vector<float> qkv_r(qkv.size()), dout_r(dout.size());
            for (size_t i = 0; i < qkv.size(); i++)
                qkv16[i] = f32_to_bf16(qkv[i]), qkv_r[i] = bf16_to_f32(qkv16[i]);
            for (size_t i = 0; i < dout.size(); i++)
                dout16[i] = f32_to_bf16(dout[i]), dout_r[i] = bf16_to_f32(dout16[i]);
            Dev<uint16_t> d_qkv16(qkv16), d_dout16(dout16);
            Dev<float> d_qkv_r(qkv_r), d_dout_r(dout_r), d_dq16{size_t(M * a.ldqkv)},
                d_dq32{size_t(M * a.ldqkv)};
            cuda::attention_forward(d_out, d_saved.ptr, d_qkv16.ptr, DType::bf16, dev, prec,
                                    {ws.ptr, ws.n});
            const std::vector<float> got16 = bf16 ? widened(d_out16.host()) : d_out32.host();
            cuda::attention_backward(d_dq16.ptr, DType::f32, d_dout16.ptr, d_out, d_qkv16.ptr,
                                     DType::bf16, d_saved.ptr, dev, prec, {ws.ptr, ws.n});
            cuda::attention_forward(d_out, d_saved.ptr, d_qkv_r.ptr, DType::f32, dev, prec,
                                    {ws.ptr, ws.n});
            const std::vector<float> got32 = bf16 ? widened(d_out16.host()) : d_out32.host();
            cuda::attention_backward(d_dq32.ptr, DType::f32, d_dout_r.ptr, d_out, d_qkv_r.ptr,
                                     DType::f32, d_saved.ptr, dev, prec, {ws.ptr, ws.n});
            EXPECT_EQ(got16, got32) << what << ": the output of bf16 qkv";
            if (bf16)
                EXPECT_EQ(d_dq16.host(), d_dq32.host()) << what << ": the gradient, bf16 inputs";
            else
                EXPECT_LT(rel_err(d_dq16.host(), d_dq32.host()), kTol) << what << ": bf16 inputs";
        }
    }
}

// cuDNN checks every tensor and operation of its attention graphs as they are made, which needs
// no GPU: shapes that match, types it takes, attributes it knows. With grouped-query heads the
// backward sums dK and dV over each group (two more operations).
TEST(Cuda, CudnnAttentionGraphsPassCudnnsChecks) {
    if (const std::string why = cuda::cudnn_unavailable(); !why.empty())
        GTEST_SKIP() << "cuDNN 9 cannot be loaded here: " << why;
    for (int64_t Hkv : {4, 1}) {
        const Attention a = AttentionShape{2, 256, 4, Hkv, 64}.attention();
        const cuda::CudnnAttentionOps ops = cuda::describe_cudnn_attention(a);
        EXPECT_EQ(ops.forward, 14) << "Hkv=" << Hkv;
        EXPECT_EQ(ops.backward, Hkv == 4 ? 22 : 24) << "Hkv=" << Hkv;
    }
}

// cuDNN's fused attention (KILN_CUDA_ATTENTION=cudnn) against the reference on the same bf16
// inputs, without rotation (the callers rotate into the bf16 copy it reads): the output, and the
// gradients through the statistics it saved. Its probabilities are rounded to bf16 for the
// products and its gradients stored in bf16, hence the bf16 tolerance. A GPU where cuDNN offers
// no plan fails here, with cuDNN's reason in the log; a shape this cuDNN version is not asked for
// (cudnn_attention_refusal) is said and passed over.
TEST(Cuda, CudnnAttentionMatchesReference) {
    KILN_REQUIRE_CUDA();
    for (const AttentionShape sh :
         {AttentionShape{2, 300, 4, 2, 32}, AttentionShape{1, 130, 4, 1, 128},
          AttentionShape{2, 256, 8, 8, 64}, AttentionShape{1, 384, 8, 2, 64}}) {
        const Attention a = sh.attention();
        const std::string what = "T=" + std::to_string(a.T) + " H=" + std::to_string(a.H) +
                                 " Hkv=" + std::to_string(a.Hkv) + " D=" + std::to_string(a.D);
        const int64_t M = a.B * a.T, HD = a.H * a.D;
        // The reference reads the bf16 values as f32.
        auto qkv = randn(M * a.ldqkv, 1), dout = randn(M * HD, 2);
        std::vector<uint16_t> qkv16(qkv.size()), dout16(dout.size());
        for (size_t i = 0; i < qkv.size(); i++)
            qkv16[i] = f32_to_bf16(qkv[i]), qkv[i] = bf16_to_f32(qkv16[i]);
        for (size_t i = 0; i < dout.size(); i++)
            dout16[i] = f32_to_bf16(dout[i]), dout[i] = bf16_to_f32(dout16[i]);
        std::vector<char> saved(ref().attention_saved_bytes(a));
        std::vector<float> out(M * HD), dqkv(M * a.ldqkv);
        ref().attention_forward(out.data(), saved.data(), qkv.data(), DType::f32, a, {});
        ref().attention_backward(dqkv.data(), DType::f32, dout.data(), out.data(), qkv.data(),
                                 DType::f32, saved.data(), a, {});

        if (const std::string why = cuda::cudnn_attention_refusal(a); !why.empty()) {
            std::cout << what << ": not asked for: " << why << "\n";
            continue;
        }
        const cuda::CudnnAttention* c = cuda::cudnn_attention(a);
        ASSERT_NE(c, nullptr) << what << ": cuDNN offers no plan (its reason is logged above)";
        Dev<uint16_t> d_qkv(qkv16), d_dout(dout16), d_o{size_t(M * HD)},
            d_dqkv{size_t(M * a.ldqkv)};
        Dev<float> d_stats{size_t(a.B * a.H * a.T)};
        cuda::cudnn_attention_forward(*c, d_qkv.ptr, d_o.ptr, d_stats.ptr);
        cuda::cudnn_attention_backward(*c, d_qkv.ptr, d_o.ptr, d_stats.ptr, d_dout.ptr, d_dqkv.ptr);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << what;
        EXPECT_LT(rel_err(widened(d_o.host()), out), 1e-2) << what;
        EXPECT_LT(rel_err(widened(d_dqkv.host()), dqkv), 2e-2) << what;
    }
}

// Forward then inverse rotation gives the input back; the values' heads are left alone.
TEST(Cuda, RopeRoundTrip) {
    KILN_REQUIRE_CUDA();
    const int64_t T = 16, M = 2 * T, H = 4, Hkv = 2, D = 64, ld = (H + 2 * Hkv) * D;
    const auto [cos, sin] = rope_tables(T, D);
    auto x = randn(M * ld, 1);
    Dev<float> d_x(x), d_cos(cos), d_sin(sin);
    cuda::rope(d_x.ptr, ld, M, T, H + Hkv, D, d_cos.ptr, d_sin.ptr, false);
    auto turned = d_x.host();
    EXPECT_GT(rel_err(turned, x), 0.1);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = (H + Hkv) * D; j < ld; j++)
            ASSERT_EQ(turned[m * ld + j], x[m * ld + j]);
    }
    cuda::rope(d_x.ptr, ld, M, T, H + Hkv, D, d_cos.ptr, d_sin.ptr, true);
    EXPECT_LT(rel_err(d_x.host(), x), kTol);
}
// The table's own ops and memory: what the model calls between the products.
TEST(Cuda, TableMemoryAndSmallOps) {
    KILN_REQUIRE_CUDA();
    const Kernels& dev = cuda_kernels(Precision::fp32);
    const Kernels& host = cpu_kernels(Precision::fp32);
    Arena arena("test", *dev.memory);
    const int64_t n = 5000;
    const size_t a_at = arena.add("a", n, DType::f32), b_at = arena.add("b", n, DType::f32);
    const size_t ids_at = arena.add("ids", n, DType::i32), w_at = arena.add("w", n, DType::f32);
    const size_t local_at = arena.add("local", n, DType::i32);
    const size_t total_at = arena.add("total", 2, DType::u32);  // one double
    arena.allocate();
    float *a = arena.get<float>(a_at), *b = arena.get<float>(b_at), *w = arena.get<float>(w_at);
    int32_t *ids = arena.get<int32_t>(ids_at), *d_local = arena.get<int32_t>(local_at);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 256, 0u);
    const auto x = randn(n, 1), y = randn(n, 2);
    dev.copy(a, x.data(), n * 4);
    dev.copy(b, y.data(), n * 4);
    // Over two ranges with a gap, as the gradient norm skips the norms on TP ranks past the first.
    const std::vector<Range> ranges = {{0, int64_t(n) / 3}, {int64_t(n) / 2, int64_t(n)}};
    EXPECT_NEAR(dev.sum_squares(a, ranges), host.sum_squares(x.data(), ranges),
                1e-12 * host.sum_squares(x.data(), ranges));
    // Summed into what is there: twice over, as two micro-batches' losses.
    double* total = arena.get<double>(total_at);
    double got_total = 0, want_total = 0;
    for (int i = 0; i < 2; i++) {
        dev.sum_into(total, a, n);
        host.sum_into(&want_total, x.data(), n);
    }
    dev.copy(&got_total, total, sizeof(double));
    EXPECT_NEAR(got_total, want_total, 1e-12 * std::fabs(want_total));
    dev.add(a, a, b, n);
    std::vector<float> got(n), want(n);
    dev.copy(got.data(), a, n * 4);
    host.add(want.data(), x.data(), y.data(), n);
    EXPECT_EQ(got, want);
    std::vector<int32_t> h_ids(n), local(n), local_want(n);
    for (int64_t i = 0; i < n; i++)
        h_ids[i] = int32_t(i * 7 % 900) - 50;
    dev.copy(ids, h_ids.data(), n * 4);
    dev.slice_ids(d_local, w, ids, n, 300, 200, 0.5f);
    dev.copy(local.data(), d_local, n * 4);
    host.slice_ids(local_want.data(), want.data(), h_ids.data(), n, 300, 200, 0.5f);
    EXPECT_EQ(local, local_want);
    dev.copy(got.data(), w, n * 4);
    EXPECT_EQ(got, want);
    dev.zero(a, n * 4);
    dev.copy(got.data(), a, n * 4);
    EXPECT_EQ(got, std::vector<float>(n, 0.0f));
}

// The profiled table runs the same ops (the same bits) and, at each wait, writes each op's
// calls and device time to its file, the products by shape.
TEST(Cuda, ProfiledTableReportsEachOpsDeviceTime) {
    KILN_REQUIRE_CUDA();
    kiln::testing::TempDir dir;
    const std::string path = dir.path + "/profile.txt";
    const Kernels& dev = cuda::profiled_kernels(Precision::fp32, path);
    const int64_t n = 4096, M = 64, N = 32, K = 64;
    const auto x = randn(n, 1), y = randn(n, 2);
    Dev<float> a(x), b(y), c{size_t(n)};
    dev.add(c.ptr, a.ptr, b.ptr, n);
    dev.add(c.ptr, c.ptr, b.ptr, n);
    Dev<char> ws{cuda::gemm_workspace_bytes(M * K)};
    Gemm g;
    g.M = M, g.N = N, g.K = K, g.lda = K, g.ldb = N, g.ldc = N;
    g.a = a.ptr, g.b = b.ptr, g.c = c.ptr;
    dev.gemm(g, {ws.ptr, ws.n});
    dev.wait();
    std::vector<float> want(M * N);
    g.a = x.data(), g.b = y.data(), g.c = want.data();
    cpu_kernels(Precision::fp32).gemm(g, {});
    std::vector<float> got = c.host();
    got.resize(want.size());
    EXPECT_LT(rel_err(got, want), 1e-5);
    const std::string report = fs::read_file(path);
    EXPECT_NE(report.find("device time per op"), std::string::npos) << report;
    const size_t product = report.find("gemm 64x32x64 NN");
    ASSERT_NE(product, std::string::npos) << report;
    // A row's last columns: the rate it ran at in TFLOP/s (the product's), and in GB/s (the
    // memory-bound op's), "-" where the op has none.
    auto columns = [&](size_t at) {
        std::istringstream row(report.substr(at, report.find('\n', at) - at));
        std::vector<std::string> words;
        for (std::string w; row >> w;)
            words.push_back(w);
        return words;
    };
    const std::vector<std::string> gemm_row = columns(product);
    ASSERT_GE(gemm_row.size(), 8u) << report;
    EXPECT_GT(std::stod(gemm_row.end()[-2]), 0.0) << report;
    EXPECT_EQ(gemm_row.back(), "-") << report;
    const size_t add = report.find("\nadd ");
    ASSERT_NE(add, std::string::npos) << report;
    const std::vector<std::string> add_row = columns(add + 1);
    ASSERT_EQ(add_row.size(), 7u) << report;
    EXPECT_EQ(add_row[1], "2") << report;  // its calls
    EXPECT_EQ(add_row[5], "-") << report;
    EXPECT_GT(std::stod(add_row[6]), 0.0) << report;  // 12 bytes an element, twice
}

// The whole model on the CUDA table against the CPU table: losses, every gradient, the update.
TEST(Cuda, ModelStepMatchesCpu) {
    KILN_REQUIRE_CUDA();
    model::LlamaConfig c;
    c.dim = 64, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = 300;
    c.multiple_of = 16;
    const int64_t B = 2, T = 16;
    std::vector<int32_t> tokens(B * T), targets(B * T);
    for (int64_t i = 0; i < B * T; i++)
        tokens[i] = int32_t(i * 37 % c.vocab_size);
    for (int64_t i = 0; i < B * T; i++)
        targets[i] = (i % T) + 1 < T ? tokens[i + 1] : -1;
    auto step = [&](const Kernels& k, std::vector<float>& grads, std::vector<float>& params) {
        model::Llama m(c, k, B, T, model::Recompute::selective);
        optim::AdamW adamw(m.layout(), {}, 0, m.layout().total(), k);
        m.init_weights(3, 0.1);
        m.forward_backward(tokens.data(), targets.data(), 0.01f, model::Grads::overwrite);
        const double loss = m.take_loss().sum;
        const int64_t n = m.layout().total();
        grads.resize(n), params.resize(n);
        k.copy(grads.data(), m.grads(), n * 4);
        adamw.update(m.params(), m.params_bf16(), m.grads(), 1.0f, 1e-3);
        k.copy(params.data(), m.params(), n * 4);
        return loss;
    };
    std::vector<float> g_dev, p_dev, g_cpu, p_cpu;
    const double l_dev = step(cuda_kernels(Precision::fp32), g_dev, p_dev);
    const double l_cpu = step(cpu_kernels(Precision::fp32), g_cpu, p_cpu);
    EXPECT_NEAR(l_dev, l_cpu, 1e-5 * l_cpu);
    EXPECT_LT(rel_err(g_dev, g_cpu), 1e-4);
    // AdamW's first step moves each weight by about lr whatever its gradient's size, so a
    // gradient near zero whose sign differs moves 2 lr apart; a wrong update moves them all.
    EXPECT_LT(rel_err(p_dev, p_cpu), 1e-3);
    // bf16: the device's table (fused attention at D = 16, its ops' inputs in bf16) against the
    // reference's exact products over the same bf16 inputs: apart by bf16's roundings only (a
    // few 1e-3 in the host replays); a wrong dtype, offset or rotation moves them by O(1).
    Kernels ref16 = reference_kernels(Precision::bf16);
    ref16.op_inputs = DType::bf16;
    std::vector<float> g16, p16, g_ref, p_ref;
    const double l16 = step(cuda_kernels(Precision::bf16), g16, p16);
    const double l_ref = step(ref16, g_ref, p_ref);
    EXPECT_NEAR(l16, l_ref, 1e-2 * l_ref) << "bf16";
    EXPECT_LT(rel_err(g16, g_ref), 1e-1) << "bf16";
}

// A micro-batch replayed from its CUDA graph is the same work as the ops called one by one: the
// same losses, gradients and weights, bit for bit (the kernels are deterministic), in both
// precisions; and the loss summed on the device is the CPU table's within rounding.
TEST(Cuda, MicroBatchesReplayFromCudaGraphs) {
    KILN_REQUIRE_CUDA();
    // A recording that cannot be made (a wait inside it) is an Error, and leaves the stream
    // usable for what follows.
    const Kernels& fp32 = cuda_kernels(Precision::fp32);
    EXPECT_NE(kiln::testing::message_of([&] { fp32.release(fp32.record(fp32.wait)); }), "");
    for (Precision p : {Precision::fp32, Precision::bf16}) {
        const Kernels& k = cuda_kernels(p);
        for (model::Recompute r : {model::Recompute::none, model::Recompute::full}) {
            const auto called = kiln::testing::replayed_steps(k, r, false);
            const auto replayed = kiln::testing::replayed_steps(k, r, true);
            EXPECT_EQ(replayed.recorded, 2) << "the overwriting and the accumulating micro-batch";
            EXPECT_EQ(replayed.losses, called.losses) << k.name;
            EXPECT_EQ(replayed.grads, called.grads) << k.name;
            EXPECT_EQ(replayed.params, called.params) << k.name;
        }
    }
    const auto cpu =
        kiln::testing::replayed_steps(cpu_kernels(Precision::fp32), model::Recompute::none, false);
    const auto dev =
        kiln::testing::replayed_steps(cuda_kernels(Precision::fp32), model::Recompute::none, true);
    for (size_t s = 0; s < cpu.losses.size(); s++)
        EXPECT_NEAR(dev.losses[s], cpu.losses[s], 1e-5 * cpu.losses[s]) << "step " << s;
}
#else
TEST(Cuda, Ops) {
    GTEST_SKIP() << "built without CUDA (-DKILN_CUDA=OFF, or no nvcc found)";
}
#endif

}  // namespace
}  // namespace kiln::kernels
