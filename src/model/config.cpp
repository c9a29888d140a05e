#include "model/config.h"

#include "core/config.h"
#include "core/error.h"

namespace kiln::model {

int64_t LlamaConfig::ffn_dim() const {
    int64_t hidden = 4 * dim;
    hidden = 2 * hidden / 3;
    if (ffn_dim_multiplier > 0) {
        hidden = static_cast<int64_t>(ffn_dim_multiplier * hidden);
    }
    return multiple_of * ((hidden + multiple_of - 1) / multiple_of);
}

int64_t LlamaConfig::n_params() const {
    int64_t C = dim, D = head_dim(), F = ffn_dim();
    int64_t per_layer = 2 * C + C * (n_heads + 2 * n_kv_heads) * D + n_heads * D * C + 3 * C * F;
    return 2 * vocab_size * C + n_layers * per_layer + C;
}

bool LlamaConfig::same_shapes(const LlamaConfig& o) const {
    return dim == o.dim && n_layers == o.n_layers && n_heads == o.n_heads &&
           n_kv_heads == o.n_kv_heads && vocab_size == o.vocab_size && ffn_dim() == o.ffn_dim() &&
           norm_eps == o.norm_eps && rope_theta == o.rope_theta;
}

void LlamaConfig::validate(int tp) const {
    auto positive = [](const char* key, int64_t v) {
        if (v <= 0)
            throw error("model.{}={} must be positive", key, v);
    };
    positive("dim", dim);
    positive("n_layers", n_layers);
    positive("n_heads", n_heads);
    positive("n_kv_heads", n_kv_heads);
    positive("vocab_size", vocab_size);
    positive("multiple_of", multiple_of);
    positive("max_seq_len", max_seq_len);
    // Bounds far above any real model, so that every product of them (parameter counts, buffer
    // sizes in bytes) fits 64 bits.
    auto at_most = [](const char* key, int64_t v, int64_t most) {
        if (v > most)
            throw error("model.{}={} is over {}", key, v, most);
    };
    at_most("dim", dim, int64_t(1) << 20);
    at_most("n_layers", n_layers, int64_t(1) << 14);
    at_most("n_heads", n_heads, dim);
    at_most("multiple_of", multiple_of, int64_t(1) << 20);
    at_most("max_seq_len", max_seq_len, int64_t(1) << 24);
    if (!(ffn_dim_multiplier <= 64))
        throw error("model.ffn_dim_multiplier={} is over 64", ffn_dim_multiplier);
    if (dim % n_heads != 0) {
        throw error("model.dim={} is not divisible by model.n_heads={}", dim, n_heads);
    }
    if (n_heads % n_kv_heads != 0) {
        throw error("model.n_heads={} is not divisible by model.n_kv_heads={}", n_heads,
                    n_kv_heads);
    }
    if (head_dim() % 2 != 0) {
        throw error("model.dim / model.n_heads = {} must be even for rotary embeddings",
                    head_dim());
    }
    if (vocab_size > (int64_t(1) << 31) - 1) {
        throw error("model.vocab_size={} does not fit 32-bit token ids", vocab_size);
    }
    if (ffn_dim_multiplier < 0) {
        throw error("model.ffn_dim_multiplier={} must be >= 0 (0 means none)", ffn_dim_multiplier);
    }
    if (!(norm_eps > 0)) {
        throw error("model.norm_eps={} must be positive", norm_eps);
    }
    auto splits = [tp](const char* what, int64_t n) {
        if (n % tp != 0) {
            throw error("{}={} is not divisible by parallel.tp={}", what, n, tp);
        }
    };
    splits("model.n_heads", n_heads);
    splits("model.n_kv_heads", n_kv_heads);
    splits("model.vocab_size", vocab_size);
    splits("the FFN width (from model.dim and model.multiple_of)", ffn_dim());
    if (!(rope_theta > 0))
        throw error("model.rope_theta={} must be positive", rope_theta);
}

LlamaConfig preset(const std::string& name) {
    LlamaConfig c;
    c.preset = name;
    if (name == "tiny") {
        c.dim = 288, c.n_layers = 6, c.n_heads = 6, c.n_kv_heads = 6, c.multiple_of = 32;
    } else if (name == "small") {
        c.dim = 512, c.n_layers = 8, c.n_heads = 8, c.n_kv_heads = 8, c.multiple_of = 32;
    } else if (name == "llama2-7b") {
        c.dim = 4096, c.n_layers = 32, c.n_heads = 32, c.n_kv_heads = 32, c.multiple_of = 256;
    } else if (name == "llama2-13b") {
        c.dim = 5120, c.n_layers = 40, c.n_heads = 40, c.n_kv_heads = 40, c.multiple_of = 256;
    } else if (name == "llama2-70b") {
        c.dim = 8192, c.n_layers = 80, c.n_heads = 64, c.n_kv_heads = 8, c.multiple_of = 4096;
        c.ffn_dim_multiplier = 1.3;
    } else {
        throw error("model.preset={} is not one of tiny, small, llama2-7b, llama2-13b, llama2-70b",
                    name);
    }
    return c;
}

void register_keys(ConfigSchema& s, LlamaConfig& c) {
    s.add("model.preset", &c.preset, "tiny | small | llama2-7b | llama2-13b | llama2-70b", {},
          [&c] { c = preset(c.preset); });
    s.set_first("model.preset");
    s.add("model.dim", &c.dim, "model width C");
    s.add("model.n_layers", &c.n_layers, "transformer blocks L");
    s.add("model.n_heads", &c.n_heads, "query heads H");
    s.add("model.n_kv_heads", &c.n_kv_heads, "key/value heads (grouped-query attention)");
    s.add("model.vocab_size", &c.vocab_size, "vocabulary size V");
    s.add("model.multiple_of", &c.multiple_of, "FFN hidden size is rounded up to this");
    s.add("model.ffn_dim_multiplier", &c.ffn_dim_multiplier, "FFN width multiplier (0: none)");
    s.add("model.norm_eps", &c.norm_eps, "RMSNorm epsilon");
    s.add("model.rope_theta", &c.rope_theta, "rotary embedding base");
    s.add("model.max_seq_len", &c.max_seq_len, "longest sequence the model is built for");
}

}  // namespace kiln::model
