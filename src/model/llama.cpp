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
#include <utility>

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
             Recompute recompute, int64_t capacity, Collective* tp, const Split& split)
    : Llama(config, kernels, B, T, recompute, tp, tp ? tp->size() : 1, tp ? tp->rank() : 0, split) {
    build(capacity, true);
}

ModelBytes Llama::bytes(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B,
                        int64_t T, Recompute recompute, int64_t capacity, int tp_size,
                        const Split& split) {
    Llama plan(config, kernels, B, T, recompute, nullptr, tp_size, 0, split);
    plan.build(capacity, false);
    return {int64_t(plan.params_.bytes()), int64_t(plan.grads_.bytes()),
            int64_t(plan.params_bf16_.bytes()), int64_t(plan.acts_.bytes())};
}

Llama::Llama(const LlamaConfig& config, const kernels::Kernels& kernels, int64_t B, int64_t T,
             Recompute recompute, Collective* tp, int tp_size, int tp_rank, const Split& split)
    : config_(config),
      tp_(tp),
      tp_size_(tp_size),
      tp_rank_(tp_rank),
      split_(split),
      sp_(split.sp && tp_size > 1),
      wire_bf16_(split.bf16_wire && tp_size > 1),
      layout_(config, tp_size_, tp_rank_, split.pp, split.pp_rank),
      k_(kernels),
      B_(B),
      T_(T),
      M_(B * T),
      Ml_(sp_ ? B * T / tp_size : B * T),
      L_(int64_t(layout_.blocks.size())),
      recompute_(recompute),
      bf16_(kernels.precision == kernels::Precision::bf16),
      op_inputs_(bf16_ ? kernels.op_inputs : DType::f32) {}

// Declares every buffer; with `allocate`, allocates them and resolves the pointers into them.
void Llama::build(int64_t capacity, bool allocate) {
    const LlamaConfig& config = config_;
    const int64_t B = B_, T = T_;
    const Recompute recompute = recompute_;
    config_.validate(tp_size_);
    KILN_CHECK(B > 0 && T > 0, "micro-batch {}x{}", B, T);
    KILN_CHECK(!sp_ || M_ % tp_size_ == 0, "{} rows do not split over {} ranks", M_, tp_size_);
    KILN_CHECK(split_.pp >= 1 && split_.pp_rank >= 0 && split_.pp_rank < split_.pp &&
                   split_.pp <= config.n_layers && split_.inflight >= 1,
               "pipeline stage {} of {} with {} in flight", split_.pp_rank, split_.pp,
               split_.inflight);
    C_ = config.dim, D_ = config.head_dim();
    H_ = config.n_heads / tp_size_, Hkv_ = config.n_kv_heads / tp_size_;
    F_ = config.ffn_dim() / tp_size_, V_ = config.vocab_size / tp_size_;
    QKV_ = (H_ + 2 * Hkv_) * D_;
    const int64_t C = C_, L = L_, H = H_, D = D_, F = F_, V = V_, QKV = QKV_;
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

    // Activations: declare every region, allocate once, then resolve pointers. What the
    // backward reads is kept per micro-batch in flight (slot); scratch exists once.
    const int64_t M = M_, Ml = Ml_, S = split_.inflight;
    const int64_t sets = recompute == Recompute::full ? 1 : S * L;
    const int64_t attention_sets = recompute == Recompute::none ? S * L : 1;
    std::vector<size_t> o_res(S);
    for (auto& o : o_res)
        o = acts_.add("residual", (L + 1) * Ml * C, DType::f32);
    const int64_t bf = bf16_ ? 1 : 0;  // bf16 copies of product inputs exist in bf16 only
    const DType ct = compute_type();
    std::vector<std::array<size_t, 9>> o_block(sets);
    for (auto& o : o_block) {
        o = {acts_.add("rstd1", Ml, DType::f32),
             acts_.add("x2", Ml * C, DType::f32),
             acts_.add("rstd2", Ml, DType::f32),
             acts_.add("xn1", Ml * C, ct),
             acts_.add("att", M * H * D, ct),
             acts_.add("xn2", Ml * C, ct),
             acts_.add("h", M * F, ct),
             acts_.add("qkv", M * QKV, op_inputs_),
             acts_.add("gu", M * 2 * F, op_inputs_)};
    }
    std::vector<size_t> o_saved(attention_sets);
    const int64_t saved_bytes = int64_t(k_.attention_saved_bytes(attn_));
    for (auto& o : o_saved)
        o = acts_.add("attention_saved", (saved_bytes + 1) / 2, DType::u16);  // bytes / 2
    size_t o_cos = acts_.add("rope_cos", T * D / 2, DType::f32);
    size_t o_sin = acts_.add("rope_sin", T * D / 2, DType::f32);
    size_t o_rstdf = acts_.add("rstdf", Ml, DType::f32);
    size_t o_norm_w = acts_.add("norm_weight", C, DType::f32);
    size_t o_xnf = acts_.add("xnf", Ml * C, ct);
    size_t o_dres = acts_.add("dres", Ml * C, DType::f32);
    size_t o_dxn = acts_.add("dxn", M * C, DType::f32);
    size_t o_dqkv = acts_.add("dqkv", M * QKV, ct);
    size_t o_datt = acts_.add("datt", M * H * D, op_inputs_);
    size_t o_dgu = acts_.add("dgu", M * 2 * F, ct);
    size_t o_dh = acts_.add("dh", M * F, op_inputs_);
    size_t o_logits = acts_.add("logits", head_rows_ * V, DType::f32);
    size_t o_losses = acts_.add("losses", M, DType::f32);
    size_t o_rows = acts_.add("row_stats", 5 * M, DType::f32);
    // Token ids and targets as given, and in this rank's vocabulary slice (one set per slot).
    size_t o_ids = acts_.add("ids", 2 * M, DType::i32);      // tokens, then targets
    size_t o_loss = acts_.add("loss_total", 2, DType::u32);  // one double (take_loss())
    size_t o_local = acts_.add("local_ids", (S + 1) * M, DType::i32);
    size_t o_dy_bf = acts_.add("dy_bf", bf * Ml * C, DType::bf16);
    const int64_t sp = sp_ ? 1 : 0, wire = wire_bf16_ ? 1 : 0;
    size_t o_gathered = acts_.add("gathered", sp * M * C, ct);
    size_t o_partial = acts_.add("partial", std::max(sp, wire) * M * C, DType::f32);
    size_t o_wire = acts_.add("wire", wire * M * C, DType::bf16);
    size_t o_norm_grads = acts_.add("norm_grads", sp * 2 * C, DType::f32);  // a block's two
    size_t o_dlogits_bf = acts_.add("dlogits_bf", bf * head_rows_ * V, DType::bf16);
    int64_t max_operand = std::max({M * std::max({C, QKV, 2 * F}), head_rows_ * V});
    ws_.bytes = k_.workspace_bytes(max_operand, attn_);
    size_t o_ws = acts_.add("workspace", int64_t(ws_.bytes + 1) / 2, DType::u16);  // bytes / 2
    if (!allocate)
        return;
    params_.allocate();
    grads_.allocate();
    if (bf16_)
        params_bf16_.allocate();
    acts_.allocate();

    for (int64_t s = 0; s < S; s++) {
        res_.push_back(acts_.get<float>(o_res[s]));
        local_tokens_.push_back(acts_.get<int32_t>(o_local) + s * M);
    }
    for (int64_t i = 0; i < sets; i++) {
        const auto& o = o_block[i];
        BlockActs b;
        float** fields[] = {&b.rstd1, &b.x2, &b.rstd2};
        for (int f = 0; f < 3; f++)
            *fields[f] = acts_.get<float>(o[f]);
        void** typed[] = {&b.xn1, &b.att, &b.xn2, &b.h, &b.qkv, &b.gu};
        for (int f = 0; f < 6; f++)
            *typed[f] = acts_.get<void>(o[3 + f]);
        b.attention = acts_.get<void>(o_saved[recompute == Recompute::none ? i : 0]);
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
    datt_ = acts_.get<void>(o_datt);
    dgu_ = acts_.get<void>(o_dgu);
    dh_ = acts_.get<void>(o_dh);
    logits_ = acts_.get<float>(o_logits);
    losses_ = acts_.get<float>(o_losses);
    row_max_ = acts_.get<float>(o_rows);
    row_sum_ = row_max_ + M, row_target_ = row_sum_ + M, row_scale_ = row_target_ + M;
    row_local_max_ = row_scale_ + M;
    tokens_in_ = acts_.get<int32_t>(o_ids);
    targets_in_ = tokens_in_ + M;
    loss_total_ = acts_.get<double>(o_loss);
    local_targets_ = acts_.get<int32_t>(o_local) + S * M;
    norm_grads_ = sp_ ? acts_.get<float>(o_norm_grads) : nullptr;
    gathered_ = sp_ ? acts_.get<void>(o_gathered) : nullptr;
    partial_ = sp_ || wire_bf16_ ? acts_.get<float>(o_partial) : nullptr;
    wire_ = wire_bf16_ ? acts_.get<uint16_t>(o_wire) : nullptr;
    ws_.ptr = acts_.get<void>(o_ws);
    dy_bf_ = bf16_ ? acts_.get<uint16_t>(o_dy_bf) : nullptr;
    dlogits_bf_ = bf16_ ? acts_.get<uint16_t>(o_dlogits_bf) : nullptr;

    // Rotary tables, HF convention: angle(t, i) = t * theta^(-2i/D), i < D/2.
    std::vector<float> cos_table(size_t(T * D / 2)), sin_table(cos_table.size());
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < D / 2; i++) {
            double angle = t * std::pow(config.rope_theta, -2.0 * i / D);
            cos_table[size_t(t * D / 2 + i)] = static_cast<float>(std::cos(angle));
            sin_table[size_t(t * D / 2 + i)] = static_cast<float>(std::sin(angle));
        }
    }
    k_.copy(rope_cos_, cos_table.data(), cos_table.size() * sizeof(float));
    k_.copy(rope_sin_, sin_table.data(), sin_table.size() * sizeof(float));
    // Attention rotates the queries and keys itself, on the way into its products.
    attn_.rope_cos = rope_cos_;
    attn_.rope_sin = rope_sin_;
}

void Llama::init_weights(uint64_t seed, double std) {
    // Every rank draws every whole tensor of the whole model in the same order and keeps its
    // shard of those its stage holds, made on the host and copied to the backend's memory.
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, static_cast<float>(std));
    std::vector<float> full, shard;
    const Layout whole(config_);
    for (const auto& info : whole.params()) {
        const ParamInfo* mine = layout_.find(info.name);
        // Host memory takes the shard straight in; another memory through a copy of it (which
        // on the host would hold a second tensor-sized buffer at the peak).
        float* dst = nullptr;
        if (mine) {
            const bool host = k_.memory == &host_memory;
            if (!host)
                shard.resize(size_t(mine->numel));
            dst = host ? params() + mine->offset : shard.data();
        }
        if (info.shape.size() == 1) {
            if (mine)
                std::fill(dst, dst + mine->numel, 1.0f);
        } else {
            full.resize(size_t(info.full_shape[0] * info.full_shape[1]));
            const float scale = static_cast<float>(info.init_scale);
            for (float& x : full)
                x = normal(rng) * scale;
            if (mine)
                layout_.shard_from_full(*mine, full.data(), dst);
        }
        if (mine && dst != params() + mine->offset)
            k_.copy(params() + mine->offset, dst, size_t(mine->numel) * sizeof(float));
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
    k_.widen(norm_w_, params_bf16() + offset, C_);
    return norm_w_;
}

Llama::Operand Llama::weight(int64_t offset) const {
    if (bf16_)
        return {params_bf16_.get<uint16_t>(0) + offset, DType::bf16};
    return {params_.get<float>(0) + offset, DType::f32};
}

Llama::Operand Llama::input(const void* x, int64_t offset) const {
    return {static_cast<const char*>(x) + offset * int64_t(dtype_size(compute_type())),
            compute_type()};
}

// y (M, N) = x (M, K) · W^T (+ residual), W (N, K)
void Llama::linear_forward(Output y, Operand x, Operand w, int64_t M, int64_t K, int64_t N,
                           const float* residual) {
    Gemm g;
    g.M = M, g.N = N, g.K = K;
    g.a = x.ptr, g.a_type = x.type, g.lda = K;
    g.b = w.ptr, g.b_type = w.type, g.ldb = K, g.trans_b = true;
    g.c = y.ptr, g.c_type = y.type, g.ldc = N;
    g.accumulate = residual != nullptr, g.c_in = residual;
    k_.gemm(g, ws_);
}

// dx (M, K) = dy (M, N) · W
void Llama::linear_dx(Output dx, Operand dy, Operand w, int64_t M, int64_t K, int64_t N) {
    Gemm g;
    g.M = M, g.N = K, g.K = N;
    g.a = dy.ptr, g.a_type = dy.type, g.lda = N;
    g.b = w.ptr, g.b_type = w.type, g.ldb = K;
    g.c = dx.ptr, g.c_type = dx.type, g.ldc = K;
    k_.gemm(g, ws_);
}

// dw (N, K) += dy^T · x (= without accumulate_dw)
void Llama::linear_dw(float* dw, Operand dy, Operand x, int64_t M, int64_t K, int64_t N,
                      bool accumulate_dw) {
    Gemm g;
    g.M = N, g.N = K, g.K = M;
    g.a = dy.ptr, g.a_type = dy.type, g.lda = N, g.trans_a = true;
    g.b = x.ptr, g.b_type = x.type, g.ldb = K;
    g.c = dw, g.ldc = K, g.accumulate = accumulate_dw;
    k_.gemm(g, ws_);
}

void Llama::linear_backward(Output dx, float* dw, Operand dy, Operand x, Operand w, int64_t M,
                            int64_t K, int64_t N, bool accumulate_dw) {
    linear_dx(dx, dy, w, M, K, N);
    linear_dw(dw, dy, x, M, K, N, accumulate_dw);
}

// The backward of a column-parallel product y (M, N) = x · W^T whose input x (M, K) fed every
// rank (under sequence parallelism, the rows `x_local` of each rank gathered): dw, and this
// rank's rows of dx summed over the group, in dxn_. Each collective runs beside a product that
// does not read it: the rows' gather beside dx's product, dx's sum beside dw's.
const float* Llama::column_parallel_backward(float* dw, Operand dy, const void* x_local, Operand w,
                                             int64_t K, int64_t N, bool accumulate_dw) {
    const Operand x = start_gather_rows(x_local, gathered_, compute_type());
    unless_overlapped();
    linear_dx(dxn_, dy, w, M_, K, N);
    if (sp_)
        tp_->finish();
    start_sum_rows(dxn_);
    unless_overlapped();
    linear_dw(dw, dy, x, M_, K, N, accumulate_dw);
    return finish_sum_rows(dxn_);
}

void Llama::unless_overlapped() {
    if (!split_.tp_overlap && tp_size_ > 1)
        tp_->finish();
}

void Llama::tp_all_reduce(float* data, int64_t n) {
    if (tp_size_ > 1)
        tp_->all_reduce_sum(data, size_t(n));
}

Llama::Operand Llama::start_gather_rows(const void* local, void* full, DType type) {
    if (!sp_)
        return {local, type};
    const size_t bytes = size_t(Ml_ * C_) * dtype_size(type);
    k_.copy(static_cast<char*>(full) + size_t(tp_rank_) * bytes, local, bytes);
    tp_->start([this, full, bytes] { tp_->all_gather_bytes(full, bytes); });
    return {full, type};
}

Llama::Operand Llama::gather_rows(const void* local, void* full, DType type) {
    const Operand gathered = start_gather_rows(local, full, type);
    if (sp_)
        tp_->finish();
    return gathered;
}

void Llama::start_sum_rows(float* full) {
    if (tp_size_ == 1)
        return;
    const size_t n = size_t(M_ * C_), rows = size_t(Ml_ * C_);
    if (wire_) {
        k_.to_bf16(wire_, full, int64_t(n));
        uint16_t* wire = wire_;
        if (sp_)
            tp_->start([this, wire, rows] { tp_->reduce_scatter_sum_bf16(wire, rows); });
        else
            tp_->start([this, wire, n] { tp_->all_reduce_sum_bf16(wire, n); });
    } else if (sp_) {
        tp_->start([this, full, rows] { tp_->reduce_scatter_sum(full, rows); });
    } else {
        tp_->start([this, full, n] { tp_->all_reduce_sum(full, n); });
    }
}

float* Llama::finish_sum_rows(float* full) {
    if (tp_size_ == 1)
        return full;
    tp_->finish();
    const int64_t mine = sp_ ? tp_rank_ * Ml_ * C_ : 0;
    if (wire_)
        k_.widen(full + mine, wire_ + mine, Ml_ * C_);
    return full + mine;
}

float* Llama::sum_rows(float* full) {
    start_sum_rows(full);
    return finish_sum_rows(full);
}

// Rank 0 of the group adds the residual and every rank its partial product; the all-reduce sums
// them. The residual rides on the product's accumulate (a device's product reads it where it
// writes y; it is not copied to y first). With sequence parallelism the partial products are
// reduce-scattered over the rows, and each rank adds its rows of the residual; so with bf16 on
// the wire, which must not round the residual stream.
void Llama::row_parallel(float* y, const float* residual, Operand x, Operand w, int64_t M,
                         int64_t K, int64_t N) {
    if (sp_ || wire_) {
        linear_forward(partial_, x, w, M, K, N);
        k_.add(y, residual, sum_rows(partial_), Ml_ * N);
        return;
    }
    linear_forward(y, x, w, M, K, N, tp_rank_ == 0 ? residual : nullptr);
    tp_all_reduce(y, M * N);
}

const Llama::BlockActs& Llama::acts(int slot, int64_t l) const {
    return blocks_[recompute_ == Recompute::full ? 0 : size_t(slot * L_ + l)];
}

float* Llama::residual(int slot) const {
    return res_[size_t(slot)];
}

void Llama::block_forward(int slot, int64_t l, const float* x, float* out) {
    const BlockParams& p = layout_.blocks[l];
    const BlockActs& a = acts(slot, l);
    const int64_t M = M_, Ml = Ml_, C = C_, H = H_, D = D_, F = F_, QKV = QKV_;
    const float eps = static_cast<float>(config_.norm_eps);

    // attention (this rank's heads)
    const DType ct = compute_type();
    k_.rmsnorm_forward(a.xn1, ct, a.rstd1, x, norm_weight(p.attention_norm), Ml, C, eps);
    linear_forward({a.qkv, op_inputs_}, gather_rows(a.xn1, gathered_, ct), weight(p.wqkv), M, C,
                   QKV);
    k_.attention_forward(a.att, a.attention, a.qkv, op_inputs_, attn_, ws_);
    row_parallel(a.x2, x, input(a.att), weight(p.wo), M, H * D, C);
    // feed-forward (this rank's slice of the hidden width)
    k_.rmsnorm_forward(a.xn2, ct, a.rstd2, a.x2, norm_weight(p.ffn_norm), Ml, C, eps);
    linear_forward({a.gu, op_inputs_}, gather_rows(a.xn2, gathered_, ct), weight(p.w13), M, C,
                   2 * F);
    k_.swiglu_forward(a.h, ct, a.gu, op_inputs_, M, F);
    row_parallel(out, a.x2, input(a.h), weight(p.w2), M, F, C);
}

// dres (Ml, C): on entry the gradient w.r.t. the block's output, on exit w.r.t. its input.
void Llama::block_backward(int slot, int64_t l, float* dres, bool accumulate) {
    const BlockParams& p = layout_.blocks[l];
    const BlockActs& a = acts(slot, l);
    const int64_t M = M_, Ml = Ml_, C = C_, H = H_, D = D_, F = F_, QKV = QKV_;
    const float* x = residual(slot) + l * Ml * C;
    if (recompute_ == Recompute::full) {
        block_forward(slot, l, x, residual(slot) + (l + 1) * Ml * C);  // same values as before
    } else if (recompute_ == Recompute::selective) {
        // refills the shared set
        k_.attention_forward(a.att, a.attention, a.qkv, op_inputs_, attn_, ws_);
    }
    float* g = grads();
    const DType ct = compute_type();
    // The output gradient as the products read it (in bf16 its rounding, which each norm's
    // backward leaves beside dres): every rank's rows under sequence parallelism.
    auto dy = [&] {
        return gather_rows(bf16_ ? static_cast<const void*>(dy_bf_) : dres, gathered_, ct);
    };

    // feed-forward: out = x2 + h W2^T, h = swiglu(xn2 W13^T), xn2 = rmsnorm(x2)
    linear_backward({dh_, op_inputs_}, g + p.w2, dy(), input(a.h), weight(p.w2), M, F, C,
                    accumulate);
    k_.swiglu_backward(dgu_, ct, dh_, a.gu, op_inputs_, M, F);
    // xn2's rows are gathered again (the forward's gathered copy is gone): the bytes of an
    // all-gather instead of a (M, C) activation kept per block.
    const float* dxn2 =  // xn2 fed every rank's slice
        column_parallel_backward(g + p.w13, input(dgu_), a.xn2, weight(p.w13), C, 2 * F,
                                 accumulate);
    k_.rmsnorm_backward(dres, dy_bf_, g + p.ffn_norm, dxn2, a.x2, norm_weight(p.ffn_norm), a.rstd2,
                        Ml, C);
    // attention: x2 = x + att Wo^T, att = attention(xn1 Wqkv^T) (RoPE inside), xn1 = rmsnorm(x)
    linear_backward({datt_, op_inputs_}, g + p.wo, dy(), input(a.att), weight(p.wo), M, H * D, C,
                    accumulate);
    k_.attention_backward(dqkv_, ct, datt_, a.att, a.qkv, op_inputs_, a.attention, attn_, ws_);
    const float* dxn1 =  // xn1 fed every rank's heads
        column_parallel_backward(g + p.wqkv, input(dqkv_), a.xn1, weight(p.wqkv), C, QKV,
                                 accumulate);
    k_.rmsnorm_backward(dres, dy_bf_, g + p.attention_norm, dxn1, x, norm_weight(p.attention_norm),
                        a.rstd1, Ml, C);
}

void Llama::put_tokens(const int32_t* tokens) {
    for (int64_t m = 0; m < M_; m++) {
        KILN_CHECK(tokens[m] >= 0 && tokens[m] < config_.vocab_size, "token {} out of range",
                   tokens[m]);
    }
    k_.copy(tokens_in_, tokens, size_t(M_) * sizeof(int32_t));
}

void Llama::put_targets(const int32_t* targets) {
    for (int64_t m = 0; m < M_; m++)
        loss_tokens_ += targets[m] >= 0 ? 1 : 0;
    k_.copy(targets_in_, targets, size_t(M_) * sizeof(int32_t));
}

void Llama::stage_batch(const int32_t* tokens, const int32_t* targets) {
    put_tokens(tokens);
    put_targets(targets);
}

LossSum Llama::take_loss() {
    LossSum loss;
    k_.copy(&loss.sum, loss_total_, sizeof(double));
    k_.zero(loss_total_, sizeof(double));
    loss.tokens = std::exchange(loss_tokens_, 0);
    return loss;
}

void Llama::embed(int slot) {
    // Vocabulary-parallel: each rank looks up the tokens of its slice; the sum is the lookup.
    int32_t* local = local_tokens_[size_t(slot)];
    k_.slice_ids(local, nullptr, tokens_in_, M_, layout_.vocab_begin, V_, 0.0f);
    const Operand wte = weight(layout_.embedding);
    float* x = residual(slot);
    if (!sp_ && !wire_) {
        k_.embedding_forward(x, local, wte.ptr, wte.type, M_, C_);
        tp_all_reduce(x, M_ * C_);
        return;
    }
    k_.embedding_forward(partial_, local, wte.ptr, wte.type, M_, C_);
    k_.copy(x, sum_rows(partial_), size_t(Ml_ * C_) * sizeof(float));
}

void Llama::final_norm(int slot) {
    k_.rmsnorm_forward(xnf_, compute_type(), rstdf_, residual(slot) + L_ * Ml_ * C_,
                       norm_weight(layout_.final_norm), Ml_, C_,
                       static_cast<float>(config_.norm_eps));
}

// LM head and cross-entropy in row chunks, over this rank's slice of the vocabulary: the row
// statistics (max, sum of exp, target logit) are combined over the tensor-parallel group, so no
// rank ever holds full-vocabulary logits. With grad_scale != 0 also the head's backward into
// dxn_ (d xnf) and the output weight's gradient.
void Llama::head(float grad_scale, float* logits_out, bool accumulate) {
    const int64_t C = C_, V = V_;
    // Every rank's rows of the final norm's output, under sequence parallelism.
    const void* xnf_all = gather_rows(xnf_, gathered_, compute_type()).ptr;
    if (logits_out) {
        KILN_CHECK(tp_size_ == 1, "full logits need the whole vocabulary on one rank");
        for (int64_t r0 = 0; r0 < M_; r0 += head_rows_) {
            int64_t rows = std::min(head_rows_, M_ - r0);
            Operand xnf = input(xnf_all, r0 * C);
            linear_forward(logits_, xnf, weight(layout_.output), rows, C, V);
            k_.copy(logits_out + r0 * V, logits_, size_t(rows * V) * sizeof(float));
        }
        return;
    }
    k_.slice_ids(local_targets_, row_scale_, targets_in_, M_, layout_.vocab_begin, V, grad_scale);
    for (int64_t r0 = 0; r0 < M_; r0 += head_rows_) {
        int64_t rows = std::min(head_rows_, M_ - r0);
        Operand xnf = input(xnf_all, r0 * C);
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
            float* local_max = row_local_max_ + r0;
            k_.copy(local_max, mx, size_t(rows) * sizeof(float));
            tp_->all_reduce_max(mx, size_t(rows));
            k_.rescale_sumexp(se, local_max, mx, rows);
            tp_->all_reduce_sum(se, size_t(rows));
            tp_->all_reduce_sum(tl, size_t(rows));
            k_.row_losses(losses_ + r0, mx, se, tl, targets_in_ + r0, rows);
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
        dxnf_ = sum_rows(dxn_);             // xnf fed every rank's vocabulary
    k_.sum_into(loss_total_, losses_, M_);  // the rows without a target lost 0
}

void Llama::zero_added_grads() {
    // The products overwrite their weights' gradients; the embedding's scatter and the norms'
    // sums only add, so theirs start from zero.
    for (const auto& p : layout_.params()) {
        if (p.shape.size() == 1 || p.offset == layout_.embedding)
            k_.zero(grads() + p.offset, size_t(p.numel) * sizeof(float));
    }
}

void Llama::forward(int slot, const int32_t* tokens, const float* input) {
    if (layout_.first_stage())
        put_tokens(tokens);
    forward_staged(slot, input);
}

void Llama::forward_staged(int slot, const float* input) {
    KILN_CHECK(slot >= 0 && slot < split_.inflight, "slot {} of {}", slot, split_.inflight);
    float* x = residual(slot);
    if (layout_.first_stage())
        embed(slot);
    else
        k_.copy(x, input, size_t(Ml_ * C_) * sizeof(float));
    for (int64_t l = 0; l < L_; l++)
        block_forward(slot, l, x + l * Ml_ * C_, x + (l + 1) * Ml_ * C_);
    if (layout_.last_stage())
        final_norm(slot);
}

const float* Llama::output(int slot) const {
    return residual(slot) + L_ * Ml_ * C_;
}

void Llama::loss(const int32_t* targets, float grad_scale, Grads mode) {
    put_targets(targets);
    loss_staged(grad_scale, mode);
}

void Llama::loss_staged(float grad_scale, Grads mode) {
    KILN_CHECK(layout_.last_stage(), "the loss is the last stage's");
    if (mode == Grads::overwrite && grad_scale != 0)
        zero_added_grads();
    head(grad_scale, nullptr, mode == Grads::accumulate);
}

void Llama::backward(int slot, const float* doutput, Grads mode, const GradsReady* last) {
    const bool accumulate = mode == Grads::accumulate;
    const int64_t C = C_;
    // On the step's last micro-batch: [offset, total) is final once `norms` (their gradients
    // are partial sums of each rank's rows under sequence parallelism) are summed.
    auto final_from = [&](int64_t offset, std::initializer_list<int64_t> norms) {
        if (!last)
            return;
        sum_norm_grads(norms);
        (*last)(offset);
    };
    if (layout_.last_stage()) {
        k_.zero(dres_, size_t(Ml_ * C) * sizeof(float));
        k_.rmsnorm_backward(dres_, dy_bf_, grads() + layout_.final_norm, dxnf_, output(slot),
                            norm_weight(layout_.final_norm), rstdf_, Ml_, C);
        final_from(layout_.final_norm, {layout_.final_norm});  // and the head above it
    } else {
        if (!accumulate)
            zero_added_grads();
        k_.copy(dres_, doutput, size_t(Ml_ * C) * sizeof(float));
        if (bf16_)  // as a norm's backward leaves it
            k_.to_bf16(dy_bf_, dres_, Ml_ * C);
    }
    for (int64_t l = L_ - 1; l >= 0; l--) {
        block_backward(slot, l, dres_, accumulate);
        const BlockParams& p = layout_.blocks[size_t(l)];
        final_from(p.attention_norm, {p.attention_norm, p.ffn_norm});  // the block's first
    }
    if (layout_.first_stage()) {
        const float* dx = static_cast<const float*>(gather_rows(dres_, partial_, DType::f32).ptr);
        k_.embedding_backward(grads() + layout_.embedding, dx, local_tokens_[size_t(slot)], M_, C);
    }
    final_from(0, {});
}

void Llama::forward_backward(const int32_t* tokens, const int32_t* targets, float grad_scale,
                             Grads mode, const GradsReady* last) {
    stage_batch(tokens, targets);
    forward_backward_staged(grad_scale, mode, last);
}

void Llama::forward_backward_staged(float grad_scale, Grads mode, const GradsReady* last) {
    KILN_CHECK(split_.pp == 1,
               "forward_backward() runs the whole model; stages run forward(), "
               "loss() and backward()");
    forward_staged(0, nullptr);
    loss_staged(grad_scale, mode);
    if (grad_scale != 0)
        backward(0, nullptr, mode, last);
}

void Llama::sum_norm_grads(std::initializer_list<int64_t> offsets) {
    if (!sp_ || offsets.size() == 0)
        return;
    KILN_CHECK(offsets.size() <= 2, "{} norms summed at once", offsets.size());
    // Side by side, summed in one all-reduce, copied back.
    const size_t bytes = size_t(C_) * sizeof(float);
    int64_t n = 0;
    for (int64_t offset : offsets)
        k_.copy(norm_grads_ + C_ * n++, grads() + offset, bytes);
    tp_->all_reduce_sum(norm_grads_, size_t(C_ * n));
    n = 0;
    for (int64_t offset : offsets)
        k_.copy(grads() + offset, norm_grads_ + C_ * n++, bytes);
}

void Llama::forward_logits(const int32_t* tokens, float* logits) {
    KILN_CHECK(split_.pp == 1, "full logits need every stage in one model");
    forward(0, tokens, nullptr);
    head(0, logits, true);
}

}  // namespace kiln::model
