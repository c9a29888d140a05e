#pragma once
// Text from a checkpoint: the model continues a prompt one token at a time, each drawn from the
// softmax of its logits at `temperature`, among the `top_k` likeliest (0: all).
#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace kiln::train {

struct SampleOptions {
    int64_t tokens = 64;       // new tokens at most
    double temperature = 0.8;  // 0: always the likeliest
    int64_t top_k = 40;
    uint64_t seed = 1;
};

class Sampler {
public:
    // A checkpoint or run folder; precision and backend as train.precision (auto, bf16, fp32)
    // and train.backend (cpu, reference, cuda).
    explicit Sampler(const std::string& checkpoint, const std::string& precision = "auto",
                     const std::string& backend = "cpu");
    ~Sampler();
    // The prompt's ids (BOS first) followed by the new ones; stops after `eos` when it is drawn.
    std::vector<int32_t> continue_(std::vector<int32_t> prompt, const SampleOptions& options,
                                   int32_t eos) const;
    // `prompt` continued, as text: BOS + its tokens, continued, decoded without BOS or a final EOS.
    std::string text(const data::Tokenizer& tokenizer, const std::string& prompt,
                     const SampleOptions& options) const;
    int64_t vocab_size() const;

private:
    struct Impl;
    Impl* impl_;
};

}  // namespace kiln::train
