#include "train/metrics.h"

#include <cerrno>
#include <cstring>
#include <fstream>
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
    j["compute_s"] = m.compute_s;
    j["wait_s"] = m.wait_s;
    j["reduce_s"] = m.reduce_s;
    j["update_s"] = m.update_s;
    if (m.stage_wait_s > 0)  // pipeline runs only
        j["stage_wait_s"] = m.stage_wait_s;
    std::string line = j.dump() + "\n";
    std::fwrite(line.data(), 1, line.size(), f_);
    std::fflush(f_);
}

std::vector<StepMetrics> read_metrics(const std::string& path) {
    std::vector<StepMetrics> out;
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (!j.is_object() || !j.contains("step"))
            continue;
        StepMetrics m;
        m.step = j["step"].get<int64_t>();
        m.loss = j.value("loss", 0.0);
        m.lr = j.value("lr", 0.0);
        m.grad_norm = j.value("grad_norm", 0.0);
        m.tokens_per_s = j.value("tokens_per_s", 0.0);
        m.mfu = j.value("mfu", 0.0);
        m.elapsed_s = j.value("elapsed_s", 0.0);
        m.tokens = j.value("tokens", int64_t(0));
        m.skipped = j.value("skipped_steps", int64_t(0));
        m.compute_s = j.value("compute_s", 0.0);
        m.wait_s = j.value("wait_s", 0.0);
        m.reduce_s = j.value("reduce_s", 0.0);
        m.update_s = j.value("update_s", 0.0);
        m.stage_wait_s = j.value("stage_wait_s", 0.0);
        out.push_back(m);
    }
    return out;
}

double flops_per_token(const model::LlamaConfig& c, int64_t seq_len) {
    double n_matmul =
        double(c.n_params()) - double(c.vocab_size) * c.dim - double(c.dim) * (2 * c.n_layers + 1);
    return 6.0 * n_matmul + 12.0 * c.n_layers * c.dim * seq_len;
}

}  // namespace kiln::train
