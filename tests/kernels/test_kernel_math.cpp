// The CUDA kernels' arithmetic (kernels/cuda/kernel_math.h), run on the CPU over the index space
// a launch would visit (grid-stride loops of a small grid, so indices wrap; one block per row,
// partials combined by block_reduce_host) and compared with the double-precision reference.
// No GPU needed: a bug in the shared arithmetic fails here on every CI run.
//
// Errors are measured over the whole tensor as rel = ||got - ref|| / ||ref|| (L2), so a few
// tiny elements cannot pass a wrong tensor. Each element here takes a handful of fp32
// operations (each within half a unit of roundoff, u = 6e-8; expf within 2 units on a GPU) after
// row sums of at most ~5000 terms added as strided partials and a tree, whose rounding grows
// like sqrt(log) of the count, not the count. Seen: 2e-8 to 7e-8 everywhere (dw exact), so the
// bound of 1e-6 (about 16 u) leaves an order of magnitude, while a wrong term, sign or index
// moves rel to 1e-3 or more. Where the arithmetic copies or adds in the reference's own order
// the test asks for equal bits.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/backends.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cuda/attention_flash.h"
#include "kernels/cuda/attention_products.h"
#include "kernels/cuda/gemm_layout.h"
#include "kernels/cuda/kernel_math.h"
#include "kernels/reference/reference.h"
#include "kernels/tensors.h"

namespace kiln::kernels::cuda {
namespace {

using kiln::testing::expect_bf16_within_one_ulp;
using kiln::testing::randn;
using kiln::testing::rel_err;

constexpr int kBlocks = 3, kThreads = 64;  // a small grid: stride 192, so loops go round

// Calls body(i) for every index of a grid-stride loop over n, as each (block, thread) of a
// kBlocks x kThreads grid visits them.
template <typename Body>
void grid_stride(int64_t n, Body&& body) {
    for (int b = 0; b < kBlocks; b++) {
        for (int t = 0; t < kThreads; t++) {
            for (int64_t i = int64_t(b) * kThreads + t; i < n; i += int64_t(kBlocks) * kThreads)
                body(i);
        }
    }
}

// One block per row: fold(t) gives thread t's partial; the block's combine of them, as the
// device orders it.
template <typename T, typename Fold, typename Combine>
T row_reduce(Fold&& fold, T identity, Combine combine) {
    T partials[kRowThreads];
    for (int t = 0; t < kRowThreads; t++)
        partials[t] = fold(t);
    return block_reduce_host(partials, kRowThreads, identity, combine);
}

const Kernels& ref() {
    return reference_kernels(Precision::fp32);
}

TEST(KernelMath, Bf16RoundsAsCore) {
    std::mt19937 rng(1);
    std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                  0x7f800001u, 0xffffffffu, 0x3f808000u, 0x3f818000u, 0x7f7fffffu};
    for (int i = 0; i < 100000; i++)
        bits.push_back(rng());
    for (uint32_t u : bits) {
        float f;
        std::memcpy(&f, &u, 4);
        ASSERT_EQ(bf16_round(f), f32_to_bf16(f)) << std::hex << u;
        ASSERT_EQ(float_bits(bf16_widen(uint16_t(u))), float_bits(bf16_to_f32(uint16_t(u))));
    }
}

// The order the device reduces in: a fixed tree, so a sum of exactly representable values is
// exact, and combining two MaxSum partials either way round gives the same bits (the butterfly
// relies on that for all lanes to agree).
TEST(KernelMath, BlockReductionOrder) {
    std::vector<float> ints(kRowThreads);
    double want = 0;
    for (int t = 0; t < kRowThreads; t++)
        want += (ints[t] = float(t * 3 - 200));
    EXPECT_EQ(block_reduce_host(ints.data(), kRowThreads, 0.0f, Sum{}), float(want));
    auto x = randn(2000, 2, 4.0f);
    for (size_t i = 0; i + 3 < x.size(); i += 4) {
        MaxSum a = maxsum_push(maxsum_push(maxsum_identity(), x[i]), x[i + 1]);
        MaxSum b = maxsum_push(maxsum_identity(), x[i + 2]);
        MaxSum ab = MaxSumCombine{}(a, b), ba = MaxSumCombine{}(b, a);
        ASSERT_EQ(float_bits(ab.max), float_bits(ba.max));
        ASSERT_EQ(float_bits(ab.sum), float_bits(ba.sum));
        ASSERT_EQ(float_bits(MaxSumCombine{}(a, maxsum_identity()).sum), float_bits(a.sum));
    }
}

// The forward copies rows (exact); the backward adds in row order per column, as the reference
// does in float, so both are bit-identical to the reference.
TEST(KernelMath, Embedding) {
    const int64_t M = 50, C = 37, V = 11;
    std::vector<int32_t> tokens(M);
    for (int64_t m = 0; m < M; m++)
        tokens[m] = m % 7 == 3 ? -1 : int32_t((m * 5) % V);  // repeats, and other ranks' rows
    auto wte = randn(V * C, 1);
    std::vector<uint16_t> wte_bf(wte.size());
    for (size_t i = 0; i < wte.size(); i++)
        wte_bf[i] = f32_to_bf16(wte[i]);
    std::vector<float> got(M * C, 9.0f), want(M * C);
    grid_stride(M * C, [&](int64_t i) {
        embedding_forward_at(got.data(), tokens.data(), wte.data(), C, i);
    });
    ref().embedding_forward(want.data(), tokens.data(), wte.data(), DType::f32, M, C);
    EXPECT_EQ(got, want);
    grid_stride(M * C, [&](int64_t i) {
        embedding_forward_at(got.data(), tokens.data(), wte_bf.data(), C, i);
    });
    ref().embedding_forward(want.data(), tokens.data(), wte_bf.data(), DType::bf16, M, C);
    EXPECT_EQ(got, want);

    auto dout = randn(M * C, 2);
    std::vector<float> dwte_ref = randn(V * C, 3);  // accumulates (+=)
    const std::vector<float> dwte0 = dwte_ref;
    ref().embedding_backward(dwte_ref.data(), dout.data(), tokens.data(), M, C);
    // One group (a thread a column), groups that share tokens' rows out unevenly, and the
    // kernel's: the same bits each way.
    for (int groups : {1, 3, kEmbeddingGroups}) {
        std::vector<float> dwte = dwte0;
        grid_stride(C * groups, [&](int64_t i) {
            embedding_backward_column(dwte.data(), dout.data(), tokens.data(), M, C, i % C,
                                      int(i / C), groups);
        });
        EXPECT_EQ(dwte, dwte_ref) << groups << " groups";
    }
}

// C = 1000 (not a multiple of the block) and C = 40 (most threads idle); x of spread 2.5, so
// that rstd (~0.4) is far from 1 and every power of it shows. M = 9 gives the backward a row a
// block; M = 1100, 3 rows a block and a last block of 2.
TEST(KernelMath, RmsNormForwardAndBackward) {
    for (auto [C, M] : {std::pair<int64_t, int64_t>{1000, 9}, {40, 9}, {1000, 1100}}) {
        const float eps = 1e-5f;
        auto x = randn(M * C, 1, 2.5f), w = randn(C, 2), dout = randn(M * C, 3);
        for (auto& v : w)
            v += 1.0f;
        std::vector<float> out(M * C), rstd(M), out_ref(M * C), rstd_ref(M);
        std::vector<uint16_t> out_bf(M * C), out_bf_ref(M * C);
        for (int64_t m = 0; m < M; m++) {
            const float* xr = x.data() + m * C;
            const float ss = row_reduce([&](int t) { return rmsnorm_sumsq(xr, C, t, kRowThreads); },
                                        0.0f, Sum{});
            rstd[m] = rmsnorm_rstd(ss, C, eps);
            for (int t = 0; t < kRowThreads; t++) {
                rmsnorm_scale(out.data() + m * C, xr, w.data(), rstd[m], C, t, kRowThreads);
                rmsnorm_scale(out_bf.data() + m * C, xr, w.data(), rstd[m], C, t, kRowThreads);
            }
        }
        ref().rmsnorm_forward(out_ref.data(), DType::f32, rstd_ref.data(), x.data(), w.data(), M, C,
                              eps);
        EXPECT_LT(rel_err(rstd, rstd_ref), 1e-6) << "rstd, C=" << C;
        EXPECT_LT(rel_err(out, out_ref), 1e-6) << "out, C=" << C;
        ref().rmsnorm_forward(out_bf_ref.data(), DType::bf16, rstd_ref.data(), x.data(), w.data(),
                              M, C, eps);
        expect_bf16_within_one_ulp(out_bf, out_bf_ref, "rmsnorm bf16 out");

        // Backward from the reference's rstd; dx and dw accumulate onto a random start. The
        // kernel's grid: a block per chunk of rows, each row's dx and the chunk's column sums,
        // then the chunks' sums per column.
        const std::vector<float> dx0 = randn(M * C, 4), dw0 = randn(C, 5);
        std::vector<float> dx = dx0, dw = dw0, dx_ref = dx0, dw_ref = dw0;
        std::vector<uint16_t> dx_bf(M * C, 0x7fc0), dx_bf_ref(M * C);
        const int64_t rows = rmsnorm_dw_rows(M), chunks = (M + rows - 1) / rows;
        std::vector<float> chunk_sums(chunks * C, 0.0f);
        for (int64_t m = 0; m < M; m++) {
            const float* dr = dout.data() + m * C;
            const float* xr = x.data() + m * C;
            const float d =
                row_reduce([&](int t) { return rmsnorm_dot(dr, w.data(), xr, C, t, kRowThreads); },
                           0.0f, Sum{});
            for (int t = 0; t < kRowThreads; t++) {
                rmsnorm_dx(dx.data() + m * C, dx_bf.data() + m * C, dr, w.data(), xr, rstd_ref[m],
                           d, C, t, kRowThreads);
                rmsnorm_dw_add(chunk_sums.data() + (m / rows) * C, dr, xr, rstd_ref[m], C, t,
                               kRowThreads);
            }
        }
        grid_stride(
            C, [&](int64_t c) { rmsnorm_dw_column(dw.data(), chunk_sums.data(), chunks, C, c); });
        ref().rmsnorm_backward(dx_ref.data(), dx_bf_ref.data(), dw_ref.data(), dout.data(),
                               x.data(), w.data(), rstd_ref.data(), M, C);
        for (size_t i = 0; i < dx.size(); i++)
            ASSERT_EQ(dx_bf[i], bf16_round(dx[i])) << "dx's bf16 rounding, element " << i;
        // Compared as increments, so the random start does not hide them.
        for (size_t i = 0; i < dx.size(); i++)
            dx[i] -= dx0[i], dx_ref[i] -= dx0[i];
        for (size_t i = 0; i < dw.size(); i++)
            dw[i] -= dw0[i], dw_ref[i] -= dw0[i];
        EXPECT_LT(rel_err(dx, dx_ref), 1e-6) << "dx, C=" << C << " M=" << M;
        EXPECT_LT(rel_err(dw, dw_ref), 1e-6) << "dw, C=" << C << " M=" << M;
    }
}

TEST(KernelMath, SwiGluForwardAndBackward) {
    const int64_t M = 13, F = 71;
    auto gu = randn(M * 2 * F, 1, 2.0f), dh = randn(M * F, 2);
    std::vector<float> h(M * F), h_ref(M * F), dgu(M * 2 * F), dgu_ref(M * 2 * F);
    grid_stride(M * F, [&](int64_t i) { swiglu_forward_at(h.data(), gu.data(), F, i); });
    ref().swiglu_forward(h_ref.data(), DType::f32, gu.data(), DType::f32, M, F);
    EXPECT_LT(rel_err(h, h_ref), 1e-6);
    grid_stride(M * F,
                [&](int64_t i) { swiglu_backward_at(dgu.data(), dh.data(), gu.data(), F, i); });
    ref().swiglu_backward(dgu_ref.data(), DType::f32, dh.data(), gu.data(), DType::f32, M, F);
    EXPECT_LT(rel_err(dgu, dgu_ref), 1e-6);

    std::vector<uint16_t> hb(M * F), hb_ref(M * F), dgub(M * 2 * F), dgub_ref(M * 2 * F);
    grid_stride(M * F, [&](int64_t i) { swiglu_forward_at(hb.data(), gu.data(), F, i); });
    ref().swiglu_forward(hb_ref.data(), DType::bf16, gu.data(), DType::f32, M, F);
    expect_bf16_within_one_ulp(hb, hb_ref, "swiglu bf16 h");
    grid_stride(M * F,
                [&](int64_t i) { swiglu_backward_at(dgub.data(), dh.data(), gu.data(), F, i); });
    ref().swiglu_backward(dgub_ref.data(), DType::bf16, dh.data(), gu.data(), DType::f32, M, F);
    expect_bf16_within_one_ulp(dgub, dgub_ref, "swiglu bf16 dgu");

    // Inputs in bf16 (the gate/up and dh products' outputs on a device): read widened.
    std::vector<uint16_t> gu16(gu.size()), dh16(dh.size());
    for (size_t i = 0; i < gu.size(); i++)
        gu16[i] = bf16_round(gu[i]);
    for (size_t i = 0; i < dh.size(); i++)
        dh16[i] = bf16_round(dh[i]);
    grid_stride(M * F, [&](int64_t i) { swiglu_forward_at(h.data(), gu16.data(), F, i); });
    ref().swiglu_forward(h_ref.data(), DType::f32, gu16.data(), DType::bf16, M, F);
    EXPECT_LT(rel_err(h, h_ref), 1e-6);
    grid_stride(M * F,
                [&](int64_t i) { swiglu_backward_at(dgu.data(), dh16.data(), gu16.data(), F, i); });
    ref().swiglu_backward(dgu_ref.data(), DType::f32, dh16.data(), gu16.data(), DType::bf16, M, F);
    EXPECT_LT(rel_err(dgu, dgu_ref), 1e-6);
    ref().swiglu_forward(h.data(), DType::f32, gu.data(), DType::f32, M, F);
    EXPECT_GT(rel_err(h, h_ref), 1e-4) << "the bf16 inputs were read as bf16";
}

// Rotary tables of Hugging Face's convention: angle(t, i) = t * 10000^(-2i/D), i < D/2.
void rope_tables(int64_t T, int64_t D, std::vector<float>& cos, std::vector<float>& sin) {
    cos.resize(T * D / 2), sin.resize(T * D / 2);
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < D / 2; i++) {
            const double angle = t * std::pow(10000.0, -2.0 * i / D);
            cos[t * D / 2 + i] = float(std::cos(angle));
            sin[t * D / 2 + i] = float(std::sin(angle));
        }
    }
}

// The reference applies RoPE inside attention. rope_at forward on queries and keys, then the
// reference's attention without tables, must give the reference's attention with tables; and
// the backward without tables on the rotated qkv, rotated back by rope_at with sign -1, must
// give the reference's gradient w.r.t. the unrotated qkv.
TEST(KernelMath, RopeAsTheReferenceAttentionRotates) {
    const int64_t B = 2, T = 9, H = 4, Hkv = 2, D = 16;
    std::vector<float> cos, sin;
    rope_tables(T, D, cos, sin);
    Attention plain{B, T, H, Hkv, D, (H + 2 * Hkv) * D};
    Attention roped = plain;
    roped.rope_cos = cos.data(), roped.rope_sin = sin.data();
    const int64_t M = B * T, pairs = M * (H + Hkv) * (D / 2);
    auto qkv = randn(M * plain.ldqkv, 1), dout = randn(M * H * D, 2);

    auto turned = qkv;
    grid_stride(pairs, [&](int64_t i) {
        rope_at(turned.data(), plain.ldqkv, T, H + Hkv, D, cos.data(), sin.data(), 1.0f, i);
    });
    std::vector<float> out(M * H * D), out_ref(M * H * D), probs(B * H * T * T);
    ref().attention_forward(out.data(), probs.data(), turned.data(), DType::f32, plain, {});
    ref().attention_forward(out_ref.data(), probs.data(), qkv.data(), DType::f32, roped, {});
    EXPECT_LT(rel_err(out, out_ref), 1e-6);

    std::vector<float> dqkv(qkv.size()), dqkv_ref(qkv.size());
    ref().attention_forward(out.data(), probs.data(), turned.data(), DType::f32, plain, {});
    ref().attention_backward(dqkv.data(), DType::f32, dout.data(), out.data(), turned.data(),
                             DType::f32, probs.data(), plain, {});
    grid_stride(pairs, [&](int64_t i) {
        rope_at(dqkv.data(), plain.ldqkv, T, H + Hkv, D, cos.data(), sin.data(), -1.0f, i);
    });
    ref().attention_forward(out_ref.data(), probs.data(), qkv.data(), DType::f32, roped, {});
    ref().attention_backward(dqkv_ref.data(), DType::f32, dout.data(), out_ref.data(), qkv.data(),
                             DType::f32, probs.data(), roped, {});
    EXPECT_LT(rel_err(dqkv, dqkv_ref), 1e-6);
}

// The rotation on the way into the products' copy, and back on the way out of the gradient, in
// one pass: the same values as rope_at in place, rounded by store(), bit for bit.
TEST(KernelMath, RotationIntoACopyIsRopeThenTheStore) {
    const int64_t T = 9, H = 4, Hkv = 2, D = 16, ld = (H + 2 * Hkv) * D, M = 2 * T;
    std::vector<float> cos, sin;
    rope_tables(T, D, cos, sin);
    const auto x = randn(M * ld, 3);
    for (float sign : {1.0f, -1.0f}) {
        auto turned = x;
        grid_stride(M * (H + Hkv) * (D / 2), [&](int64_t i) {
            rope_at(turned.data(), ld, T, H + Hkv, D, cos.data(), sin.data(), sign, i);
        });
        std::vector<float> f32(x.size());
        std::vector<uint16_t> bf16(x.size()), bf16_want(x.size());
        for (int64_t m = 0; m < M; m++) {  // the kernel's rows, its threads' columns in any order
            const int64_t t = (m % T) * (D / 2);
            for (int col = int(ld) - 1; col >= 0; col--) {
                rotated_at(f32.data() + m * ld, x.data() + m * ld, col, H + Hkv, D, cos.data() + t,
                           sin.data() + t, sign);
                rotated_at(bf16.data() + m * ld, x.data() + m * ld, col, H + Hkv, D, cos.data() + t,
                           sin.data() + t, sign);
                store(bf16_want.data() + m * ld + col, turned[m * ld + col]);
            }
        }
        EXPECT_EQ(f32, turned) << "sign " << sign;
        EXPECT_EQ(bf16, bf16_want) << "sign " << sign;
    }
    // Without rope tables (no heads to rotate) it is the conversion alone.
    std::vector<uint16_t> plain(x.size()), plain_want(x.size());
    for (int64_t i = 0; i < M * ld; i++) {
        rotated_at(plain.data() + i / ld * ld, x.data() + i / ld * ld, int(i % ld), 0, D, nullptr,
                   nullptr, 1.0f);
        store(plain_want.data() + i, x[i]);
    }
    EXPECT_EQ(plain, plain_want);
}

// The backward functions are the gradients of the forward functions, seen through the shared
// functions alone: central differences of loss = sum(forward * dout) with step h, evaluated in
// double from the fp32 forward, at 60 random entries plus `extra` (those carrying the gradient's
// mass), as normalized squared error. The truncation error is of order h^2 of each derivative
// and the rounding of the fp32 forward ~1e-7 |loss| / h; with the steps below NMSE was at most
// 2e-8, so 1e-5 leaves room for other seeds and compilers, while a wrong term moves it above
// 1e-3.
double fd_nmse(std::vector<float>& x, const std::vector<float>& analytic,
               const std::function<double()>& loss, float h, std::vector<size_t> extra = {}) {
    std::mt19937_64 rng(7);
    for (int k = 0; k < 60; k++)
        extra.push_back(rng() % x.size());
    double err = 0, norm = 0;
    for (size_t i : extra) {
        const float saved = x[i];
        x[i] = saved + h;
        const double up = loss();
        x[i] = saved - h;
        const double down = loss();
        x[i] = saved;
        const double fd = (up - down) / (double(saved + h) - double(saved - h));
        err += (analytic[i] - fd) * (analytic[i] - fd);
        norm += fd * fd;
    }
    return err / norm;
}

double weighted(const std::vector<float>& a, const std::vector<float>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++)
        s += double(a[i]) * b[i];
    return s;
}

TEST(KernelMath, BackwardIsTheGradientOfForward) {
    {  // RMSNorm, dx
        const int64_t M = 3, C = 300;
        auto x = randn(M * C, 1, 2.5f), w = randn(C, 2), dout = randn(M * C, 3);
        auto forward = [&] {
            std::vector<float> out(M * C);
            for (int64_t m = 0; m < M; m++) {
                const float* xr = x.data() + m * C;
                const float r = rmsnorm_rstd(
                    row_reduce([&](int t) { return rmsnorm_sumsq(xr, C, t, kRowThreads); }, 0.0f,
                               Sum{}),
                    C, 1e-5f);
                for (int t = 0; t < kRowThreads; t++)
                    rmsnorm_scale(out.data() + m * C, xr, w.data(), r, C, t, kRowThreads);
            }
            return weighted(out, dout);
        };
        std::vector<float> dx(M * C);
        for (int64_t m = 0; m < M; m++) {
            const float* xr = x.data() + m * C;
            const float* dr = dout.data() + m * C;
            const float r =
                rmsnorm_rstd(row_reduce([&](int t) { return rmsnorm_sumsq(xr, C, t, kRowThreads); },
                                        0.0f, Sum{}),
                             C, 1e-5f);
            const float d =
                row_reduce([&](int t) { return rmsnorm_dot(dr, w.data(), xr, C, t, kRowThreads); },
                           0.0f, Sum{});
            for (int t = 0; t < kRowThreads; t++)
                rmsnorm_dx(dx.data() + m * C, nullptr, dr, w.data(), xr, r, d, C, t, kRowThreads);
        }
        EXPECT_LT(fd_nmse(x, dx, forward, 1e-2f), 1e-5) << "rmsnorm dx";
    }
    {  // SwiGLU, both halves of dgu
        const int64_t M = 4, F = 50;
        auto gu = randn(M * 2 * F, 4, 2.0f), dh = randn(M * F, 5);
        auto forward = [&] {
            std::vector<float> h(M * F);
            grid_stride(M * F, [&](int64_t i) { swiglu_forward_at(h.data(), gu.data(), F, i); });
            return weighted(h, dh);
        };
        std::vector<float> dgu(M * 2 * F);
        grid_stride(M * F,
                    [&](int64_t i) { swiglu_backward_at(dgu.data(), dh.data(), gu.data(), F, i); });
        EXPECT_LT(fd_nmse(gu, dgu, forward, 1e-2f), 1e-5) << "swiglu dgu";
    }
    {  // cross-entropy: d(sum_m scale_m loss_m) / dlogits
        // A vocabulary of 100, so that softmax entries (~1e-2) stand well above the rounding of
        // the fp32 losses over 2h; the targets' entries (~ -scale) are always among the checked.
        const int64_t M = 3, V = 100;
        auto logits = randn(M * V, 6, 2.0f);
        std::vector<int32_t> targets = {5, 99, 0};
        std::vector<float> scale = {0.5f, 1.0f, 0.25f};
        auto stats = [&](int64_t m) {
            const float* row = logits.data() + m * V;
            return row_reduce([&](int t) { return xent_fold(row, V, t, kRowThreads); },
                              maxsum_identity(), MaxSumCombine{});
        };
        auto forward = [&] {
            double total = 0;
            for (int64_t m = 0; m < M; m++)
                total += scale[m] * xent_loss(stats(m), logits[m * V + targets[m]], targets[m]);
            return total;
        };
        std::vector<float> dlogits(M * V);
        for (int64_t m = 0; m < M; m++) {
            const MaxSum s = stats(m);
            for (int t = 0; t < kRowThreads; t++) {
                xent_gradient(dlogits.data() + m * V, logits.data() + m * V, V, targets[m], s.max,
                              s.sum, scale[m], t, kRowThreads);
            }
        }
        EXPECT_LT(fd_nmse(logits, dlogits, forward, 5e-2f, {5, V + 99, 2 * V}), 1e-5)
            << "xent dlogits";
    }
    {  // RoPE is a rotation: its backward (sign -1) is its adjoint, <rope(x), d> = <x, rope^T d>
        const int64_t T = 6, M = 12, n_heads = 3, D = 8, ld = n_heads * D + 5;
        std::vector<float> cos(T * D / 2), sin(T * D / 2);
        for (int64_t t = 0; t < T; t++) {
            for (int64_t i = 0; i < D / 2; i++) {
                cos[t * D / 2 + i] = float(std::cos(t * std::pow(10000.0, -2.0 * i / D)));
                sin[t * D / 2 + i] = float(std::sin(t * std::pow(10000.0, -2.0 * i / D)));
            }
        }
        auto x = randn(M * ld, 7), d = randn(M * ld, 8);
        auto rx = x, rd = d;
        grid_stride(M * n_heads * D / 2, [&](int64_t i) {
            rope_at(rx.data(), ld, T, n_heads, D, cos.data(), sin.data(), 1.0f, i);
            rope_at(rd.data(), ld, T, n_heads, D, cos.data(), sin.data(), -1.0f, i);
        });
        const double lhs = weighted(rx, d), rhs = weighted(x, rd);
        EXPECT_NEAR(lhs, rhs, 1e-5 * std::sqrt(weighted(x, x) * weighted(d, d)));
    }
}

// attention_products.h's executor on the host: the reference backend's products (which round
// f32 operands to bf16 in bf16 precision, as cuBLASLt's inputs are), and the row passes replayed
// block by block as attention.cu's kernels run them. P is the probabilities' dtype.
template <typename P>
struct HostAttention {
    const Attention& a;
    const Kernels& products;

    void gemm(const Gemm& g) { products.gemm(g, {}); }
    void softmax(void* probs, float* scores) {
        for (int64_t r = 0; r < a.B * a.H * a.T; r++) {
            const QueryRow q(a, r);
            float* s = scores + r * a.T;
            const float mx = row_reduce(
                [&](int t) { return attention_row_max(s, q.t, t, kRowThreads); }, -INFINITY, Max{});
            const float sum = row_reduce(
                [&](int t) { return attention_exp(s, q.t, mx, t, kRowThreads); }, 0.0f, Sum{});
            for (int t = 0; t < kRowThreads; t++)
                attention_store_probs(static_cast<P*>(probs) + r * a.T, s, a.T, q.t, sum, t,
                                      kRowThreads);
        }
    }
    void softmax_backward(void* ds, float* dp, const void* probs) {
        for (int64_t r = 0; r < a.B * a.H * a.T; r++) {
            const QueryRow q(a, r);
            const P* p = static_cast<const P*>(probs) + r * a.T;
            const float rowdot = row_reduce(
                [&](int t) { return attention_rowdot(dp + r * a.T, p, q.t, t, kRowThreads); }, 0.0f,
                Sum{});
            for (int t = 0; t < kRowThreads; t++) {
                if (ds == dp) {
                    attention_ds_row(dp + r * a.T, dp + r * a.T, p, a.T, q.t, rowdot,
                                     attention_scale(a), t, kRowThreads);
                } else {
                    attention_ds_row(static_cast<uint16_t*>(ds) + r * a.T, dp + r * a.T, p, a.T,
                                     q.t, rowdot, attention_scale(a), t, kRowThreads);
                }
            }
        }
    }
};

// attention.cu replayed: rotate a copy (rope_at), operands in the precision's dtype, the
// products and row passes of attention_products.h, the gradient rotated back.
template <typename P>
void attention_replay(std::vector<float>& out, std::vector<P>& probs, std::vector<float>& dqkv,
                      const std::vector<float>& qkv, const std::vector<float>& dout,
                      const Attention& a, Precision prec) {
    const int64_t M = a.B * a.T, pairs = M * (a.H + a.Hkv) * (a.D / 2);
    auto x = qkv;
    grid_stride(pairs, [&](int64_t i) {
        rope_at(x.data(), a.ldqkv, a.T, a.H + a.Hkv, a.D, a.rope_cos, a.rope_sin, 1.0f, i);
    });
    const bool bf16 = prec == Precision::bf16;
    const DType ct = compute_dtype(prec);
    auto rounded = [&](const std::vector<float>& f) {
        std::vector<uint16_t> h(f.size());
        grid_stride(int64_t(f.size()), [&](int64_t i) { store(h.data() + i, f[i]); });
        return h;
    };
    const std::vector<uint16_t> x16 = bf16 ? rounded(x) : std::vector<uint16_t>();
    const std::vector<uint16_t> dout16 = bf16 ? rounded(dout) : std::vector<uint16_t>();
    const void* xo = bf16 ? static_cast<const void*>(x16.data()) : x.data();
    const void* dO = bf16 ? static_cast<const void*>(dout16.data()) : dout.data();
    std::vector<float> scores(size_t(a.B * a.H * a.T * a.T));
    std::vector<uint16_t> ds16(bf16 ? scores.size() : 0);
    void* ds = bf16 ? static_cast<void*>(ds16.data()) : scores.data();
    HostAttention<P> host{a, reference_kernels(prec)};
    attention_products_forward(host, out.data(), probs.data(), ct, xo, ct, a, scores.data());
    attention_products_backward(host, dqkv.data(), dO, ct, xo, ct, probs.data(), ct, a,
                                scores.data(), ds, ct);
    grid_stride(pairs, [&](int64_t i) {
        rope_at(dqkv.data(), a.ldqkv, a.T, a.H + a.Hkv, a.D, a.rope_cos, a.rope_sin, -1.0f, i);
    });
}

// Grouped-query attention with RoPE against the reference: a short sequence with several heads,
// and one longer than a block (T = 300 > 256 threads), so the rows' loops wrap. In fp32 every
// output is within the usual 1e-6: this holds the decomposition into products (offsets,
// strides, transpositions, the grouped heads' sums) and the row passes to the reference. In
// bf16 q, k, v, dout and ds enter the products rounded to bf16 (2^-9 relative each), as on the
// tensor cores, while the reference keeps them in f32: probabilities, out and the gradient move
// by a few 1e-3 (seen <= 3.5e-3, 3.8e-3, 4.7e-3) and are held to 1e-2; a wrong offset or dtype
// moves them by O(1).
TEST(KernelMath, AttentionForwardAndBackward) {
    struct Shape {
        int64_t B, T, H, Hkv, D;
    };
    for (const Shape sh : {Shape{2, 9, 4, 2, 16}, Shape{1, 300, 2, 1, 8}}) {
        std::vector<float> cos, sin;
        rope_tables(sh.T, sh.D, cos, sin);
        Attention a{sh.B, sh.T, sh.H, sh.Hkv, sh.D, (sh.H + 2 * sh.Hkv) * sh.D};
        a.rope_cos = cos.data(), a.rope_sin = sin.data();
        const int64_t M = a.B * a.T, n_probs = a.B * a.H * a.T * a.T;
        auto qkv = randn(M * a.ldqkv, 1), dout = randn(M * a.H * a.D, 2);
        for (Precision prec : {Precision::fp32, Precision::bf16}) {
            const Kernels& r = reference_kernels(prec);
            // The reference's output in the compute dtype (bf16's widened to out_ref below).
            std::vector<float> out_ref(M * a.H * a.D), dqkv_ref(M * a.ldqkv);
            std::vector<uint16_t> out_ref16(out_ref.size());
            std::vector<float> out(out_ref.size()), dqkv(dqkv_ref.size(), 9.0f);
            const std::string what =
                std::string(precision_name(prec)) + " T=" + std::to_string(a.T);
            if (prec == Precision::fp32) {
                std::vector<float> probs(n_probs, 9.0f), probs_ref(n_probs);
                r.attention_forward(out_ref.data(), probs_ref.data(), qkv.data(), DType::f32, a,
                                    {});
                r.attention_backward(dqkv_ref.data(), DType::f32, dout.data(), out_ref.data(),
                                     qkv.data(), DType::f32, probs_ref.data(), a, {});
                attention_replay(out, probs, dqkv, qkv, dout, a, prec);
                EXPECT_LT(rel_err(probs, probs_ref), 1e-6) << what;
                EXPECT_LT(rel_err(out, out_ref), 1e-6) << what;
                EXPECT_LT(rel_err(dqkv, dqkv_ref), 1e-6) << what;
            } else {
                std::vector<uint16_t> probs(n_probs, 9), probs_ref(n_probs);
                r.attention_forward(out_ref16.data(), probs_ref.data(), qkv.data(), DType::f32, a,
                                    {});
                r.attention_backward(dqkv_ref.data(), DType::f32, dout.data(), out_ref16.data(),
                                     qkv.data(), DType::f32, probs_ref.data(), a, {});
                for (size_t i = 0; i < out_ref.size(); i++)
                    out_ref[i] = bf16_to_f32(out_ref16[i]);
                attention_replay(out, probs, dqkv, qkv, dout, a, prec);
                std::vector<float> wide(n_probs), wide_ref(n_probs);
                for (int64_t i = 0; i < n_probs; i++)
                    wide[i] = bf16_to_f32(probs[i]), wide_ref[i] = bf16_to_f32(probs_ref[i]);
                EXPECT_LT(rel_err(wide, wide_ref), 1e-2) << what;
                EXPECT_LT(rel_err(out, out_ref), 1e-2) << what;
                EXPECT_LT(rel_err(dqkv, dqkv_ref), 1e-2) << what;
            }
        }
    }
}

// attention_flash.h's executor on the host: each phase's f(i) in order (the device spreads them
// over threads and waits at the barrier, and no phase reads what its own i's write), and the
// tile products as plain loops over the widened bf16 tiles, summed in f32.
struct FlashHost {
    template <typename F>
    void each(int n, F f) {
        for (int i = 0; i < n; i++)
            f(i);
    }
    template <bool ACol, bool BCol>
    void product(float* c, int ldc, const uint16_t* a, int lda, const uint16_t* b, int ldb, int n,
                 int k, bool accumulate) {
        for (int i = 0; i < kTile; i++) {
            for (int j = 0; j < n; j++) {
                float sum = 0.0f;
                for (int kk = 0; kk < k; kk++) {
                    sum += bf16_widen(ACol ? a[kk * lda + i] : a[i * lda + kk]) *
                           bf16_widen(BCol ? b[j * ldb + kk] : b[kk * ldb + j]);
                }
                c[i * ldc + j] = accumulate ? c[i * ldc + j] + sum : sum;
            }
        }
    }
};

std::vector<float> widened(const std::vector<uint16_t>& x) {
    std::vector<float> w(x.size());
    for (size_t i = 0; i < x.size(); i++)
        w[i] = bf16_widen(x[i]);
    return w;
}

// attention.cu's fused path replayed: rotate a copy, round it and dout to bf16, then every block
// of the forward, dq and dkdv grids in turn, each in its own shared memory, each writing its
// gradient rows rotated back. out (bf16) and dqkv start as garbage: every element must be
// written. The backward runs again into a bf16 gradient, which must be the f32 one rounded.
void flash_replay(std::vector<uint16_t>& out, std::vector<float>& dqkv,
                  const std::vector<float>& qkv, const std::vector<float>& dout,
                  const Attention& a) {
    const int64_t M = a.B * a.T, pairs = M * (a.H + a.Hkv) * (a.D / 2), rows = a.B * a.H * a.T;
    const int64_t tiles = (a.T + kTile - 1) / kTile;
    auto x = qkv;
    if (a.rope_cos) {
        grid_stride(pairs, [&](int64_t i) {
            rope_at(x.data(), a.ldqkv, a.T, a.H + a.Hkv, a.D, a.rope_cos, a.rope_sin, 1.0f, i);
        });
    }
    auto rounded = [&](const std::vector<float>& f) {
        std::vector<uint16_t> h(f.size());
        grid_stride(int64_t(f.size()), [&](int64_t i) { store(h.data() + i, f[i]); });
        return h;
    };
    const std::vector<uint16_t> x16 = rounded(x), dout16 = rounded(dout);
    std::vector<float> lse(rows, 7.0f), rowdot(rows, 7.0f);
    FlashHost host;
    auto run = [&](FlashPass pass, int64_t heads, bool last_first, auto body) {
        std::vector<char> shared(FlashTiles().place(nullptr, a.D, pass), 5);
        for (int64_t block = 0; block < a.B * heads * tiles; block++) {
            FlashTiles s;
            s.place(shared.data(), a.D, pass);
            body(s, FlashBlock(a, heads, block, last_first));
        }
    };
    run(FlashPass::forward, a.H, true, [&](const FlashTiles& s, const FlashBlock& at) {
        flash_forward_block(host, s, a, x16.data(), out.data(), lse.data(), at);
    });
    auto backward = [&](auto* grad) {
        run(FlashPass::dq, a.H, true, [&](const FlashTiles& s, const FlashBlock& at) {
            flash_dq_block(host, s, a, x16.data(), dout16.data(), out.data(), lse.data(),
                           rowdot.data(), grad, at);
        });
        run(FlashPass::dkdv, a.Hkv, false, [&](const FlashTiles& s, const FlashBlock& at) {
            flash_dkdv_block(host, s, a, x16.data(), dout16.data(), lse.data(), rowdot.data(), grad,
                             at);
        });
    };
    backward(dqkv.data());
    std::vector<uint16_t> dqkv16(dqkv.size(), 0x7fc0);
    backward(dqkv16.data());
    EXPECT_EQ(dqkv16, rounded(dqkv)) << "the bf16 gradient is the f32 one rounded";
}

// The fused bf16 attention against the reference in f32: grouped-query heads (2 and 4 query
// heads a kv head), sequences shorter than a tile, and longer with a partial last tile (150 = 2 x
// 64 + 22), so the causal walk, the online softmax's rescaling across key tiles, the masks of the
// diagonal and the tail, and the group sums of dk and dv are all crossed; D = 16, 32, 64 (the
// GPU check's 1.1B), 128 (the widest head). q, k, v, dout, p and ds enter the products in bf16, as
// on the tensor cores: the errors are those of the products rung in bf16 (held to 1e-2 there;
// seen 2.4e-3 to 5.0e-3), while a wrong mask, a missing rescale or a dropped head of a group moves
// them by 2e-2 to 1.
TEST(KernelMath, FlashAttentionForwardAndBackward) {
    struct Shape {
        int64_t B, T, H, Hkv, D;
    };
    for (const Shape sh : {Shape{2, 9, 4, 2, 16}, Shape{1, 150, 4, 1, 32}, Shape{1, 140, 4, 2, 64},
                           Shape{1, 70, 2, 2, 128}}) {
        std::vector<float> cos, sin;
        rope_tables(sh.T, sh.D, cos, sin);
        Attention a{sh.B, sh.T, sh.H, sh.Hkv, sh.D, (sh.H + 2 * sh.Hkv) * sh.D};
        a.rope_cos = cos.data(), a.rope_sin = sin.data();
        ASSERT_TRUE(flash_attention(a, Precision::bf16));
        ASSERT_FALSE(flash_attention(a, Precision::fp32));
        const int64_t M = a.B * a.T;
        auto qkv = randn(M * a.ldqkv, 1), dout = randn(M * a.H * a.D, 2);
        std::vector<float> out_ref(M * a.H * a.D), dqkv_ref(M * a.ldqkv);
        std::vector<float> probs(ref().attention_saved_bytes(a) / 4);
        ref().attention_forward(out_ref.data(), probs.data(), qkv.data(), DType::f32, a, {});
        ref().attention_backward(dqkv_ref.data(), DType::f32, dout.data(), out_ref.data(),
                                 qkv.data(), DType::f32, probs.data(), a, {});
        std::vector<uint16_t> out(out_ref.size(), 0x7fc0);
        std::vector<float> dqkv(dqkv_ref.size(), 9.0f);
        flash_replay(out, dqkv, qkv, dout, a);
        const std::string what = "T=" + std::to_string(a.T) + " D=" + std::to_string(a.D);
        EXPECT_LT(rel_err(widened(out), out_ref), 1e-2) << what;
        EXPECT_LT(rel_err(dqkv, dqkv_ref), 1e-2) << what;
        // Each part of the gradient on its own: queries, keys, values.
        for (int part = 0; part < 3; part++) {
            const int64_t begin = part == 0 ? 0 : (a.H + (part - 1) * a.Hkv) * a.D;
            const int64_t width = (part == 0 ? a.H : a.Hkv) * a.D;
            std::vector<float> got, want;
            for (int64_t m = 0; m < M; m++) {
                for (int64_t j = begin; j < begin + width; j++) {
                    got.push_back(dqkv[m * a.ldqkv + j]);
                    want.push_back(dqkv_ref[m * a.ldqkv + j]);
                }
            }
            EXPECT_LT(rel_err(got, want), 1e-2) << what << " part " << part;
        }
    }
}

// The shared memory a block asks for at D = 64 (1.1B's heads): dkdv's, the largest, stays within
// half of an H100's or H200's 228 KB a multiprocessor less the 1 KB each block reserves, so two
// blocks run on each; the forward's and dq's fit two already.
TEST(KernelMath, FlashTilesLeaveRoomForTwoBlocksAnSmAtHead64) {
    const size_t half_sm = 228 * 1024 / 2 - 1024;
    for (FlashPass pass : {FlashPass::forward, FlashPass::dq, FlashPass::dkdv})
        EXPECT_LE(FlashTiles().place(nullptr, 64, pass), half_sm) << int(pass);
    EXPECT_EQ(FlashTiles().place(nullptr, 64, FlashPass::dkdv), 114176u);
}

// Scores far beyond exp's range (q, k of scale 12: s / sqrt(D) spread ~150, exp overflows past
// 88): the online softmax must subtract each row's true running max, across both threads of a
// row and across key tiles, or p overflows to inf and the output to NaN. q, k, v are bf16
// values, so that the f32 reference reads what the products read, no rotation.
TEST(KernelMath, FlashAttentionKeepsHugeScoresFinite) {
    Attention a{1, 150, 2, 1, 32, (2 + 2 * 1) * 32};
    const int64_t M = a.B * a.T;
    auto qkv = randn(M * a.ldqkv, 3, 12.0f), dout = randn(M * a.H * a.D, 4);
    for (float& v : qkv)
        v = bf16_widen(bf16_round(v));
    std::vector<float> out_ref(M * a.H * a.D), dqkv_ref(M * a.ldqkv);
    std::vector<float> probs(ref().attention_saved_bytes(a) / 4);
    ref().attention_forward(out_ref.data(), probs.data(), qkv.data(), DType::f32, a, {});
    ref().attention_backward(dqkv_ref.data(), DType::f32, dout.data(), out_ref.data(), qkv.data(),
                             DType::f32, probs.data(), a, {});
    std::vector<uint16_t> out(out_ref.size(), 0x7fc0);
    std::vector<float> dqkv(dqkv_ref.size(), 9.0f);
    flash_replay(out, dqkv, qkv, dout, a);
    EXPECT_LT(rel_err(widened(out), out_ref), 1e-2);
    // Near one-hot rows: ds = p (dp - rowdot) cancels, and k of scale 12 multiplies its bf16
    // rounding (seen 2.1e-2); an overflow gives NaN, which fails any bound.
    EXPECT_LT(rel_err(dqkv, dqkv_ref), 5e-2);
}

// Rows of 5003 logits (not a multiple of the block), spread 3 so the running max of each
// thread moves; one row ignored (-1), one with logits far from 0 (no overflow of exp).
TEST(KernelMath, CrossEntropyRows) {
    const int64_t M = 6, V = 5003;
    auto logits = randn(M * V, 1, 3.0f);
    for (int64_t v = 0; v < V; v++)
        logits[5 * V + v] += v % 2 ? 80.0f : -80.0f;
    std::vector<int32_t> targets = {3, 5002, -1, 0, 1234, 77};
    std::vector<float> scale = {0.5f, 0.5f, 0.0f, 0.25f, 0.5f, 1.0f};

    std::vector<float> mx(M), se(M), tl(M), loss(M);
    for (int64_t m = 0; m < M; m++) {
        const float* row = logits.data() + m * V;
        const MaxSum s = row_reduce([&](int t) { return xent_fold(row, V, t, kRowThreads); },
                                    maxsum_identity(), MaxSumCombine{});
        mx[m] = s.max, se[m] = s.sum;
        tl[m] = targets[m] >= 0 ? row[targets[m]] : 0.0f;
        loss[m] = xent_loss(s, tl[m], targets[m]);
    }
    std::vector<float> mx_ref(M), se_ref(M), tl_ref(M), loss_ref(M);
    ref().logit_stats(logits.data(), targets.data(), M, V, mx_ref.data(), se_ref.data(),
                      tl_ref.data());
    EXPECT_EQ(mx, mx_ref);  // a max is exact
    EXPECT_EQ(tl, tl_ref);
    EXPECT_LT(rel_err(se, se_ref), 1e-6);
    ref().cross_entropy(logits.data(), targets.data(), scale.data(), M, V, loss_ref.data(), nullptr,
                        DType::f32);
    EXPECT_LT(rel_err(loss, loss_ref), 1e-6);
    EXPECT_EQ(loss[2], 0.0f);

    // The gradient from the reference's statistics; f32, bf16, and f32 in place over the logits
    // (what the fused head does) giving the same bits as out of place.
    std::vector<float> g(M * V), g_ref(M * V);
    std::vector<uint16_t> gb(M * V), gb_ref(M * V);
    auto in_place = logits;
    for (int64_t m = 0; m < M; m++) {
        const float* row = logits.data() + m * V;
        for (int t = 0; t < kRowThreads; t++) {
            xent_gradient(g.data() + m * V, row, V, targets[m], mx_ref[m], se_ref[m], scale[m], t,
                          kRowThreads);
            xent_gradient(gb.data() + m * V, row, V, targets[m], mx_ref[m], se_ref[m], scale[m], t,
                          kRowThreads);
            xent_gradient(in_place.data() + m * V, in_place.data() + m * V, V, targets[m],
                          mx_ref[m], se_ref[m], scale[m], t, kRowThreads);
        }
    }
    ref().cross_entropy_backward(logits.data(), targets.data(), mx_ref.data(), se_ref.data(),
                                 scale.data(), M, V, g_ref.data(), DType::f32);
    EXPECT_LT(rel_err(g, g_ref), 1e-6);
    EXPECT_EQ(in_place, g);
    ref().cross_entropy_backward(logits.data(), targets.data(), mx_ref.data(), se_ref.data(),
                                 scale.data(), M, V, gb_ref.data(), DType::bf16);
    expect_bf16_within_one_ulp(gb, gb_ref, "xent bf16 gradient");
}

// Two steps, the second with decay, a clipping scale and bias correction at t = 2. The weights
// are compared by how far they moved (a step is ~lr, far below the weights themselves).
TEST(KernelMath, AdamW) {
    const int64_t n = 5000;
    auto p = randn(n, 1), m = randn(n, 2, 0.1f), v = randn(n, 3, 0.1f);
    for (auto& e : v)
        e = e * e;
    auto p_ref = p, m_ref = m, v_ref = v, p0 = p;
    std::vector<uint16_t> pb(n), pb_ref(n);
    for (int64_t t = 1; t <= 2; t++) {
        auto g = randn(n, 10 + t);
        AdamWStep s{1e-2f, 0.9f, 0.95f, 1e-8f, t == 2 ? 0.1f : 0.0f, t == 2 ? 0.5f : 1.0f, t};
        const AdamWScalars k = adamw_scalars(s);
        grid_stride(n, [&](int64_t i) {
            adamw_at(p.data(), pb.data(), m.data(), v.data(), g.data(), k, i);
        });
        ref().adamw(p_ref.data(), pb_ref.data(), m_ref.data(), v_ref.data(), g.data(), n, s);
    }
    EXPECT_LT(rel_err(m, m_ref), 1e-6);
    EXPECT_LT(rel_err(v, v_ref), 1e-6);
    std::vector<float> moved(n), moved_ref(n);
    for (int64_t i = 0; i < n; i++)
        moved[i] = p[i] - p0[i], moved_ref[i] = p_ref[i] - p0[i];
    // The difference of two weights near 1 keeps the weights' rounding (6e-8 of ~1, against a
    // move of ~2e-2): up to 3e-6 of the move an element; seen 2.2e-7 over the tensor.
    EXPECT_LT(rel_err(moved, moved_ref), 3e-6);
    for (int64_t i = 0; i < n; i++)
        ASSERT_EQ(pb[i], f32_to_bf16(p[i]));
    expect_bf16_within_one_ulp(pb, pb_ref, "adamw bf16 weights");
}

// gemm.cu's hand-over to cuBLASLt: a column-major product, written here as cuBLASLt defines it
// (op(X)(r, c) = X(c, r) when transposed, X(r, c) = x[r + c ld]), run on the memory of A, B and
// C as column_major() describes it, must compute the reference's row-major product, for every
// transposition with row strides past the dense ones. Exact shapes are checked first, as
// cuBLASLt would refuse a mismatch.
TEST(KernelMath, GemmColumnMajorMapping) {
    const int64_t M = 7, N = 5, K = 11;
    for (int ta = 0; ta < 2; ta++) {
        for (int tb = 0; tb < 2; tb++) {
            for (int acc = 0; acc < 2; acc++) {
                const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 1;
                auto a = randn((ta ? K : M) * lda, 1), b = randn((tb ? N : K) * ldb, 2);
                auto c = randn(M * ldc, 3), want = c;
                Gemm g;
                g.M = M, g.N = N, g.K = K, g.trans_a = ta, g.trans_b = tb, g.alpha = 0.5f;
                g.a = a.data(), g.lda = lda, g.b = b.data(), g.ldb = ldb, g.c = want.data();
                g.ldc = ldc, g.accumulate = acc;
                ref().gemm(g, {});

                const ColumnMajorProduct p = column_major(g, lda, ldb);
                auto op_shape = [](const ColumnMajor& x) {
                    return x.trans ? std::make_pair(x.cols, x.rows)
                                   : std::make_pair(x.rows, x.cols);
                };
                ASSERT_EQ(op_shape(p.first), std::make_pair(p.m, p.k));
                ASSERT_EQ(op_shape(p.second), std::make_pair(p.k, p.n));
                ASSERT_EQ(op_shape(p.out), std::make_pair(p.m, p.n));
                ASSERT_GE(p.first.ld, p.first.rows);
                ASSERT_GE(p.second.ld, p.second.rows);
                ASSERT_GE(p.out.ld, p.out.rows);
                auto at = [](const float* x, const ColumnMajor& l, int64_t r, int64_t col) {
                    return l.trans ? x[col + r * l.ld] : x[r + col * l.ld];
                };
                for (int64_t i = 0; i < p.m; i++) {
                    for (int64_t j = 0; j < p.n; j++) {
                        double d = 0;
                        for (int64_t k = 0; k < p.k; k++)
                            d += double(at(b.data(), p.first, i, k)) * at(a.data(), p.second, k, j);
                        float& out = c[i + j * p.out.ld];
                        out = float(g.alpha * d + (acc ? out : 0.0f));
                    }
                }
                EXPECT_EQ(c, want) << "ta=" << ta << " tb=" << tb << " acc=" << acc;
            }
        }
    }
}

// Product operands converted while packed dense: as the CPU backend packs them, bit for bit.
TEST(KernelMath, PackOperands) {
    const int64_t rows = 37, cols = 29, ld = 40;
    auto x = randn(rows * ld, 1, 10.0f);
    std::vector<uint16_t> got(rows * cols), want(rows * cols);
    grid_stride(rows * cols, [&](int64_t i) { pack_at(got.data(), x.data(), cols, ld, i); });
    cpu::pack_bf16(want.data(), x.data(), rows, cols, ld);
    EXPECT_EQ(got, want);
    std::vector<uint16_t> h(rows * ld);
    for (size_t i = 0; i < h.size(); i++)
        h[i] = f32_to_bf16(x[i]);
    std::vector<float> wide(rows * cols), wide_want(rows * cols);
    grid_stride(rows * cols, [&](int64_t i) { pack_at(wide.data(), h.data(), cols, ld, i); });
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++)
            wide_want[r * cols + c] = bf16_to_f32(h[r * ld + c]);
    }
    EXPECT_EQ(wide, wide_want);
}

TEST(KernelMath, ToBf16) {
    auto x = randn(1000, 1, 100.0f);
    std::vector<uint16_t> got(x.size()), want(x.size());
    grid_stride(int64_t(x.size()), [&](int64_t i) { store(got.data() + i, x[i]); });
    ref().to_bf16(want.data(), x.data(), int64_t(x.size()));
    EXPECT_EQ(got, want);
}

// The ops around the products: the host tables' results bit for bit (they run the same fp32
// operations), and the sum of squares in double to rounding.
TEST(KernelMath, SmallOpsAroundTheProducts) {
    const Kernels& host = cpu_kernels(Precision::fp32);
    const int64_t n = 700, begin = 100, count = 250;
    std::vector<int32_t> ids(n);
    std::mt19937 rng(5);
    for (auto& id : ids)
        id = int32_t(rng() % 500) - 20;  // some negative: ignored targets
    std::vector<int32_t> local(n), local_want(n);
    std::vector<float> weight(n), weight_want(n);
    grid_stride(n, [&](int64_t i) {
        slice_id_at(local.data(), weight.data(), ids.data(), begin, count, 0.25f, i);
    });
    host.slice_ids(local_want.data(), weight_want.data(), ids.data(), n, begin, count, 0.25f);
    EXPECT_EQ(local, local_want);
    EXPECT_EQ(weight, weight_want);

    auto max = randn(n, 2), local_max = randn(n, 3), target_logit = randn(n, 4);
    for (int64_t i = 0; i < n; i++)
        max[i] = std::max(max[i], local_max[i]);
    auto sumexp = randn(n, 5);
    for (auto& x : sumexp)
        x = 1.0f + std::fabs(x);
    auto rescaled = sumexp, rescaled_want = sumexp;
    grid_stride(
        n, [&](int64_t i) { rescale_sumexp_at(rescaled.data(), local_max.data(), max.data(), i); });
    host.rescale_sumexp(rescaled_want.data(), local_max.data(), max.data(), n);
    EXPECT_EQ(rescaled, rescaled_want);

    std::vector<float> losses(n), losses_want(n);
    grid_stride(n, [&](int64_t i) {
        row_loss_at(losses.data(), max.data(), rescaled.data(), target_logit.data(), ids.data(), i);
    });
    host.row_losses(losses_want.data(), max.data(), rescaled.data(), target_logit.data(),
                    ids.data(), n);
    EXPECT_EQ(losses, losses_want);

    const auto x = randn(100000, 6);
    double sum = 0;
    for (int64_t first = 0; first < kBlocks * kThreads; first++)
        sum += sum_squares_share(x.data(), int64_t(x.size()), first, kBlocks * kThreads);
    const double want = host.sum_squares(x.data(), {{0, int64_t(x.size())}});
    EXPECT_NEAR(sum, want, 1e-12 * want);
}

}  // namespace
}  // namespace kiln::kernels::cuda
