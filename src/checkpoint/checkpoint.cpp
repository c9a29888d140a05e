#include "checkpoint/checkpoint.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/threads.h"

namespace kiln::checkpoint {
namespace {

namespace stdfs = std::filesystem;

nlohmann::json config_json(const model::LlamaConfig& c) {
    return {{"preset", c.preset},           {"dim", c.dim},
            {"n_layers", c.n_layers},       {"n_heads", c.n_heads},
            {"n_kv_heads", c.n_kv_heads},   {"vocab_size", c.vocab_size},
            {"multiple_of", c.multiple_of}, {"ffn_dim_multiplier", c.ffn_dim_multiplier},
            {"norm_eps", c.norm_eps},       {"rope_theta", c.rope_theta},
            {"max_seq_len", c.max_seq_len}};
}

// j[key] as a whole number in [lo, hi]. Asked for an integer, the JSON library converts a float
// or an out-of-range value with undefined behaviour (1e20 as n_layers).
int64_t whole(const nlohmann::json& j, const char* key, const std::string& path,
              int64_t lo = INT64_MIN, int64_t hi = INT64_MAX) {
    const nlohmann::json& v = j.at(key);
    const bool integer =
        v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > INT64_MAX);
    if (!integer || v.get<int64_t>() < lo || v.get<int64_t>() > hi)
        throw error("{}: {} {} is not a whole number from {} to {}", path, key,
                    v.is_primitive() ? v.dump().substr(0, 40) : std::string(v.type_name()), lo, hi);
    return v.get<int64_t>();
}

model::LlamaConfig config_from_json(const nlohmann::json& j, const std::string& path) {
    model::LlamaConfig c;
    c.preset = j.at("preset").get<std::string>();
    c.dim = whole(j, "dim", path);
    c.n_layers = whole(j, "n_layers", path);
    c.n_heads = whole(j, "n_heads", path);
    c.n_kv_heads = whole(j, "n_kv_heads", path);
    c.vocab_size = whole(j, "vocab_size", path);
    c.multiple_of = whole(j, "multiple_of", path);
    c.ffn_dim_multiplier = j.at("ffn_dim_multiplier").get<double>();
    c.norm_eps = j.at("norm_eps").get<double>();
    c.rope_theta = j.at("rope_theta").get<double>();
    c.max_seq_len = whole(j, "max_seq_len", path);
    return c;
}

// The complete checkpoint folders of a run (step-*, never .tmp-*), oldest first.
std::vector<std::string> step_dirs(const RunDir& run) {
    std::vector<std::string> steps;
    if (!stdfs::is_directory(run.checkpoints()))
        return steps;
    for (const auto& e : stdfs::directory_iterator(run.checkpoints())) {
        std::string name = e.path().filename().string();
        if (e.is_directory() && name.rfind("step-", 0) == 0)
            steps.push_back(e.path().string());
    }
    std::sort(steps.begin(), steps.end());  // 8-digit step numbers sort as text
    return steps;
}

}  // namespace

std::string temporary_dir(const RunDir& run, int64_t step) {
    return run.checkpoints() + "/.tmp-" + stdfs::path(run.checkpoint(step)).filename().string();
}

void prepare_temporary_dir(const RunDir& run, int64_t step) {
    stdfs::remove_all(temporary_dir(run, step));
    fs::make_dirs(temporary_dir(run, step));
}

RankWriter::~RankWriter() {
    if (thread_.joinable())
        thread_.join();
}

void RankWriter::stage(const model::Layout& layout, const RankPlace& place, const RankTensors& t) {
    KILN_CHECK(!thread_.joinable(), "staging over a checkpoint still being written");
    place_ = place;
    begin_ = t.begin, end_ = t.end;
    n_params_ = place.dp_rank == 0 ? layout.total() : 0;
    const int64_t range = end_ - begin_;
    const int64_t n = n_params_ + 2 * range;
    if (n > staged_capacity_) {
        if (t.staging) {
            pinned_ = std::make_unique<Arena>("checkpoint staging", *t.staging);
            pinned_->add("tensors", n, DType::f32);
            pinned_->allocate();
            staged_ = pinned_->get<float>(0);
        } else {
            plain_.reset(new float[size_t(n)]);
            staged_ = plain_.get();
        }
        staged_capacity_ = n;
    }
    // Training waits for this copy, so host memory is copied on the threads the steps use.
    float* dst = staged_;
    const float* parts[3] = {t.params, t.m, t.v};
    const int64_t sizes[3] = {n_params_, range, range};
    for (int i = 0; i < 3; i++) {
        if (t.copy) {
            t.copy(dst, parts[i], size_t(sizes[i]) * sizeof(float));
        } else {
            parallel_range(sizes[i], 1 << 20, [&, src = parts[i]](int64_t i0, int64_t i1) {
                std::memcpy(dst + i0, src + i0, size_t(i1 - i0) * sizeof(float));
            });
        }
        dst += sizes[i];
    }
}

void RankWriter::start(const RunDir& run, int64_t step) {
    std::string path =
        fmt::format("{}/rank-{:05d}.safetensors", temporary_dir(run, step), place_.rank);
    done_ = false;
    thread_ = std::thread([this, path] {
        // Training keeps the cores busy; the writer yields to it (nice 10 weighs about a tenth
        // of a training thread), so it stalls the OpenMP workers less often. It has until the
        // next checkpoint to finish.
        ::setpriority(PRIO_PROCESS, pid_t(::syscall(SYS_gettid)), 10);
        try {
            auto t0 = std::chrono::steady_clock::now();
            const int64_t range = end_ - begin_;
            const float* base = staged_;
            SafetensorsWriter w;
            if (n_params_ > 0)
                w.add("param", DType::f32, {n_params_}, base);
            w.add("adam_m", DType::f32, {range}, base + n_params_);
            w.add("adam_v", DType::f32, {range}, base + n_params_ + range);
            w.set_metadata("rank", std::to_string(place_.rank));
            uint64_t sum = w.write(path);  // hashed while written, not read back
            written_ = {stdfs::path(path).filename().string(), stdfs::file_size(path), sum};
            log::info("checkpoint", "{} written in {:.2f} s", path, seconds_since(t0));
        } catch (...) {
            failure_ = std::current_exception();
        }
        done_ = true;
    });
}

RankFile RankWriter::finish() {
    if (thread_.joinable())
        thread_.join();
    if (failure_) {
        auto f = failure_;
        failure_ = nullptr;
        std::rethrow_exception(f);
    }
    return written_;
}

std::string commit(const RunDir& run, const model::LlamaConfig& config, const TrainState& state,
                   const RankPlace& layout, bool zero, const std::vector<RankFile>& files,
                   int keep) {
    const std::string final_dir = run.checkpoint(state.step);
    const std::string tmp_dir = temporary_dir(run, state.step);
    nlohmann::ordered_json manifest;
    manifest["format"] = "kiln-checkpoint";
    manifest["version"] = 2;
    manifest["step"] = state.step;
    manifest["adam_step"] = state.adam_step;
    manifest["loss"] = state.loss;
    manifest["model"] = config_json(config);
    manifest["layout"] = {{"world", layout.world},
                          {"tp", layout.tp},
                          {"pp", layout.pp},
                          {"dp", layout.dp},
                          {"zero", zero}};
    manifest["files"] = nlohmann::json::array();
    for (int r = 0; r < layout.world; r++) {
        // The grid's rank order (dist/communicator.h): TP innermost, then PP, then DP.
        const int tp_rank = r % layout.tp, pp_rank = r / layout.tp % layout.pp,
                  dp_rank = r / (layout.tp * layout.pp);
        const int64_t local_total =
            model::Layout(config, layout.tp, tp_rank, layout.pp, pp_rank).total();
        const int64_t chunk = (local_total + layout.dp - 1) / layout.dp;
        // ZeRO-1: each DP rank holds its shard; otherwise DP rank 0 saves the replicated whole.
        int64_t begin = zero ? dp_rank * chunk : 0;
        int64_t end =
            zero ? std::min(local_total, (dp_rank + 1) * chunk) : (dp_rank == 0 ? local_total : 0);
        manifest["files"].push_back({{"file", files[r].file},
                                     {"rank", r},
                                     {"tp_rank", tp_rank},
                                     {"pp_rank", pp_rank},
                                     {"dp_rank", dp_rank},
                                     {"params", dp_rank == 0},
                                     {"moments", {begin, end}},
                                     {"bytes", files[r].bytes},
                                     {"xxh64", fmt::format("{:016x}", files[r].xxh64)}});
    }
    fs::write_file_atomic(tmp_dir + "/manifest.json", manifest.dump(2) + "\n");
    fs::fsync_path(tmp_dir);

    stdfs::remove_all(final_dir);  // a checkpoint of the same step from a run that died later
    stdfs::rename(tmp_dir, final_dir);
    fs::fsync_path(run.checkpoints());
    fs::write_file_atomic(run.latest(), stdfs::path(final_dir).filename().string() + "\n");

    if (keep > 0) {
        std::vector<std::string> steps = step_dirs(run);
        for (size_t i = 0; i + keep < steps.size(); i++)
            stdfs::remove_all(steps[i]);
    }
    return final_dir;
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
    std::vector<std::string> steps = step_dirs(run);
    for (auto it = steps.rbegin(); it != steps.rend(); ++it) {  // newest first
        if (candidates.empty() || *it != candidates.front())    // `latest` is tried once
            candidates.push_back(*it);
    }
    std::string newest_damage;
    for (const auto& dir : candidates) {
        try {
            return std::make_unique<Checkpoint>(dir);
        } catch (const Error& e) {
            log::warn("checkpoint", "skipping a damaged checkpoint: {}", e.what());
            if (newest_damage.empty())
                newest_damage = e.what();
        }
    }
    // Checkpoints that are all damaged are not a fresh run: starting over from step 0 would
    // overwrite them, and with them whatever a repair could still recover.
    if (!candidates.empty()) {
        throw error(
            "every checkpoint in {} is damaged ({} of them; the newest: {}); restore a good "
            "checkpoint there, or move {} aside to start over, or use another run.dir",
            run.root, candidates.size(), newest_damage, run.checkpoints());
    }
    return nullptr;
}

Checkpoint::~Checkpoint() = default;

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
    try {
        nlohmann::json j = nlohmann::json::parse(fs::read_file(path));
        if (j.at("format").get<std::string>() != "kiln-checkpoint" || j.at("version") != 2) {
            throw error("{}: not a version-2 kiln checkpoint manifest", path);
        }
        config_ = config_from_json(j.at("model"), path);
        state_.step = whole(j, "step", path, 0);
        state_.adam_step = whole(j, "adam_step", path, 0);
        state_.loss = j.value("loss", 0.0);
        // Every field is checked against the model it describes before any file is read by it:
        // a shifted range or a forged split must be an error, never a read out of bounds.
        const int64_t tp = whole(j.at("layout"), "tp", path);
        if (tp < 1 || tp > 65536)
            throw error("{}: layout.tp={} is not a tensor-parallel size", path, tp);
        saved_tp_ = int(tp);
        config_.validate(saved_tp_);
        // Checkpoints from before pipeline parallelism have no pp: one stage.
        const nlohmann::json& layout = j.at("layout");
        const int64_t pp = layout.contains("pp") ? whole(layout, "pp", path) : 1;
        if (pp < 1 || pp > config_.n_layers)
            throw error("{}: layout.pp={} is not a pipeline of the model's {} layers", path, pp,
                        config_.n_layers);
        saved_pp_ = int(pp);
        for (const auto& f : j.at("files")) {
            File file;
            file.place.rank = int(whole(f, "rank", path, 0, INT32_MAX));
            file.place.tp_rank = int(whole(f, "tp_rank", path, 0, INT32_MAX));
            file.place.pp_rank =
                f.contains("pp_rank") ? int(whole(f, "pp_rank", path, 0, INT32_MAX)) : 0;
            file.place.dp_rank = int(whole(f, "dp_rank", path, 0, INT32_MAX));
            file.has_params = f.at("params").get<bool>();
            const nlohmann::json& moments = f.at("moments");
            file.begin = whole({{"moments[0]", moments.at(0)}}, "moments[0]", path);
            file.end = whole({{"moments[1]", moments.at(1)}}, "moments[1]", path);
            if (file.place.tp_rank < 0 || file.place.tp_rank >= saved_tp_)
                throw error("{}: a file's tp_rank {} is outside layout.tp={}", path,
                            file.place.tp_rank, saved_tp_);
            if (file.place.pp_rank >= saved_pp_)
                throw error("{}: a file's pp_rank {} is outside layout.pp={}", path,
                            file.place.pp_rank, saved_pp_);
            const int64_t total = saved_layout(file.place.pp_rank, file.place.tp_rank).total();
            if (file.begin < 0 || file.end < file.begin || file.end > total)
                throw error("{}: a file's moments [{}, {}) lie outside the model's {} values", path,
                            file.begin, file.end, total);
            std::string name = f.at("file").get<std::string>();
            if (name.empty() || name[0] == '.' || name.find('/') != std::string::npos) {
                throw error("{}: file name '{}' must be a plain name in the folder", path, name);
            }
            std::string full = dir_ + "/" + name;
            const std::string hex = f.at("xxh64").get<std::string>();
            const std::optional<uint64_t> want = fs::parse_xxh64(hex);
            if (!want)
                throw error("{}: xxh64 \"{}\" is not 16 hexadecimal digits", path,
                            hex.substr(0, 40));
            std::error_code ec;
            if (!stdfs::is_regular_file(full, ec))
                throw error("{}: {} is missing or not a file", path, full);
            const uint64_t bytes = uint64_t(whole(f, "bytes", path, 0));
            if (stdfs::file_size(full, ec) != bytes)
                throw error("{} is {} bytes, manifest.json says {}", full,
                            stdfs::file_size(full, ec), bytes);
            if (fs::xxh64_file(full) != *want) {
                throw error("{} is corrupt: its checksum does not match manifest.json", full);
            }
            file.st = std::make_unique<SafetensorsFile>(full);
            files_.push_back(std::move(file));
        }
    } catch (const nlohmann::json::exception& e) {
        throw error("{}: missing or malformed key: {}", path, e.what());
    }
    // Each saved shard's moments must tile it exactly once, and one file must hold its
    // parameters.
    for (int stage = 0; stage < saved_pp_; stage++)
        for (int t = 0; t < saved_tp_; t++) {
            const int64_t total = saved_layout(stage, t).total();
            std::vector<std::pair<int64_t, int64_t>> ranges;
            int params = 0;
            for (const auto& f : files_) {
                if (f.place.tp_rank != t || f.place.pp_rank != stage)
                    continue;
                params += f.has_params;
                if (f.end > f.begin)
                    ranges.emplace_back(f.begin, f.end);
            }
            std::sort(ranges.begin(), ranges.end());
            int64_t at = 0;
            bool tiled = true;
            for (const auto& [b, e] : ranges) {
                tiled = tiled && b == at;
                at = e;
            }
            if (params != 1 || !tiled || at != total)
                throw error(
                    "{}/manifest.json: the files of pipeline stage {}, tensor-parallel rank {} do "
                    "not hold its state exactly once",
                    dir_, stage, t);
        }
}

model::Layout Checkpoint::saved_layout(int pp_rank, int tp_rank) const {
    return model::Layout(config_, saved_tp_, tp_rank, saved_pp_, pp_rank);
}

const float* Checkpoint::saved_params(const model::Layout& saved) const {
    for (const auto& f : files_) {
        if (f.place.tp_rank == saved.tp_rank && f.place.pp_rank == saved.pp_rank && f.has_params)
            return static_cast<const float*>(f.st->data("param", DType::f32, {saved.total()}));
    }
    KILN_CHECK(false, "the constructor checked that stage {}, tp_rank {} has a parameter file",
               saved.pp_rank, saved.tp_rank);
    return nullptr;
}

void Checkpoint::assemble(const model::Layout& saved, std::vector<float>& params,
                          std::vector<float>& m, std::vector<float>& v) const {
    const int64_t n = saved.total();
    const float* p = saved_params(saved);
    params.assign(p, p + n);
    m.assign(size_t(n), 0.0f);
    v.assign(size_t(n), 0.0f);
    int64_t covered = 0;
    for (const auto& f : files_) {
        if (f.place.tp_rank != saved.tp_rank || f.place.pp_rank != saved.pp_rank)
            continue;
        const int64_t range = f.end - f.begin;
        if (range <= 0)
            continue;
        const float* fm = static_cast<const float*>(f.st->data("adam_m", DType::f32, {range}));
        const float* fv = static_cast<const float*>(f.st->data("adam_v", DType::f32, {range}));
        std::copy(fm, fm + range, m.begin() + f.begin);
        std::copy(fv, fv + range, v.begin() + f.begin);
        covered += range;
    }
    if (covered != n) {
        throw error(
            "{}: the files of pipeline stage {}, tensor-parallel rank {} do not hold its "
            "whole state",
            dir_, saved.pp_rank, saved.tp_rank);
    }
}

void Checkpoint::load(const model::Layout& now, float* params, float* m, float* v, int64_t begin,
                      int64_t end, CopyFn copy) const {
    std::vector<float> sp, sm, sv;  // one saved shard's buffers
    if (saved_tp_ == now.tp && saved_pp_ == now.pp) {
        // The same split: this rank's shard was written as one piece.
        assemble(saved_layout(now.pp_rank, now.tp_rank), sp, sm, sv);
    } else {
        // Another split: whole tensors first, found by name, then this layout's shard of each.
        model::Layout whole(config_);
        std::vector<float> wp(whole.total()), wm(whole.total()), wv(whole.total());
        for (int stage = 0; stage < saved_pp_; stage++)
            for (int t = 0; t < saved_tp_; t++) {
                const model::Layout saved = saved_layout(stage, t);
                assemble(saved, sp, sm, sv);
                for (const auto& p : saved.params()) {
                    const int64_t dst = whole.find(p.name)->offset;
                    saved.full_from_shard(p, sp.data() + p.offset, t, wp.data() + dst);
                    saved.full_from_shard(p, sm.data() + p.offset, t, wm.data() + dst);
                    saved.full_from_shard(p, sv.data() + p.offset, t, wv.data() + dst);
                }
            }
        sp.assign(now.total(), 0.0f), sm.assign(now.total(), 0.0f), sv.assign(now.total(), 0.0f);
        for (const auto& p : now.params()) {
            const int64_t off = whole.find(p.name)->offset;
            now.shard_from_full(p, wp.data() + off, sp.data() + p.offset);
            now.shard_from_full(p, wm.data() + off, sm.data() + p.offset);
            now.shard_from_full(p, wv.data() + off, sv.data() + p.offset);
        }
    }
    auto put = [copy](float* dst, const float* src, int64_t n) {
        if (copy)
            copy(dst, src, size_t(n) * sizeof(float));
        else
            std::copy(src, src + n, dst);
    };
    put(params, sp.data(), now.total());
    if (m)
        put(m, sm.data() + begin, end - begin);
    if (v)
        put(v, sv.data() + begin, end - begin);
}

void Checkpoint::read_tensor(const model::ParamInfo& p, float* full) const {
    bool found = false;
    for (int stage = 0; stage < saved_pp_; stage++)
        for (int t = 0; t < saved_tp_; t++) {
            const model::Layout saved = saved_layout(stage, t);
            const model::ParamInfo* sp = saved.find(p.name);
            if (!sp)
                continue;  // another stage's
            KILN_CHECK(sp->full_shape == p.full_shape, "{} has another shape in {}", p.name, dir_);
            saved.full_from_shard(*sp, saved_params(saved) + sp->offset, t, full);
            found = true;
        }
    KILN_CHECK(found, "{} is not a parameter of this model", p.name);
}

}  // namespace kiln::checkpoint
