#pragma once
// Llama-2 model configuration and the named presets (Meta's shapes for 7B/13B/70B; tiny and
// small for one CPU machine).
#include <cstdint>
#include <string>

namespace kiln {
class ConfigSchema;
}

namespace kiln::model {

struct LlamaConfig {
    std::string preset = "tiny";
    int64_t dim = 288;
    int64_t n_layers = 6;
    int64_t n_heads = 6;
    int64_t n_kv_heads = 6;
    int64_t vocab_size = 32000;
    int64_t multiple_of = 32;
    double ffn_dim_multiplier = 0;  // 0: none
    double norm_eps = 1e-5;
    double rope_theta = 10000;
    int64_t max_seq_len = 4096;

    int64_t head_dim() const { return dim / n_heads; }
    // Meta's rule: 4*dim, times 2/3, times the multiplier, rounded up to multiple_of.
    int64_t ffn_dim() const;
    int64_t qkv_dim() const { return (n_heads + 2 * n_kv_heads) * head_dim(); }
    int64_t n_params() const;
    // Same parameter shapes and numerics (the preset name and max_seq_len may differ).
    bool same_shapes(const LlamaConfig& o) const;
    // Throws Error naming the key when the shapes contradict each other, or do not split over
    // `tp` tensor-parallel ranks.
    void validate(int tp = 1) const;
};

// Returns the preset of that name; throws Error listing the presets when unknown.
LlamaConfig preset(const std::string& name);

// Registers model.* keys; model.preset fills every other model key when set.
void register_keys(ConfigSchema& schema, LlamaConfig& config);

}  // namespace kiln::model
