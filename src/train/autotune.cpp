#include "train/autotune.h"

#include <chrono>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "core/fs.h"
#include "core/progress.h"

namespace kiln::train {
namespace {

using json = nlohmann::ordered_json;
constexpr const char* kFormat = "kiln-plan/1";

// What a plan holds for: anything that changes the products' shapes or their speed.
json plan_key(const RunConfig& cfg, const kernels::Kernels& k, int dp, int pp_rank) {
    const model::LlamaConfig& m = cfg.model;
    json layout = {{"tp", cfg.tp},
                   {"dp", dp},
                   {"micro_batch", cfg.train.micro_batch},
                   {"seq_len", cfg.train.seq_len},
                   {"recompute", cfg.train.recompute}};
    if (cfg.pp > 1) {  // stages run different products: each has its own plan
        layout["pp"] = cfg.pp;
        layout["stage"] = pp_rank;
    }
    if (cfg.sp)
        layout["sp"] = true;
    return {{"platform", k.platform()},
            {"backend", k.name},
            {"model",
             {{"dim", m.dim},
              {"n_layers", m.n_layers},
              {"n_heads", m.n_heads},
              {"n_kv_heads", m.n_kv_heads},
              {"ffn_dim", m.ffn_dim()},
              {"vocab_size", m.vocab_size}}},
            {"layout", layout}};
}

// The plan in `path` when it was made for `key`; otherwise nothing, and `why` says what is
// wrong with it ("" when there is no file).
std::optional<kernels::Plan> read_plan(const std::string& path, const json& key, std::string* why) {
    if (!fs::exists(path))
        return std::nullopt;
    json file;
    try {
        file = json::parse(fs::read_file(path), nullptr, false);
    } catch (const Error& e) {
        *why = e.what();
        return std::nullopt;
    }
    if (!file.is_object() || file.value("format", "") != kFormat || !file.contains("key") ||
        !file.contains("choices") || !file["choices"].is_object()) {
        *why = "not a " + std::string(kFormat) + " file";
        return std::nullopt;
    }
    for (const auto& [field, want] : key.items()) {
        const json& got = file["key"].contains(field) ? file["key"][field] : json();
        if (got != want) {
            *why = fmt::format("made for {} {}, this run has {}", field, got.dump(), want.dump());
            return std::nullopt;
        }
    }
    kernels::Plan plan;
    for (const auto& [shape, choice] : file["choices"].items()) {
        if (!choice.is_string()) {
            *why = "choice for " + shape + " is not a string";
            return std::nullopt;
        }
        plan[shape] = choice.get<std::string>();
    }
    return plan;
}

// Every rank's bytes, gathered: chunk r of the result is rank r's.
std::vector<std::string> gather_strings(Collective& world, const std::string& mine) {
    std::vector<uint64_t> sizes(size_t(world.size()), 0);
    sizes[size_t(world.rank())] = mine.size();
    world.all_gather_bytes(sizes.data(), sizeof(uint64_t));
    uint64_t chunk = 1;
    for (uint64_t s : sizes)
        chunk = std::max(chunk, s);
    std::vector<char> buf(chunk * size_t(world.size()), '\0');
    std::copy(mine.begin(), mine.end(), buf.begin() + ptrdiff_t(chunk * world.rank()));
    world.all_gather_bytes(buf.data(), chunk);
    std::vector<std::string> all;
    for (int r = 0; r < world.size(); r++)
        all.emplace_back(buf.data() + chunk * r, sizes[size_t(r)]);
    return all;
}

}  // namespace

std::string plan_cache_dir(const RunConfig& cfg) {
    if (!cfg.train.plan_cache.empty())
        return cfg.train.plan_cache;
    return fs::cache_dir() + "/plans";
}

AutotuneResult autotune(const RunConfig& cfg, const kernels::Kernels& k, model::Llama& model,
                        Collective& world, int dp, const std::function<void()>& progress) {
    AutotuneResult r;
    if (!cfg.train.autotune || k.platform == nullptr || k.tune == nullptr) {
        r.outcome = "off";
        return r;
    }
    const json key = plan_key(cfg, k, dp, model.layout().pp_rank);
    const std::string text = key.dump();
    const uint64_t key_hash = fs::xxh64(text.data(), text.size());
    const std::string dir = plan_cache_dir(cfg);
    r.path = fmt::format("{}/{}-{:016x}.json", dir, cfg.model.preset, key_hash);
    std::optional<kernels::Plan> plan = read_plan(r.path, key, &r.why);
    // All ranks tune, or none: the throwaway pass is collective.
    double misses = plan ? 0 : 1;
    world.all_reduce_sum(&misses, 1);
    if (misses == 0) {
        r.outcome = "hit";
        r.products = int(plan->size());
        k.use(*plan);
        return r;
    }
    r.outcome = r.why.empty() ? "miss" : "ignored";

    // Ranks on the same platform split the shapes between them; otherwise each tunes its own.
    std::vector<uint64_t> keys(size_t(world.size()), 0);
    keys[size_t(world.rank())] = key_hash;
    world.all_gather_bytes(keys.data(), sizeof(uint64_t));
    bool same = true;
    for (uint64_t h : keys)
        same = same && h == key_hash;

    auto start = std::chrono::steady_clock::now();
    const int64_t B = cfg.train.micro_batch, T = cfg.train.seq_len;
    std::vector<int32_t> tokens(size_t(B * T)), targets(size_t(B * T));
    for (int64_t i = 0; i < B * T; i++) {
        tokens[size_t(i)] = int32_t((i * 7919 + 13) % cfg.model.vocab_size);
        targets[size_t(i)] =
            (i % T) + 1 < T ? int32_t(((i + 1) * 7919 + 13) % cfg.model.vocab_size) : -1;
    }
    // A pipeline stage's pass on its own: zero input and output gradient, no neighbours.
    std::vector<float> zeros(size_t(model.rows() * cfg.model.dim), 0.0f);
    auto pass = [&](model::Grads mode) {
        if (cfg.pp == 1) {
            model.forward_backward(tokens.data(), targets.data(), 1.0f, mode);
            return;
        }
        model.forward(0, tokens.data(), zeros.data());
        if (model.layout().last_stage())
            model.loss(targets.data(), 1.0f, mode);
        model.backward(0, zeros.data(), mode);
    };
    k.tune(same ? world.rank() : 0, same ? world.size() : 1);
    // Passes go on until every rank is done (tensor-parallel passes are collective).
    double more = 0;
    do {
        // A step's products: its first micro-batch writes the weight gradients, the others
        // add to them (other products, tuned apart).
        pass(model::Grads::overwrite);
        if (cfg.train.grad_accum > 1)
            pass(model::Grads::accumulate);
        r.passes++;
        progress();
        more = k.tune_next() ? 1 : 0;
        world.all_reduce_sum(&more, 1);
    } while (more > 0);
    model.take_loss();  // the passes' losses are meaningless, and not the first step's
    kernels::Plan mine = k.tuned();
    r.tuned_here = int(mine.size());
    kernels::Plan merged = mine;
    if (same) {  // the same on every rank, so the gather is skipped by all or none
        for (const std::string& share : gather_strings(world, json(mine).dump())) {
            const json theirs = json::parse(share);  // items() only views it
            for (const auto& [shape, choice] : theirs.items())
                merged[shape] = choice.get<std::string>();
        }
    }
    k.use(merged);
    r.products = int(merged.size());
    r.seconds = seconds_since(start);
    if (world.rank() == 0 || !same) {
        json file = {{"format", kFormat},
                     {"key", key},
                     {"choices", json(merged)},
                     {"tuned_s", r.seconds},
                     {"tuned_by_ranks", same ? world.size() : 1},
                     {"created", unix_seconds()}};
        try {
            fs::make_dirs(dir);
            fs::write_file_atomic(r.path, file.dump(2) + "\n");
        } catch (const Error& e) {
            r.write_error = e.what();  // the run goes on with the plan; the next one tunes again
        }
    }
    return r;
}

}  // namespace kiln::train
