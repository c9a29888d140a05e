// The whole Llama-2 forward and backward. block_forward and block_backward are the math of one
// transformer block; the backward mirrors the forward line by line, in reverse.
//
//   x  -> rmsnorm -> [q|k|v] = xn1 Wqkv^T -> rope(q, k) -> att = causal_attention(q, k, v)
//      -> x2 = x + att Wo^T -> rmsnorm -> [g|u] = xn2 W13^T -> h = silu(g) * u
//      -> out = x2 + h W2^T
#include "model/llama.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <random>

#include "core/error.h"

namespace kiln::model {

using kernels::Gemm;

Recompute parse_recompute(const std::string& name) {
    if (name == "none")
        return Recompute::none;
    if (name == "selective")
        return Recompute::selective;
    if (name == "full")
        return Recompute::full;
    throw error("train.recompute={} is not one of none, selective, full", name);
}

Llama::Llama(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B, int64_t T,
             Recompute recompute, int64_t capacity)
    : config_(config),
      layout_(config),
      k_(kernels),
      B_(B),
      T_(T),
      M_(B * T),
      recompute_(recompute),
      bf16_(kernels.precision == kernels::Precision::bf16) {
    config_.validate();
    KILN_CHECK(B > 0 && T > 0, "micro-batch {}x{}", B, T);
    const int64_t C = config.dim, L = config.n_layers, H = config.n_heads, D = config.head_dim();
    const int64_t F = config.ffn_dim(), V = config.vocab_size, QKV = config.qkv_dim();
    // LM head in row chunks of ~4M logits, so the full (M, V) logits never exist at once.
    head_rows_ = std::clamp<int64_t>((int64_t(1) << 22) / V, 1, M_);
    attn_ = {B, T, H, config.n_kv_heads, D, QKV};

    capacity = std::max(capacity, layout_.total());
    params_.add("params", capacity, DType::f32);
    params_.allocate();
    grads_.add("grads", capacity, DType::f32);
    grads_.allocate();
    if (bf16_) {
        params_bf16_.add("params", capacity, DType::bf16);
        params_bf16_.allocate();
    }

    // Activations: declare every region, allocate once, then resolve pointers.
    const int64_t M = M_;
    const int64_t sets = recompute == Recompute::full ? 1 : L;
    const int64_t prob_sets = recompute == Recompute::none ? L : 1;
    size_t o_res = acts_.add("residual", (L + 1) * M * C, DType::f32);
    const int64_t bf = bf16_ ? 1 : 0;  // bf16 copies of product inputs exist in bf16 only
    std::vector<std::array<size_t, 14>> o_block(sets);
    for (auto& o : o_block) {
        o = {acts_.add("rstd1", M, DType::f32),
             acts_.add("xn1", M * C, DType::f32),
             acts_.add("qkv", M * QKV, DType::f32),
             0,
             acts_.add("att", M * H * D, DType::f32),
             acts_.add("x2", M * C, DType::f32),
             acts_.add("rstd2", M, DType::f32),
             acts_.add("xn2", M * C, DType::f32),
             acts_.add("gu", M * 2 * F, DType::f32),
             acts_.add("h", M * F, DType::f32),
             acts_.add("xn1_bf", bf * M * C, DType::bf16),
             acts_.add("att_bf", bf * M * H * D, DType::bf16),
             acts_.add("xn2_bf", bf * M * C, DType::bf16),
             acts_.add("h_bf", bf * M * F, DType::bf16)};
    }
    std::vector<size_t> o_probs(prob_sets);
    for (auto& o : o_probs)
        o = acts_.add("probs", B * H * T * T, DType::f32);
    size_t o_cos = acts_.add("rope_cos", T * D / 2, DType::f32);
    size_t o_sin = acts_.add("rope_sin", T * D / 2, DType::f32);
    size_t o_rstdf = acts_.add("rstdf", M, DType::f32);
    size_t o_xnf = acts_.add("xnf", M * C, DType::f32);
    size_t o_dres = acts_.add("dres", M * C, DType::f32);
    size_t o_dxn = acts_.add("dxn", M * C, DType::f32);
    size_t o_dqkv = acts_.add("dqkv", M * QKV, DType::f32);
    size_t o_datt = acts_.add("datt", M * H * D, DType::f32);
    size_t o_dgu = acts_.add("dgu", M * 2 * F, DType::f32);
    size_t o_dh = acts_.add("dh", M * F, DType::f32);
    size_t o_logits = acts_.add("logits", head_rows_ * V, DType::f32);
    size_t o_losses = acts_.add("losses", M, DType::f32);
    size_t o_xnf_bf = acts_.add("xnf_bf", bf * M * C, DType::bf16);
    size_t o_dy_bf = acts_.add("dy_bf", bf * M * std::max({C, QKV, 2 * F, H * D}), DType::bf16);
    size_t o_dlogits_bf = acts_.add("dlogits_bf", bf * head_rows_ * V, DType::bf16);
    int64_t max_operand = std::max({M * std::max({C, QKV, 2 * F}), head_rows_ * V});
    ws_.bytes = k_.workspace_bytes(max_operand, attn_);
    size_t o_ws = acts_.add("workspace", int64_t(ws_.bytes), DType::u16);  // counted in bytes/2
    acts_.allocate();

    res_ = acts_.get<float>(o_res);
    for (int64_t l = 0; l < L; l++) {
        const auto& o = o_block[recompute == Recompute::full ? 0 : l];
        BlockActs b;
        float** fields[] = {&b.rstd1, &b.xn1,   &b.qkv, &b.probs, &b.att,
                            &b.x2,    &b.rstd2, &b.xn2, &b.gu,    &b.h};
        for (int i = 0; i < 10; i++)
            *fields[i] = i == 3 ? nullptr : acts_.get<float>(o[i]);
        b.probs = acts_.get<float>(o_probs[recompute == Recompute::none ? l : 0]);
        uint16_t** copies[] = {&b.xn1_bf, &b.att_bf, &b.xn2_bf, &b.h_bf};
        for (int i = 0; i < 4; i++)
            *copies[i] = bf16_ ? acts_.get<uint16_t>(o[10 + i]) : nullptr;
        blocks_.push_back(b);
    }
    rope_cos_ = acts_.get<float>(o_cos);
    rope_sin_ = acts_.get<float>(o_sin);
    rstdf_ = acts_.get<float>(o_rstdf);
    xnf_ = acts_.get<float>(o_xnf);
    dres_ = acts_.get<float>(o_dres);
    dxn_ = acts_.get<float>(o_dxn);
    dqkv_ = acts_.get<float>(o_dqkv);
    datt_ = acts_.get<float>(o_datt);
    dgu_ = acts_.get<float>(o_dgu);
    dh_ = acts_.get<float>(o_dh);
    logits_ = acts_.get<float>(o_logits);
    losses_ = acts_.get<float>(o_losses);
    ws_.ptr = acts_.get<void>(o_ws);
    xnf_bf_ = bf16_ ? acts_.get<uint16_t>(o_xnf_bf) : nullptr;
    dy_bf_ = bf16_ ? acts_.get<uint16_t>(o_dy_bf) : nullptr;
    dlogits_bf_ = bf16_ ? acts_.get<uint16_t>(o_dlogits_bf) : nullptr;

    // Rotary tables, HF convention: angle(t, i) = t * theta^(-2i/D), i < D/2.
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < D / 2; i++) {
            double angle = t * std::pow(config.rope_theta, -2.0 * i / D);
            rope_cos_[t * D / 2 + i] = static_cast<float>(std::cos(angle));
            rope_sin_[t * D / 2 + i] = static_cast<float>(std::sin(angle));
        }
    }
}

void Llama::init_weights(uint64_t seed, double std) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, static_cast<float>(std));
    float* p = params();
    for (const auto& info : layout_.params()) {
        float* w = p + info.offset;
        if (info.shape.size() == 1) {
            std::fill(w, w + info.numel, 1.0f);
        } else {
            for (int64_t i = 0; i < info.numel; i++)
                w[i] = normal(rng);
        }
    }
    sync_compute_weights();
}

void Llama::sync_compute_weights() {
    if (bf16_)
        k_.to_bf16(params_bf16(), params(), layout_.total());
}

void Llama::zero_grads() {
    std::fill(grads(), grads() + layout_.total(), 0.0f);
}

Llama::Operand Llama::weight(int64_t offset) const {
    if (bf16_)
        return {params_bf16_.get<uint16_t>(0) + offset, DType::bf16};
    return {params_.get<float>(0) + offset, DType::f32};
}

Llama::Operand Llama::operand(const float* x, uint16_t* copy, int64_t n) const {
    if (!bf16_)
        return {x, DType::f32};
    k_.to_bf16(copy, x, n);
    return {copy, DType::bf16};
}

Llama::Operand Llama::saved(const float* x, const uint16_t* copy) const {
    return bf16_ ? Operand{copy, DType::bf16} : Operand{x, DType::f32};
}

// y (M, N) = x (M, K) · W^T (+ y when accumulating), W (N, K)
void Llama::linear_forward(float* y, Operand x, Operand w, int64_t M, int64_t K, int64_t N,
                           bool accumulate) {
    Gemm g;
    g.M = M, g.N = N, g.K = K;
    g.a = x.ptr, g.a_type = x.type, g.lda = K;
    g.b = w.ptr, g.b_type = w.type, g.ldb = K, g.trans_b = true;
    g.c = y, g.ldc = N, g.accumulate = accumulate;
    k_.gemm(g, ws_);
}

// dx (M, K) = dy (M, N) · W ; dw (N, K) += dy^T · x
void Llama::linear_backward(float* dx, float* dw, Operand dy, Operand x, Operand w, int64_t M,
                            int64_t K, int64_t N) {
    Gemm g;
    g.M = M, g.N = K, g.K = N;
    g.a = dy.ptr, g.a_type = dy.type, g.lda = N;
    g.b = w.ptr, g.b_type = w.type, g.ldb = K;
    g.c = dx, g.ldc = K;
    k_.gemm(g, ws_);
    Gemm gw;
    gw.M = N, gw.N = K, gw.K = M;
    gw.a = dy.ptr, gw.a_type = dy.type, gw.lda = N, gw.trans_a = true;
    gw.b = x.ptr, gw.b_type = x.type, gw.ldb = K;
    gw.c = dw, gw.ldc = K, gw.accumulate = true;
    k_.gemm(gw, ws_);
}

void Llama::block_forward(int64_t l, const float* x, float* out) {
    const BlockParams& p = layout_.blocks[l];
    const BlockActs& a = blocks_[l];
    const float* w = params();
    const int64_t M = M_, T = T_, C = config_.dim, H = config_.n_heads, D = config_.head_dim();
    const int64_t F = config_.ffn_dim(), QKV = config_.qkv_dim();
    const float eps = static_cast<float>(config_.norm_eps);

    // attention
    k_.rmsnorm_forward(a.xn1, a.rstd1, x, w + p.attention_norm, M, C, eps);
    linear_forward(a.qkv, operand(a.xn1, a.xn1_bf, M * C), weight(p.wqkv), M, C, QKV);
    k_.rope_forward(a.qkv, QKV, M, T, H + config_.n_kv_heads, D, rope_cos_, rope_sin_);
    k_.attention_forward(a.att, a.probs, a.qkv, attn_, ws_);
    std::memcpy(a.x2, x, M * C * sizeof(float));  // residual: the product accumulates onto it
    linear_forward(a.x2, operand(a.att, a.att_bf, M * H * D), weight(p.wo), M, H * D, C, true);
    // feed-forward
    k_.rmsnorm_forward(a.xn2, a.rstd2, a.x2, w + p.ffn_norm, M, C, eps);
    linear_forward(a.gu, operand(a.xn2, a.xn2_bf, M * C), weight(p.w13), M, C, 2 * F);
    k_.swiglu_forward(a.h, a.gu, M, F);
    std::memcpy(out, a.x2, M * C * sizeof(float));
    linear_forward(out, operand(a.h, a.h_bf, M * F), weight(p.w2), M, F, C, true);
}

// dres (M, C): on entry the gradient w.r.t. the block's output, on exit w.r.t. its input.
void Llama::block_backward(int64_t l, float* dres) {
    const BlockParams& p = layout_.blocks[l];
    const BlockActs& a = blocks_[l];
    const float* x = res_ + l * M_ * config_.dim;
    if (recompute_ == Recompute::full) {
        block_forward(l, x, res_ + (l + 1) * M_ * config_.dim);  // same values as before
    } else if (recompute_ == Recompute::selective) {
        k_.attention_forward(a.att, a.probs, a.qkv, attn_, ws_);  // refills the shared probs
    }
    const float* w = params();
    float* g = grads();
    const int64_t M = M_, T = T_, C = config_.dim, H = config_.n_heads, D = config_.head_dim();
    const int64_t F = config_.ffn_dim(), QKV = config_.qkv_dim();

    // feed-forward: out = x2 + h W2^T, h = swiglu(xn2 W13^T), xn2 = rmsnorm(x2)
    linear_backward(dh_, g + p.w2, operand(dres, dy_bf_, M * C), saved(a.h, a.h_bf), weight(p.w2),
                    M, F, C);
    k_.swiglu_backward(dgu_, dh_, a.gu, M, F);
    linear_backward(dxn_, g + p.w13, operand(dgu_, dy_bf_, M * 2 * F), saved(a.xn2, a.xn2_bf),
                    weight(p.w13), M, C, 2 * F);
    k_.rmsnorm_backward(dres, g + p.ffn_norm, dxn_, a.x2, w + p.ffn_norm, a.rstd2, M, C);
    // attention: x2 = x + att Wo^T, att = attention(rope(xn1 Wqkv^T)), xn1 = rmsnorm(x)
    linear_backward(datt_, g + p.wo, operand(dres, dy_bf_, M * C), saved(a.att, a.att_bf),
                    weight(p.wo), M, H * D, C);
    k_.attention_backward(dqkv_, datt_, a.qkv, a.probs, attn_, ws_);
    k_.rope_backward(dqkv_, QKV, M, T, H + config_.n_kv_heads, D, rope_cos_, rope_sin_);
    linear_backward(dxn_, g + p.wqkv, operand(dqkv_, dy_bf_, M * QKV), saved(a.xn1, a.xn1_bf),
                    weight(p.wqkv), M, C, QKV);
    k_.rmsnorm_backward(dres, g + p.attention_norm, dxn_, x, w + p.attention_norm, a.rstd1, M, C);
}

void Llama::embed(const int32_t* tokens) {
    for (int64_t m = 0; m < M_; m++) {
        KILN_CHECK(tokens[m] >= 0 && tokens[m] < config_.vocab_size, "token {} out of range",
                   tokens[m]);
    }
    k_.embedding_forward(res_, tokens, params() + layout_.embedding, M_, config_.dim);
    for (int64_t l = 0; l < config_.n_layers; l++) {
        block_forward(l, res_ + l * M_ * config_.dim, res_ + (l + 1) * M_ * config_.dim);
    }
    k_.rmsnorm_forward(xnf_, rstdf_, res_ + config_.n_layers * M_ * config_.dim,
                       params() + layout_.final_norm, M_, config_.dim,
                       static_cast<float>(config_.norm_eps));
    operand(xnf_, xnf_bf_, M_ * config_.dim);  // the head's products read this copy
}

// LM head and cross-entropy in row chunks; with grad_scale != 0 also the head's backward into
// dxn_ (d xnf) and the output weight's gradient.
LossSum Llama::head(const int32_t* targets, float grad_scale, float* logits_out) {
    const int64_t C = config_.dim, V = config_.vocab_size;
    LossSum loss;
    for (int64_t r0 = 0; r0 < M_; r0 += head_rows_) {
        int64_t rows = std::min(head_rows_, M_ - r0);
        float* logits = logits_out ? logits_out + r0 * V : logits_;
        Operand xnf = saved(xnf_ + r0 * C, bf16_ ? xnf_bf_ + r0 * C : nullptr);
        linear_forward(logits, xnf, weight(layout_.output), rows, C, V);
        if (logits_out)
            continue;
        // The gradient goes straight to the dtype the backward products read (f32 in place).
        Operand dlogits = bf16_ ? Operand{dlogits_bf_, DType::bf16} : Operand{logits, DType::f32};
        k_.cross_entropy(logits, losses_ + r0, targets + r0, rows, V, grad_scale,
                         const_cast<void*>(dlogits.ptr), dlogits.type);
        if (grad_scale != 0) {
            linear_backward(dxn_ + r0 * C, grads() + layout_.output, dlogits, xnf,
                            weight(layout_.output), rows, C, V);
        }
    }
    if (logits_out)
        return loss;
    for (int64_t m = 0; m < M_; m++) {
        if (targets[m] >= 0) {
            loss.sum += losses_[m];
            loss.tokens++;
        }
    }
    return loss;
}

LossSum Llama::forward_backward(const int32_t* tokens, const int32_t* targets, float grad_scale) {
    embed(tokens);
    LossSum loss = head(targets, grad_scale, nullptr);
    if (grad_scale == 0)
        return loss;
    const int64_t C = config_.dim, L = config_.n_layers;
    std::fill(dres_, dres_ + M_ * C, 0.0f);
    k_.rmsnorm_backward(dres_, grads() + layout_.final_norm, dxn_, res_ + L * M_ * C,
                        params() + layout_.final_norm, rstdf_, M_, C);
    for (int64_t l = L - 1; l >= 0; l--)
        block_backward(l, dres_);
    k_.embedding_backward(grads() + layout_.embedding, dres_, tokens, M_, C);
    return loss;
}

void Llama::forward_logits(const int32_t* tokens, float* logits) {
    embed(tokens);
    head(nullptr, 0, logits);
}

}  // namespace kiln::model
