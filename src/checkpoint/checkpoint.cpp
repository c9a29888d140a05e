#include "checkpoint/checkpoint.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/shard.h"

namespace kiln::checkpoint {
namespace {

namespace stdfs = std::filesystem;
const char* kRankFile = "rank-00000.safetensors";

nlohmann::json config_json(const model::LlamaConfig& c) {
    return {{"preset", c.preset},           {"dim", c.dim},
            {"n_layers", c.n_layers},       {"n_heads", c.n_heads},
            {"n_kv_heads", c.n_kv_heads},   {"vocab_size", c.vocab_size},
            {"multiple_of", c.multiple_of}, {"ffn_dim_multiplier", c.ffn_dim_multiplier},
            {"norm_eps", c.norm_eps},       {"rope_theta", c.rope_theta},
            {"max_seq_len", c.max_seq_len}};
}

model::LlamaConfig config_from_json(const nlohmann::json& j) {
    model::LlamaConfig c;
    c.preset = j.at("preset").get<std::string>();
    c.dim = j.at("dim").get<int64_t>();
    c.n_layers = j.at("n_layers").get<int64_t>();
    c.n_heads = j.at("n_heads").get<int64_t>();
    c.n_kv_heads = j.at("n_kv_heads").get<int64_t>();
    c.vocab_size = j.at("vocab_size").get<int64_t>();
    c.multiple_of = j.at("multiple_of").get<int64_t>();
    c.ffn_dim_multiplier = j.at("ffn_dim_multiplier").get<double>();
    c.norm_eps = j.at("norm_eps").get<double>();
    c.rope_theta = j.at("rope_theta").get<double>();
    c.max_seq_len = j.at("max_seq_len").get<int64_t>();
    return c;
}

uint64_t file_xxh64(const std::string& path) {
    fs::MappedFile f(path);
    return data::xxh64_bytes(f.data(), f.size());
}

}  // namespace

std::string save(const RunDir& run, const model::LlamaConfig& config, const model::Layout& layout,
                 const RankTensors& tensors, const TrainState& state, int keep) {
    std::string final_dir = run.checkpoint(state.step);
    std::string tmp_dir = stdfs::path(final_dir).parent_path() /
                          (".tmp-" + stdfs::path(final_dir).filename().string());
    stdfs::remove_all(tmp_dir);
    fs::make_dirs(tmp_dir);

    SafetensorsWriter w;
    for (const auto& p : layout.params()) {
        w.add("param/" + p.name, DType::f32, p.shape, tensors.params + p.offset);
        if (tensors.m)
            w.add("adam_m/" + p.name, DType::f32, p.shape, tensors.m + p.offset);
        if (tensors.v)
            w.add("adam_v/" + p.name, DType::f32, p.shape, tensors.v + p.offset);
    }
    std::string rank_path = tmp_dir + "/" + kRankFile;
    const uint64_t sum = w.write(rank_path);  // hashed while written, not read back

    nlohmann::ordered_json manifest;
    manifest["format"] = "kiln-checkpoint";
    manifest["version"] = 1;
    manifest["step"] = state.step;
    manifest["adam_step"] = state.adam_step;
    manifest["loss"] = state.loss;
    manifest["world_size"] = 1;
    manifest["model"] = config_json(config);
    manifest["files"] = {{{"file", kRankFile},
                          {"bytes", stdfs::file_size(rank_path)},
                          {"xxh64", fmt::format("{:016x}", sum)}}};
    fs::write_file_atomic(tmp_dir + "/manifest.json", manifest.dump(2) + "\n");
    fs::fsync_path(tmp_dir);

    stdfs::remove_all(final_dir);  // a checkpoint of the same step from a run that died later
    stdfs::rename(tmp_dir, final_dir);
    fs::fsync_path(run.checkpoints());
    fs::write_file_atomic(run.latest(), stdfs::path(final_dir).filename().string() + "\n");

    if (keep > 0) {
        std::vector<std::string> steps;
        for (const auto& e : stdfs::directory_iterator(run.checkpoints())) {
            std::string name = e.path().filename().string();
            if (e.is_directory() && name.rfind("step-", 0) == 0)
                steps.push_back(name);
        }
        std::sort(steps.begin(), steps.end());
        for (size_t i = 0; i + keep < steps.size(); i++) {
            stdfs::remove_all(run.checkpoints() + "/" + steps[i]);
        }
    }
    return final_dir;
}

AsyncWriter::~AsyncWriter() {
    if (thread_.joinable())
        thread_.join();
}

void AsyncWriter::stage(const model::Layout& layout, const RankTensors& tensors) {
    KILN_CHECK(!thread_.joinable(), "staging over a checkpoint still being written");
    layout_ = std::make_unique<model::Layout>(layout);
    const size_t n = size_t(layout.total());
    staged_.resize(3 * n);
    std::copy(tensors.params, tensors.params + n, staged_.begin());
    if (tensors.m)
        std::copy(tensors.m, tensors.m + n, staged_.begin() + n);
    if (tensors.v)
        std::copy(tensors.v, tensors.v + n, staged_.begin() + 2 * n);
}

void AsyncWriter::start(const RunDir& run, const model::LlamaConfig& config,
                        const TrainState& state, int keep) {
    const size_t n = size_t(layout_->total());
    const float* base = staged_.data();
    thread_ = std::thread([this, run, config, state, keep, n, base] {
        try {
            auto t0 = std::chrono::steady_clock::now();
            std::string dir =
                save(run, config, *layout_, {base, base + n, base + 2 * n}, state, keep);
            log::info("checkpoint", "{} written in {:.2f} s", dir,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        } catch (...) {
            failure_ = std::current_exception();
        }
    });
}

void AsyncWriter::wait() {
    if (thread_.joinable())
        thread_.join();
    if (failure_) {
        auto f = failure_;
        failure_ = nullptr;
        std::rethrow_exception(f);
    }
}

std::optional<std::string> latest(const RunDir& run) {
    if (!fs::exists(run.latest()))
        return std::nullopt;
    std::string name = fs::read_file(run.latest());
    name.erase(name.find_last_not_of(" \n\r\t") + 1);
    std::string dir = run.checkpoints() + "/" + name;
    if (name.empty() || name.find('/') != std::string::npos || !fs::exists(dir)) {
        throw error("{} names '{}', which is not a checkpoint folder", run.latest(), name);
    }
    return dir;
}

std::unique_ptr<Checkpoint> newest_valid(const RunDir& run) {
    std::vector<std::string> candidates;
    try {
        if (auto l = latest(run))
            candidates.push_back(*l);
    } catch (const Error& e) {
        log::warn("checkpoint", "{}", e.what());
    }
    std::vector<std::string> steps;
    if (stdfs::is_directory(run.checkpoints())) {
        for (const auto& e : stdfs::directory_iterator(run.checkpoints())) {
            std::string name = e.path().filename().string();
            if (e.is_directory() && name.rfind("step-", 0) == 0)
                steps.push_back(e.path().string());
        }
    }
    std::sort(steps.rbegin(), steps.rend());
    candidates.insert(candidates.end(), steps.begin(), steps.end());
    for (const auto& dir : candidates) {
        try {
            return std::make_unique<Checkpoint>(dir);
        } catch (const Error& e) {
            log::warn("checkpoint", "skipping a damaged checkpoint: {}", e.what());
        }
    }
    return nullptr;
}

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
    std::string path = dir + "/manifest.json";
    if (!fs::exists(path)) {
        // A run folder: open its latest checkpoint.
        if (auto l = latest(RunDir{dir})) {
            dir_ = *l;
            path = dir_ + "/manifest.json";
        } else {
            throw error("{} is neither a checkpoint nor a run folder with one", dir);
        }
    }
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(fs::read_file(path));
        if (j.at("format").get<std::string>() != "kiln-checkpoint" || j.at("version") != 1) {
            throw error("{}: not a version-1 kiln checkpoint manifest", path);
        }
        config_ = config_from_json(j.at("model"));
        state_.step = j.at("step").get<int64_t>();
        state_.adam_step = j.at("adam_step").get<int64_t>();
        state_.loss = j.value("loss", 0.0);
        const auto& f = j.at("files").at(0);
        std::string file = dir_ + "/" + f.at("file").get<std::string>();
        uint64_t want = std::stoull(f.at("xxh64").get<std::string>(), nullptr, 16);
        if (!fs::exists(file))
            throw error("{}: missing {}", path, file);
        if (stdfs::file_size(file) != f.at("bytes").get<uint64_t>()) {
            throw error("{} is {} bytes, manifest.json says {}", file, stdfs::file_size(file),
                        f.at("bytes").get<uint64_t>());
        }
        if (file_xxh64(file) != want) {
            throw error("{} is corrupt: its checksum does not match manifest.json", file);
        }
        file_ = std::make_unique<SafetensorsFile>(file);
    } catch (const nlohmann::json::exception& e) {
        throw error("{}: missing or malformed key: {}", path, e.what());
    }
    config_.validate();
}

void Checkpoint::load(const model::Layout& layout, float* params, float* m, float* v) const {
    // The file holds whole tensors; a tensor-parallel layout takes its shard of each.
    for (const auto& p : layout.params()) {
        const std::pair<const char*, float*> parts[] = {
            {"param/", params}, {"adam_m/", m}, {"adam_v/", v}};
        for (const auto& [prefix, dst] : parts) {
            if (dst == nullptr)
                continue;
            const float* src =
                static_cast<const float*>(file_->data(prefix + p.name, DType::f32, p.full_shape));
            layout.shard_from_full(p, src, dst + p.offset);
        }
    }
}

}  // namespace kiln::checkpoint
