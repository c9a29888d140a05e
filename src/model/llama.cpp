// The whole Llama-2 forward and backward. block_forward and block_backward are the math of one
// transformer block; the backward mirrors the forward line by line, in reverse.
//
//   x  -> rmsnorm -> [q|k|v] = xn1 Wqkv^T -> att = causal_attention(rope(q), rope(k), v)
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
             Recompute recompute, int64_t capacity, Collective* tp)
    : Llama(config, kernels, B, T, recompute, tp, tp ? tp->size() : 1, tp ? tp->rank() : 0) {
    build(capacity, true);
}

ModelBytes Llama::bytes(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B,
                        int64_t T, Recompute recompute, int64_t capacity, int tp_size) {
    Llama plan(config, kernels, B, T, recompute, nullptr, tp_size, 0);
    plan.build(capacity, false);
    return {int64_t(plan.params_.bytes()), int64_t(plan.grads_.bytes()),
            int64_t(plan.params_bf16_.bytes()), int64_t(plan.acts_.bytes())};
}

Llama::Llama(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B, int64_t T,
             Recompute recompute, Collective* tp, int tp_size, int tp_rank)
    : config_(config),
      tp_(tp),
      tp_size_(tp_size),
      tp_rank_(tp_rank),
      layout_(config, tp_size_, tp_rank_),
      k_(kernels),
      B_(B),
      T_(T),
      M_(B * T),
      recompute_(recompute),
      bf16_(kernels.precision == kernels::Precision::bf16) {}

// Declares every buffer; with `allocate`, allocates them and resolves the pointers into them.
void Llama::build(int64_t capacity, bool allocate) {
    const LlamaConfig& config = config_;
    const int64_t B = B_, T = T_;
    const Recompute recompute = recompute_;
    config_.validate(tp_size_);
    KILN_CHECK(B > 0 && T > 0, "micro-batch {}x{}", B, T);
    C_ = config.dim, D_ = config.head_dim();
    H_ = config.n_heads / tp_size_, Hkv_ = config.n_kv_heads / tp_size_;
    F_ = config.ffn_dim() / tp_size_, V_ = config.vocab_size / tp_size_;
    QKV_ = (H_ + 2 * Hkv_) * D_;
    const int64_t C = C_, L = config.n_layers, H = H_, D = D_, F = F_, V = V_, QKV = QKV_;
    // LM head in equal row chunks of at most ~32M logits, so the full (M, V) logits never
    // exist at once. Fewer, larger chunks read the head's weight and accumulate its gradient
    // (V x C fp32) fewer times; equal ones give each product one shape.
    const int64_t max_rows = std::clamp<int64_t>((int64_t(1) << 25) / V, 1, M_);
    const int64_t chunks = (M_ + max_rows - 1) / max_rows;
    head_rows_ = (M_ + chunks - 1) / chunks;
    attn_ = {B, T, H, Hkv_, D, QKV};

    capacity = std::max(capacity, layout_.total());
    params_.add("params", capacity, DType::f32);
    grads_.add("grads", capacity, DType::f32);
    if (bf16_)
        params_bf16_.add("params", capacity, DType::bf16);

    // Activations: declare every region, allocate once, then resolve pointers.
    const int64_t M = M_;
    const int64_t sets = recompute == Recompute::full ? 1 : L;
    const int64_t attention_sets = recompute == Recompute::none ? L : 1;
    size_t o_res = acts_.add("residual", (L + 1) * M * C, DType::f32);
    const int64_t bf = bf16_ ? 1 : 0;  // bf16 copies of product inputs exist in bf16 only
    const DType ct = compute_type();
    std::vector<std::array<size_t, 10>> o_block(sets);
    for (auto& o : o_block) {
        o = {acts_.add("rstd1", M, DType::f32),
             acts_.add("qkv", M * QKV, DType::f32),
             acts_.add("att", M * H * D, DType::f32),
             acts_.add("x2", M * C, DType::f32),
             acts_.add("rstd2", M, DType::f32),
             acts_.add("gu", M * 2 * F, DType::f32),
             acts_.add("xn1", M * C, ct),
             acts_.add("xn2", M * C, ct),
             acts_.add("h", M * F, ct),
             acts_.add("att_bf", bf * M * H * D, DType::bf16)};
    }
    std::vector<size_t> o_saved(attention_sets);
    const int64_t saved_bytes = int64_t(k_.attention_saved_bytes(attn_));
    for (auto& o : o_saved)
        o = acts_.add("attention_saved", (saved_bytes + 1) / 2, DType::u16);  // bytes / 2
    size_t o_cos = acts_.add("rope_cos", T * D / 2, DType::f32);
    size_t o_sin = acts_.add("rope_sin", T * D / 2, DType::f32);
    size_t o_rstdf = acts_.add("rstdf", M, DType::f32);
    size_t o_norm_w = acts_.add("norm_weight", C, DType::f32);
    size_t o_xnf = acts_.add("xnf", M * C, ct);
    size_t o_dres = acts_.add("dres", M * C, DType::f32);
    size_t o_dxn = acts_.add("dxn", M * C, DType::f32);
    size_t o_dqkv = acts_.add("dqkv", M * QKV, ct);
    size_t o_datt = acts_.add("datt", M * H * D, DType::f32);
    size_t o_dgu = acts_.add("dgu", M * 2 * F, ct);
    size_t o_dh = acts_.add("dh", M * F, DType::f32);
    size_t o_logits = acts_.add("logits", head_rows_ * V, DType::f32);
    size_t o_losses = acts_.add("losses", M, DType::f32);
    size_t o_rows = acts_.add("row_stats", 4 * M, DType::f32);
    size_t o_local = acts_.add("local_ids", 2 * M, DType::i32);
    size_t o_dy_bf = acts_.add("dy_bf", bf * M * C, DType::bf16);
    size_t o_dlogits_bf = acts_.add("dlogits_bf", bf * head_rows_ * V, DType::bf16);
    int64_t max_operand = std::max({M * std::max({C, QKV, 2 * F}), head_rows_ * V});
    ws_.bytes = k_.workspace_bytes(max_operand, attn_);
    size_t o_ws = acts_.add("workspace", int64_t(ws_.bytes), DType::u16);  // counted in bytes/2
    if (!allocate)
        return;
    params_.allocate();
    grads_.allocate();
    if (bf16_)
        params_bf16_.allocate();
    acts_.allocate();

    res_ = acts_.get<float>(o_res);
    for (int64_t l = 0; l < L; l++) {
        const auto& o = o_block[recompute == Recompute::full ? 0 : l];
        BlockActs b;
        float** fields[] = {&b.rstd1, &b.qkv, &b.att, &b.x2, &b.rstd2, &b.gu};
        for (int i = 0; i < 6; i++)
            *fields[i] = acts_.get<float>(o[i]);
        void** inputs[] = {&b.xn1, &b.xn2, &b.h};
        for (int i = 0; i < 3; i++)
            *inputs[i] = acts_.get<void>(o[6 + i]);
        b.att_bf = bf16_ ? acts_.get<uint16_t>(o[9]) : nullptr;
        b.attention = acts_.get<void>(o_saved[recompute == Recompute::none ? l : 0]);
        blocks_.push_back(b);
    }
    rope_cos_ = acts_.get<float>(o_cos);
    rope_sin_ = acts_.get<float>(o_sin);
    rstdf_ = acts_.get<float>(o_rstdf);
    norm_w_ = acts_.get<float>(o_norm_w);
    xnf_ = acts_.get<void>(o_xnf);
    dres_ = acts_.get<float>(o_dres);
    dxn_ = acts_.get<float>(o_dxn);
    dqkv_ = acts_.get<void>(o_dqkv);
    datt_ = acts_.get<float>(o_datt);
    dgu_ = acts_.get<void>(o_dgu);
    dh_ = acts_.get<float>(o_dh);
    logits_ = acts_.get<float>(o_logits);
    losses_ = acts_.get<float>(o_losses);
    row_max_ = acts_.get<float>(o_rows);
    row_sum_ = row_max_ + M, row_target_ = row_sum_ + M, row_scale_ = row_target_ + M;
    local_tokens_ = acts_.get<int32_t>(o_local);
    local_targets_ = local_tokens_ + M;
    ws_.ptr = acts_.get<void>(o_ws);
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
    // Attention rotates the queries and keys itself, on the way into its products.
    attn_.rope_cos = rope_cos_;
    attn_.rope_sin = rope_sin_;
}

void Llama::init_weights(uint64_t seed, double std) {
    // Every rank draws every whole tensor in the same order and keeps its shard.
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, static_cast<float>(std));
    std::vector<float> full;
    for (const auto& info : layout_.params()) {
        float* w = params() + info.offset;
        if (info.shape.size() == 1) {
            std::fill(w, w + info.numel, 1.0f);
            continue;
        }
        full.resize(size_t(info.full_shape[0] * info.full_shape[1]));
        const float scale = static_cast<float>(info.init_scale);
        for (float& x : full)
            x = normal(rng) * scale;
        layout_.shard_from_full(info, full.data(), w);
    }
    sync_compute_weights();
}

void Llama::sync_compute_weights() {
    if (bf16_)
        k_.to_bf16(params_bf16(), params(), layout_.total());
}

const float* Llama::norm_weight(int64_t offset) {
    if (!bf16_)
        return params() + offset;
    const uint16_t* w = params_bf16() + offset;
    for (int64_t c = 0; c < C_; c++)
        norm_w_[c] = bf16_to_f32(w[c]);
    return norm_w_;
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

Llama::Operand Llama::input(const void* x, int64_t offset) const {
    return {static_cast<const char*>(x) + offset * int64_t(dtype_size(compute_type())),
            compute_type()};
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

// dx (M, K) = dy (M, N) · W ; dw (N, K) += dy^T · x (= without accumulate_dw)
void Llama::linear_backward(float* dx, float* dw, Operand dy, Operand x, Operand w, int64_t M,
                            int64_t K, int64_t N, bool accumulate_dw) {
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
    gw.c = dw, gw.ldc = K, gw.accumulate = accumulate_dw;
    k_.gemm(gw, ws_);
}

void Llama::tp_all_reduce(float* data, int64_t n) {
    if (tp_size_ > 1)
        tp_->all_reduce_sum(data, size_t(n));
}

// Rank 0 of the group adds the residual and every rank its partial product; the all-reduce sums
// them. With one rank the residual rides on the product's accumulate.
void Llama::row_parallel(float* y, const float* residual, Operand x, Operand w, int64_t M,
                         int64_t K, int64_t N) {
    bool with_residual = tp_rank_ == 0;
    if (with_residual)
        std::memcpy(y, residual, size_t(M * N) * sizeof(float));
    linear_forward(y, x, w, M, K, N, with_residual);
    tp_all_reduce(y, M * N);
}

void Llama::block_forward(int64_t l, const float* x, float* out) {
    const BlockParams& p = layout_.blocks[l];
    const BlockActs& a = blocks_[l];
    const int64_t M = M_, C = C_, H = H_, D = D_, F = F_, QKV = QKV_;
    const float eps = static_cast<float>(config_.norm_eps);

    // attention (this rank's heads)
    const DType ct = compute_type();
    k_.rmsnorm_forward(a.xn1, ct, a.rstd1, x, norm_weight(p.attention_norm), M, C, eps);
    linear_forward(a.qkv, input(a.xn1), weight(p.wqkv), M, C, QKV);
    k_.attention_forward(a.att, a.attention, a.qkv, attn_, ws_);
    row_parallel(a.x2, x, operand(a.att, a.att_bf, M * H * D), weight(p.wo), M, H * D, C);
    // feed-forward (this rank's slice of the hidden width)
    k_.rmsnorm_forward(a.xn2, ct, a.rstd2, a.x2, norm_weight(p.ffn_norm), M, C, eps);
    linear_forward(a.gu, input(a.xn2), weight(p.w13), M, C, 2 * F);
    k_.swiglu_forward(a.h, ct, a.gu, M, F);
    row_parallel(out, a.x2, input(a.h), weight(p.w2), M, F, C);
}

// dres (M, C): on entry the gradient w.r.t. the block's output, on exit w.r.t. its input.
void Llama::block_backward(int64_t l, float* dres, bool accumulate) {
    const BlockParams& p = layout_.blocks[l];
    const BlockActs& a = blocks_[l];
    const float* x = res_ + l * M_ * C_;
    if (recompute_ == Recompute::full) {
        block_forward(l, x, res_ + (l + 1) * M_ * C_);  // same values as before
    } else if (recompute_ == Recompute::selective) {
        k_.attention_forward(a.att, a.attention, a.qkv, attn_, ws_);  // refills the shared set
    }
    float* g = grads();
    const int64_t M = M_, C = C_, H = H_, D = D_, F = F_, QKV = QKV_;

    // feed-forward: out = x2 + h W2^T, h = swiglu(xn2 W13^T), xn2 = rmsnorm(x2)
    linear_backward(dh_, g + p.w2, operand(dres, dy_bf_, M * C), input(a.h), weight(p.w2), M, F, C,
                    accumulate);
    k_.swiglu_backward(dgu_, compute_type(), dh_, a.gu, M, F);
    linear_backward(dxn_, g + p.w13, input(dgu_), input(a.xn2), weight(p.w13), M, C, 2 * F,
                    accumulate);
    tp_all_reduce(dxn_, M * C);  // xn2 fed every rank's slice
    k_.rmsnorm_backward(dres, g + p.ffn_norm, dxn_, a.x2, norm_weight(p.ffn_norm), a.rstd2, M, C);
    // attention: x2 = x + att Wo^T, att = attention(xn1 Wqkv^T) (RoPE inside), xn1 = rmsnorm(x)
    linear_backward(datt_, g + p.wo, operand(dres, dy_bf_, M * C), saved(a.att, a.att_bf),
                    weight(p.wo), M, H * D, C, accumulate);
    k_.attention_backward(dqkv_, compute_type(), datt_, a.qkv, a.attention, attn_, ws_);
    linear_backward(dxn_, g + p.wqkv, input(dqkv_), input(a.xn1), weight(p.wqkv), M, C, QKV,
                    accumulate);
    tp_all_reduce(dxn_, M * C);  // xn1 fed every rank's heads
    k_.rmsnorm_backward(dres, g + p.attention_norm, dxn_, x, norm_weight(p.attention_norm), a.rstd1,
                        M, C);
}

void Llama::embed(const int32_t* tokens) {
    // Vocabulary-parallel: each rank looks up the tokens of its slice; the sum is the lookup.
    const int64_t vb = layout_.vocab_begin;
    for (int64_t m = 0; m < M_; m++) {
        KILN_CHECK(tokens[m] >= 0 && tokens[m] < config_.vocab_size, "token {} out of range",
                   tokens[m]);
        local_tokens_[m] = tokens[m] >= vb && tokens[m] < vb + V_ ? int32_t(tokens[m] - vb) : -1;
    }
    const Operand wte = weight(layout_.embedding);
    k_.embedding_forward(res_, local_tokens_, wte.ptr, wte.type, M_, C_);
    tp_all_reduce(res_, M_ * C_);
    for (int64_t l = 0; l < config_.n_layers; l++) {
        block_forward(l, res_ + l * M_ * C_, res_ + (l + 1) * M_ * C_);
    }
    k_.rmsnorm_forward(xnf_, compute_type(), rstdf_, res_ + config_.n_layers * M_ * C_,
                       norm_weight(layout_.final_norm), M_, C_,
                       static_cast<float>(config_.norm_eps));
}

// LM head and cross-entropy in row chunks, over this rank's slice of the vocabulary: the row
// statistics (max, sum of exp, target logit) are combined over the tensor-parallel group, so no
// rank ever holds full-vocabulary logits. With grad_scale != 0 also the head's backward into
// dxn_ (d xnf) and the output weight's gradient.
LossSum Llama::head(const int32_t* targets, float grad_scale, float* logits_out, bool accumulate) {
    const int64_t C = C_, V = V_, vb = layout_.vocab_begin;
    if (logits_out) {
        KILN_CHECK(tp_size_ == 1, "full logits need the whole vocabulary on one rank");
        for (int64_t r0 = 0; r0 < M_; r0 += head_rows_) {
            int64_t rows = std::min(head_rows_, M_ - r0);
            Operand xnf = input(xnf_, r0 * C);
            linear_forward(logits_out + r0 * V, xnf, weight(layout_.output), rows, C, V);
        }
        return {};
    }
    for (int64_t m = 0; m < M_; m++) {
        int32_t t = targets[m];
        local_targets_[m] = t >= vb && t < vb + V ? int32_t(t - vb) : -1;
        row_scale_[m] = t >= 0 ? grad_scale : 0.0f;
    }
    for (int64_t r0 = 0; r0 < M_; r0 += head_rows_) {
        int64_t rows = std::min(head_rows_, M_ - r0);
        Operand xnf = input(xnf_, r0 * C);
        linear_forward(logits_, xnf, weight(layout_.output), rows, C, V);
        // The gradient goes straight to the dtype the backward products read (f32 in place).
        Operand dlogits = bf16_ ? Operand{dlogits_bf_, DType::bf16} : Operand{logits_, DType::f32};
        void* dlogits_out = grad_scale != 0 ? const_cast<void*>(dlogits.ptr) : nullptr;
        if (tp_size_ == 1) {
            k_.cross_entropy(logits_, local_targets_ + r0, row_scale_ + r0, rows, V, losses_ + r0,
                             dlogits_out, dlogits.type);
        } else {
            // A split vocabulary: each rank's row statistics are combined over the group first.
            float *mx = row_max_ + r0, *se = row_sum_ + r0, *tl = row_target_ + r0;
            k_.logit_stats(logits_, local_targets_ + r0, rows, V, mx, se, tl);
            std::vector<float> local_max(mx, mx + rows);
            tp_->all_reduce_max(mx, size_t(rows));
            for (int64_t i = 0; i < rows; i++)
                se[i] *= std::exp(local_max[i] - mx[i]);
            tp_->all_reduce_sum(se, size_t(rows));
            tp_->all_reduce_sum(tl, size_t(rows));
            for (int64_t i = 0; i < rows; i++) {
                losses_[r0 + i] = targets[r0 + i] >= 0 ? std::log(se[i]) + mx[i] - tl[i] : 0.0f;
            }
            if (dlogits_out) {
                k_.cross_entropy_backward(logits_, local_targets_ + r0, mx, se, row_scale_ + r0,
                                          rows, V, dlogits_out, dlogits.type);
            }
        }
        if (grad_scale != 0) {
            linear_backward(dxn_ + r0 * C, grads() + layout_.output, dlogits, xnf,
                            weight(layout_.output), rows, C, V, accumulate || r0 > 0);
        }
    }
    if (grad_scale != 0)
        tp_all_reduce(dxn_, M_ * C);  // xnf fed every rank's vocabulary
    LossSum loss;
    for (int64_t m = 0; m < M_; m++) {
        if (targets[m] >= 0) {
            loss.sum += losses_[m];
            loss.tokens++;
        }
    }
    return loss;
}

LossSum Llama::forward_backward(const int32_t* tokens, const int32_t* targets, float grad_scale,
                                Grads mode) {
    const bool accumulate = mode == Grads::accumulate;
    if (!accumulate && grad_scale != 0) {
        // The products overwrite their weights' gradients; the embedding's scatter and the
        // norms' sums only add, so theirs start from zero.
        for (const auto& p : layout_.params()) {
            if (p.shape.size() == 1 || p.offset == layout_.embedding)
                std::fill(grads() + p.offset, grads() + p.offset + p.numel, 0.0f);
        }
    }
    embed(tokens);
    LossSum loss = head(targets, grad_scale, nullptr, accumulate);
    if (grad_scale == 0)
        return loss;
    const int64_t C = C_, L = config_.n_layers;
    std::fill(dres_, dres_ + M_ * C, 0.0f);
    k_.rmsnorm_backward(dres_, grads() + layout_.final_norm, dxn_, res_ + L * M_ * C,
                        norm_weight(layout_.final_norm), rstdf_, M_, C);
    for (int64_t l = L - 1; l >= 0; l--)
        block_backward(l, dres_, accumulate);
    k_.embedding_backward(grads() + layout_.embedding, dres_, local_tokens_, M_, C);
    return loss;
}

void Llama::forward_logits(const int32_t* tokens, float* logits) {
    embed(tokens);
    head(nullptr, 0, logits, true);
}

}  // namespace kiln::model
