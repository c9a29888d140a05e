// The whole model: against the independent PyTorch reference (logits, loss, every gradient), its
// gradients against finite differences, the CPU backend against the double-precision reference
// backend, and the recompute policies against each other.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "core/error.h"
#include "core/safetensors.h"
#include "fixture.h"
#include "kernels/cpu/cpu.h"
#include "kernels/products.h"
#include "kernels/reference/reference.h"
#include "model/llama.h"

namespace kiln::model {
namespace {

using kernels::Precision;

struct Batch {
    std::vector<int32_t> tokens, targets;
};

// HF shift: position t predicts token t+1 of the same row; the last position predicts nothing.
Batch shifted(std::vector<int32_t> tokens, int64_t B, int64_t T) {
    Batch b{tokens, std::vector<int32_t>(B * T)};
    for (int64_t r = 0; r < B; r++) {
        for (int64_t t = 0; t < T; t++) {
            b.targets[r * T + t] = t + 1 < T ? tokens[r * T + t + 1] : -1;
        }
    }
    return b;
}

Batch random_batch(int64_t B, int64_t T, int64_t V, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> tokens(B * T);
    for (auto& t : tokens)
        t = static_cast<int32_t>(rng() % V);
    return shifted(tokens, B, T);
}

LlamaConfig small_config() {
    LlamaConfig c;
    c.dim = 32, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = 50;
    c.multiple_of = 16;
    return c;
}

// ||a - b|| / ||b|| over the whole tensor: every entry counts, the small ones too.
double normalized_error(const float* a, const float* b, int64_t n) {
    double diff = 0, norm = 0;
    for (int64_t i = 0; i < n; i++) {
        diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        norm += double(b[i]) * b[i];
    }
    return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

double max_rel_diff(const float* a, const float* b, int64_t n, double floor) {
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        worst = std::max(worst, std::fabs(a[i] - b[i]) / (floor + std::fabs(b[i])));
    }
    return worst;
}

// One case per precision, so that the fp32 comparison runs on every machine.
class ReferenceFixture : public ::testing::TestWithParam<Precision> {
protected:
    void SetUp() override {
        KILN_REQUIRE_PRODUCTS(GetParam());
        if (!kiln::testing::have_torch())
            GTEST_SKIP() << "python3-torch is not installed";
        kiln::testing::make_fixture(dir_ / "fixture.safetensors", "");
        file_ = std::make_unique<SafetensorsFile>(dir_ / "fixture.safetensors");
        auto meta = [&](const char* k) { return std::stod(*file_->metadata(k)); };
        config_.dim = meta("dim"), config_.n_layers = meta("n_layers");
        config_.n_heads = meta("n_heads"), config_.n_kv_heads = meta("n_kv_heads");
        config_.vocab_size = meta("vocab"), config_.multiple_of = meta("multiple_of");
        config_.norm_eps = meta("norm_eps"), config_.rope_theta = meta("rope_theta");
        B_ = meta("batch"), T_ = meta("seq");
        const auto* tok = static_cast<const int32_t*>(file_->data("tokens", DType::i32, {B_, T_}));
        batch_ = shifted(std::vector<int32_t>(tok, tok + B_ * T_), B_, T_);
    }
    void load(Llama& model, const std::string& prefix = "") {
        for (const auto& p : model.layout().params()) {
            const void* src = file_->data(prefix + p.hf_name, DType::f32, p.shape);
            std::memcpy(model.params() + p.offset, src, p.numel * 4);
        }
        model.sync_compute_weights();
    }
    kiln::testing::TempDir dir_;
    std::unique_ptr<SafetensorsFile> file_;
    LlamaConfig config_;
    int64_t B_ = 0, T_ = 0;
    Batch batch_;
};

INSTANTIATE_TEST_SUITE_P(Precision, ReferenceFixture,
                         ::testing::Values(Precision::fp32, Precision::bf16),
                         kiln::testing::precision_param_name);

TEST_P(ReferenceFixture, LogitsLossAndGradientsMatchPyTorch) {
    const Precision prec = GetParam();
    {
        for (const kernels::Kernels* k :
             {&kernels::cpu_kernels(prec), &kernels::reference_kernels(prec)}) {
            SCOPED_TRACE(k->name);
            const bool bf16 = prec == Precision::bf16;
            Llama model(config_, *k, B_, T_, Recompute::none);
            load(model);
            const int64_t V = config_.vocab_size;
            std::vector<float> logits(B_ * T_ * V);
            model.forward_logits(batch_.tokens.data(), logits.data());
            const float* want =
                static_cast<const float*>(file_->data("logits", DType::f32, {B_, T_, V}));
            EXPECT_LT(max_rel_diff(logits.data(), want, B_ * T_ * V, 0.1), bf16 ? 3e-2 : 1e-4);

            int64_t n = B_ * (T_ - 1);
            model.forward_backward(batch_.tokens.data(), batch_.targets.data(), 1.0f / n,
                                   Grads::overwrite);
            const LossSum loss = model.take_loss();
            EXPECT_EQ(loss.tokens, n);
            float want_loss = *static_cast<const float*>(file_->data("loss", DType::f32, {1}));
            EXPECT_NEAR(loss.sum / n, want_loss, bf16 ? 1e-2 : 1e-5);
            for (const auto& p : model.layout().params()) {
                const float* g = static_cast<const float*>(
                    file_->data("grad." + p.hf_name, DType::f32, p.shape));
                double scale = 0;
                for (int64_t i = 0; i < p.numel; i++)
                    scale = std::max(scale, double(std::fabs(g[i])));
                EXPECT_LT(max_rel_diff(model.grads() + p.offset, g, p.numel, scale),
                          bf16 ? 6e-2 : 1e-4)
                    << p.name;
                // Over the whole tensor, where the check above only bounds the largest entries:
                // measured at most 6e-7 (fp32) and 0.9% (bf16, whose unit roundoff is 0.4%).
                EXPECT_LT(normalized_error(model.grads() + p.offset, g, p.numel),
                          bf16 ? 2e-2 : 1e-5)
                    << p.name;
            }
        }
    }
}

// Whole-model gradients of the reference backend against central finite differences.
TEST(Llama, GradientsMatchFiniteDifferences) {
    LlamaConfig c = small_config();
    const int64_t B = 2, T = 6;
    Llama model(c, kernels::reference_kernels(Precision::fp32), B, T, Recompute::none);
    model.init_weights(3, 0.3);
    Batch batch = random_batch(B, T, c.vocab_size, 4);
    model.forward_backward(batch.tokens.data(), batch.targets.data(), 1.0f, Grads::overwrite);
    model.take_loss();  // the differences below sum their own
    std::vector<float> grads(model.grads(), model.grads() + model.layout().total());
    std::mt19937_64 rng(5);
    for (const auto& p : model.layout().params()) {
        // The entries to check: the tensor's 4 largest gradients, and 6 drawn at random among
        // those that can have one (for the embedding, the rows of tokens in the batch; the rest
        // are zero by construction and prove nothing).
        std::vector<int64_t> picks(size_t(p.numel));
        std::iota(picks.begin(), picks.end(), p.offset);
        std::partial_sort(picks.begin(), picks.begin() + 4, picks.end(), [&](int64_t a, int64_t b) {
            return std::fabs(grads[size_t(a)]) > std::fabs(grads[size_t(b)]);
        });
        std::vector<int64_t> live;
        for (int64_t i = p.offset; i < p.offset + p.numel; i++) {
            const int64_t row = (i - p.offset) / c.dim;
            if (p.name != "tok_embeddings" ||
                std::count(batch.tokens.begin(), batch.tokens.end(), int32_t(row)) > 0)
                live.push_back(i);
        }
        picks.resize(4);
        for (int k = 0; k < 6; k++)
            picks.push_back(live[rng() % live.size()]);
        double err = 0, norm = 0;
        for (int64_t i : picks) {
            float saved = model.params()[i];
            const float h = 1e-2f;
            model.params()[i] = saved + h;
            model.forward_backward(batch.tokens.data(), batch.targets.data(), 0);
            const double up = model.take_loss().sum;
            model.params()[i] = saved - h;
            model.forward_backward(batch.tokens.data(), batch.targets.data(), 0);
            const double down = model.take_loss().sum;
            model.params()[i] = saved;
            double fd = (up - down) / (2 * h);
            EXPECT_NEAR(grads[i], fd, 2e-3 + 3e-2 * std::fabs(fd)) << p.name << " element " << i;
            err += std::fabs(grads[i] - fd);
            norm += std::fabs(fd);
        }
        EXPECT_LT(err, 3e-2 * norm) << p.name
                                    << ": the sampled gradients against their finite "
                                       "differences, relative to their size";
    }
}

void run_step(Llama& model, const Batch& batch, std::vector<float>& grads, double& loss) {
    model.forward_backward(batch.tokens.data(), batch.targets.data(), 0.01f, Grads::overwrite);
    loss = model.take_loss().sum;
    grads.assign(model.grads(), model.grads() + model.layout().total());
}

// One step of a fresh model on table k, from the weights of seed 9: its gradients and loss.
void step_from_seed_9(const kernels::Kernels& k, const LlamaConfig& c, const Batch& batch,
                      int64_t B, int64_t T, std::vector<float>& grads, double& loss) {
    Llama model(c, k, B, T, Recompute::none);
    model.init_weights(9, 0.1);
    run_step(model, batch, grads, loss);
}

TEST(Llama, CpuMatchesReferenceBackend) {
    LlamaConfig c = small_config();
    c.vocab_size = 300;
    const int64_t B = 3, T = 16;
    Batch batch = random_batch(B, T, c.vocab_size, 6);
    std::vector<float> g_cpu, g_ref;
    double l_cpu, l_ref;
    step_from_seed_9(kernels::cpu_kernels(Precision::fp32), c, batch, B, T, g_cpu, l_cpu);
    step_from_seed_9(kernels::reference_kernels(Precision::fp32), c, batch, B, T, g_ref, l_ref);
    EXPECT_NEAR(l_cpu, l_ref, 1e-4 * std::fabs(l_ref));
    EXPECT_LT(max_rel_diff(g_cpu.data(), g_ref.data(), g_cpu.size(), 1e-3), 2e-3);
}

// A table whose ops' inputs are bf16 (CUDA's bf16 table: the qkv, attention-gradient, gate/up
// and dh products write bf16) trains the same model as one that keeps them in f32, to bf16's
// rounding: the reference backend in bf16 both ways, its products exact, so only that rounding
// differs (seen: gradients 5.2e-3 apart over the whole vector, losses 1.7e-4 relative).
TEST(Llama, Bf16OpInputsFollowTheF32Ones) {
    LlamaConfig c = small_config();
    const int64_t B = 2, T = 8;
    Batch batch = random_batch(B, T, c.vocab_size, 6);
    // The reference table, its ops' inputs bf16, noting the dtype each such op is handed.
    static std::set<DType> handed;
    kernels::Kernels narrow = kernels::reference_kernels(Precision::bf16);
    narrow.op_inputs = DType::bf16;
    narrow.attention_forward = [](void* out, void* saved, const void* qkv, DType in,
                                  const kernels::Attention& a, kernels::Workspace ws) {
        handed.insert(in);
        kernels::reference_kernels(Precision::bf16).attention_forward(out, saved, qkv, in, a, ws);
    };
    narrow.attention_backward = [](void* dqkv, DType dqkv_type, const void* dout, const void* out,
                                   const void* qkv, DType in, const void* saved,
                                   const kernels::Attention& a, kernels::Workspace ws) {
        handed.insert(in);
        kernels::reference_kernels(Precision::bf16)
            .attention_backward(dqkv, dqkv_type, dout, out, qkv, in, saved, a, ws);
    };
    narrow.swiglu_forward = [](void* h, DType h_type, const void* gu, DType in, int64_t M,
                               int64_t F) {
        handed.insert(in);
        kernels::reference_kernels(Precision::bf16).swiglu_forward(h, h_type, gu, in, M, F);
    };
    narrow.swiglu_backward = [](void* dgu, DType dgu_type, const void* dh, const void* gu, DType in,
                                int64_t M, int64_t F) {
        handed.insert(in);
        kernels::reference_kernels(Precision::bf16)
            .swiglu_backward(dgu, dgu_type, dh, gu, in, M, F);
    };
    std::vector<float> g_wide, g_thin;
    double l_wide, l_thin;
    step_from_seed_9(kernels::reference_kernels(Precision::bf16), c, batch, B, T, g_wide, l_wide);
    step_from_seed_9(narrow, c, batch, B, T, g_thin, l_thin);
    EXPECT_NEAR(l_thin, l_wide, 1e-3 * std::fabs(l_wide));
    const double err = normalized_error(g_thin.data(), g_wide.data(), int64_t(g_wide.size()));
    EXPECT_LT(err, 1e-2);
    EXPECT_GT(err, 1e-5) << "the products wrote bf16";
    EXPECT_EQ(handed, std::set<DType>{DType::bf16}) << "every such op was handed bf16";
}

// A step's first micro-batch overwrites every gradient, whatever the buffer held; the next ones
// add to it.
class LlamaIn : public ::testing::TestWithParam<Precision> {};
INSTANTIATE_TEST_SUITE_P(Precision, LlamaIn, ::testing::Values(Precision::fp32, Precision::bf16),
                         kiln::testing::precision_param_name);

TEST_P(LlamaIn, OverwriteStartsTheGradientsAfresh) {
    const Precision prec = GetParam();
    KILN_REQUIRE_PRODUCTS(prec);
    LlamaConfig c = small_config();
    const int64_t B = 2, T = 8;
    Batch batch = random_batch(B, T, c.vocab_size, 3);
    {
        Llama model(c, kernels::cpu_kernels(prec), B, T, Recompute::none);
        model.init_weights(4, 0.1);
        const int64_t n = model.layout().total();
        std::fill(model.grads(), model.grads() + n, 123.0f);  // a previous step's leftovers
        std::vector<float> once, twice, again;
        double loss;
        run_step(model, batch, once, loss);
        model.forward_backward(batch.tokens.data(), batch.targets.data(), 0.01f);
        twice.assign(model.grads(), model.grads() + n);
        run_step(model, batch, again, loss);
        EXPECT_EQ(again, once);
        for (auto& g : once)
            g *= 2;
        EXPECT_LT(max_rel_diff(twice.data(), once.data(), n, 1e-3), 1e-5);
    }
}

// Recomputation changes memory, never results: every policy gives bit-identical gradients.
TEST_P(LlamaIn, RecomputePoliciesAreBitIdentical) {
    const Precision prec = GetParam();
    KILN_REQUIRE_PRODUCTS(prec);
    LlamaConfig c = small_config();
    const int64_t B = 2, T = 8;
    Batch batch = random_batch(B, T, c.vocab_size, 8);
    {
        std::vector<float> base;
        double base_loss = 0;
        for (Recompute r : {Recompute::none, Recompute::selective, Recompute::full}) {
            Llama model(c, kernels::cpu_kernels(prec), B, T, r);
            model.init_weights(1, 0.1);
            std::vector<float> g;
            double loss;
            run_step(model, batch, g, loss);
            if (r == Recompute::none) {
                base = g, base_loss = loss;
            } else {
                EXPECT_EQ(loss, base_loss);
                EXPECT_EQ(g, base);
            }
        }
    }
}

TEST(Llama, PresetsHaveMetaShapes) {
    EXPECT_EQ(preset("llama2-7b").ffn_dim(), 11008);
    EXPECT_EQ(preset("llama2-13b").ffn_dim(), 13824);
    EXPECT_EQ(preset("llama2-70b").ffn_dim(), 28672);
    EXPECT_NEAR(preset("llama2-7b").n_params() / 1e9, 6.74, 0.01);
    EXPECT_NEAR(preset("llama2-13b").n_params() / 1e9, 13.02, 0.01);
    EXPECT_NEAR(preset("llama2-70b").n_params() / 1e9, 68.98, 0.01);
    EXPECT_NEAR(preset("tiny").n_params() / 1e6, 24.4, 0.1);
    EXPECT_NEAR(preset("small").n_params() / 1e6, 58.1, 0.1);
    EXPECT_THROW(preset("gpt2"), Error);
}

TEST(Llama, ContradictoryShapesAreRejected) {
    LlamaConfig c = small_config();
    c.n_heads = 5;
    EXPECT_THROW(c.validate(), Error);
    c = small_config();
    c.n_kv_heads = 3;
    EXPECT_THROW(c.validate(), Error);
}

}  // namespace
}  // namespace kiln::model
