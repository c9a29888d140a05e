// The optimizer step against PyTorch (clip_grad_norm_ + AdamW with two decay groups) on the
// reference fixture, and the schedule's shape.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/safetensors.h"
#include "fixture.h"
#include "kernels/cpu/cpu.h"
#include "model/llama.h"
#include "optim/adamw.h"
#include "optim/schedule.h"

namespace kiln::optim {
namespace {

TEST(Schedule, WarmupThenCosineToMin) {
    Schedule s{1e-3, 1e-4, 10, 110, "cosine"};
    EXPECT_DOUBLE_EQ(s.at(0), 1e-4);
    EXPECT_DOUBLE_EQ(s.at(9), 1e-3);
    EXPECT_DOUBLE_EQ(s.at(10), 1e-3);
    EXPECT_NEAR(s.at(59), 1e-4 + 0.5 * 9e-4 * (1 + std::cos(M_PI * 49 / 99.0)), 1e-12);
    EXPECT_DOUBLE_EQ(s.at(109), 1e-4);
    s.decay = "linear";
    EXPECT_NEAR(s.at(59), 1e-3 - 9e-4 * 49 / 99.0, 1e-12);
    s.decay = "constant";
    EXPECT_DOUBLE_EQ(s.at(100), 1e-3);
}

TEST(Clip, ScalesOnlyAboveTheLimit) {
    std::vector<float> g = {3, 4};
    const auto& k = kernels::cpu_kernels(kernels::Precision::fp32);
    EXPECT_NEAR(std::sqrt(k.sum_squares(g.data(), {{0, 1}, {1, 2}})), 5.0, 1e-12);
    EXPECT_FLOAT_EQ(clip_factor(5.0, 10.0), 1.0f);
    EXPECT_FLOAT_EQ(clip_factor(5.0, 0.0), 1.0f);
    EXPECT_NEAR(clip_factor(5.0, 1.0), 0.2, 1e-6);
}

TEST(AdamW, StepAndTrajectoryMatchPyTorch) {
    if (!kiln::testing::have_torch())
        GTEST_SKIP() << "python3-torch is not installed";
    kiln::testing::TempDir dir;
    kiln::testing::make_fixture(dir / "f.safetensors", "");
    SafetensorsFile f(dir / "f.safetensors");
    auto meta = [&](const char* k) { return std::stod(*f.metadata(k)); };
    model::LlamaConfig c;
    c.dim = meta("dim"), c.n_layers = meta("n_layers"), c.n_heads = meta("n_heads");
    c.n_kv_heads = meta("n_kv_heads"), c.vocab_size = meta("vocab");
    c.multiple_of = meta("multiple_of");
    const int64_t B = meta("batch"), T = meta("seq"), steps = meta("steps");
    AdamWConfig ac{meta("beta1"), meta("beta2"), meta("eps"), meta("weight_decay"), meta("clip")};
    const double lr = meta("lr");

    const auto& k = kernels::cpu_kernels(kernels::Precision::fp32);
    model::Llama m(c, k, B, T, model::Recompute::none);
    for (const auto& p : m.layout().params()) {
        std::memcpy(m.params() + p.offset, f.data(p.hf_name, DType::f32, p.shape), p.numel * 4);
    }
    m.sync_compute_weights();
    const int32_t* tok = static_cast<const int32_t*>(f.data("tokens", DType::i32, {B, T}));
    std::vector<int32_t> tokens(tok, tok + B * T), targets(B * T);
    for (int64_t i = 0; i < B * T; i++)
        targets[i] = (i % T) + 1 < T ? tokens[i + 1] : -1;
    const float* traj = static_cast<const float*>(f.data("traj_loss", DType::f32, {steps}));

    AdamW opt(m.layout(), ac, 0, m.layout().total(), k);
    const int64_t n = B * (T - 1);
    for (int64_t s = 0; s < steps; s++) {
        m.forward_backward(tokens.data(), targets.data(), 1.0f / n, model::Grads::overwrite);
        const double loss = m.take_loss().sum / n;
        EXPECT_NEAR(loss, traj[s], 2e-4) << "step " << s;
        double norm = std::sqrt(k.sum_squares(m.grads(), {{0, m.layout().total()}}));
        if (s == 0) {
            EXPECT_NEAR(norm, *static_cast<const float*>(f.data("grad_norm", DType::f32, {1})),
                        1e-4);
        }
        opt.update(m.params(), m.params_bf16(), m.grads(), clip_factor(norm, ac.grad_clip), lr);
        if (s == 0) {
            // Adam's first step is ~lr * sign(g): where |g| is near eps, float32 vs float64
            // gradients move the update by a fraction of lr, so bound the worst element by a
            // small share of lr and the typical one tightly.
            double worst = 0, total = 0;
            for (const auto& p : m.layout().params()) {
                const float* want =
                    static_cast<const float*>(f.data("step1." + p.hf_name, DType::f32, p.shape));
                for (int64_t i = 0; i < p.numel; i++) {
                    double d = std::fabs(m.params()[p.offset + i] - want[i]);
                    worst = std::max(worst, d);
                    total += d;
                }
            }
            EXPECT_LT(worst, 0.02 * lr);
            EXPECT_LT(total / m.layout().total(), 1e-4 * lr);
        }
    }
    // After all the steps, where the moments' betas and eps have shaped the updates: each
    // tensor's distance from PyTorch's, against the distance the steps moved it.
    for (const auto& p : m.layout().params()) {
        const float* want =
            static_cast<const float*>(f.data("final." + p.hf_name, DType::f32, p.shape));
        const float* init = static_cast<const float*>(f.data(p.hf_name, DType::f32, p.shape));
        double diff = 0, moved = 0;
        for (int64_t i = 0; i < p.numel; i++) {
            diff += std::pow(m.params()[p.offset + i] - want[i], 2);
            moved += std::pow(want[i] - init[i], 2);
        }
        // Seen: at most 1e-5 (float32 against PyTorch's float64).
        EXPECT_LT(std::sqrt(diff / moved), 1e-3) << p.name;
    }
}

}  // namespace
}  // namespace kiln::optim
