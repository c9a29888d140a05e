#include "train/metrics.h"

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace kiln::train {

MetricsFile::MetricsFile(const std::string& path) {
    f_ = std::fopen(path.c_str(), "a");
    if (f_ == nullptr)
        throw error("cannot append to {}: {}", path, std::strerror(errno));
}

MetricsFile::~MetricsFile() {
    if (f_)
        std::fclose(f_);
}

void MetricsFile::write(const StepMetrics& m) {
    nlohmann::ordered_json j;
    j["step"] = m.step;
    j["loss"] = m.loss;
    j["lr"] = m.lr;
    j["grad_norm"] = m.grad_norm;
    j["tokens_per_s"] = m.tokens_per_s;
    j["mfu"] = m.mfu;
    j["elapsed_s"] = m.elapsed_s;
    j["tokens"] = m.tokens;
    j["skipped_steps"] = m.skipped;
    std::string line = j.dump() + "\n";
    std::fwrite(line.data(), 1, line.size(), f_);
    std::fflush(f_);
}

double flops_per_token(const model::LlamaConfig& c, int64_t seq_len) {
    double n_matmul =
        double(c.n_params()) - double(c.vocab_size) * c.dim - double(c.dim) * (2 * c.n_layers + 1);
    return 6.0 * n_matmul + 12.0 * c.n_layers * c.dim * seq_len;
}

}  // namespace kiln::train
