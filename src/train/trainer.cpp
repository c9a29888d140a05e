#include "train/trainer.h"

#include <fcntl.h>
#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/threads.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "dist/communicator.h"
#include "dist/env.h"
#include "kernels/backends.h"
#include "kernels/replays.h"
#include "model/llama.h"
#include "optim/adamw.h"
#include "train/autotune.h"
#include "train/grad_reduce.h"
#include "train/memory.h"
#include "train/metrics.h"
#include "train/pipeline.h"

namespace kiln::train {
namespace {

using Clock = std::chrono::steady_clock;

// Tells a supervisor (kiln launch) that this rank is making progress: KILN_HEARTBEAT_DIR/rank-N
// is rewritten at every step; its time is the heartbeat.
void heartbeat(int rank, int64_t step) {
    static const char* dir = std::getenv("KILN_HEARTBEAT_DIR");
    if (dir == nullptr)
        return;
    std::string path = fmt::format("{}/rank-{}", dir, rank);
    if (std::FILE* f = std::fopen(path.c_str(), "w")) {
        std::fprintf(f, "%d %lld\n", int(::getpid()), static_cast<long long>(step));
        std::fclose(f);
    }
}

void write_status(const checkpoint::RunDir& run, const std::string& state, int64_t step,
                  int64_t steps, double loss, const std::string& message = "") {
    nlohmann::ordered_json j;
    j["state"] = state;
    j["step"] = step;
    j["steps"] = steps;
    j["loss"] = loss;
    const char* restarts = std::getenv("KILN_RESTARTS");  // set by kiln launch
    j["restarts"] = restarts ? std::atoi(restarts) : 0;
    j["pid"] = static_cast<int64_t>(::getpid());
    j["host"] = host_name();
    j["updated"] = unix_seconds();
    if (!message.empty())
        j["message"] = message;
    fs::write_file_replace(run.status(), j.dump(2) + "\n");
}

// Touches status.json every checkpoint::kHeartbeatSeconds while the trainer lives, from a thread
// of its own, so that no long step, checkpoint or tuning pass reads as death to whoever watches
// the run folder (checkpoint::live_state).
class StatusHeartbeat {
public:
    explicit StatusHeartbeat(std::string path)
        : path_(std::move(path)), thread_([this] { beat(); }) {}
    ~StatusHeartbeat() {
        {
            std::lock_guard lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        thread_.join();
    }

private:
    void beat() {
        const auto period = std::chrono::duration<double>(checkpoint::kHeartbeatSeconds);
        std::unique_lock lock(mutex_);
        while (!wake_.wait_for(lock, period, [this] { return stop_; }))
            ::utimensat(AT_FDCWD, path_.c_str(), nullptr, 0);
    }
    std::string path_;
    std::mutex mutex_;
    std::condition_variable wake_;
    bool stop_ = false;
    std::thread thread_;  // last: starts once the members above exist
};

// ranks/rank-N.json: this rank's step, time and memory, for the dashboard; after a step, that
// step's forward and backward time, which tells the rank a straggler's peers wait for.
void write_rank_status(const checkpoint::RunDir& run, const dist::Grid& g, int64_t step,
                       std::optional<double> compute_s = std::nullopt,
                       std::optional<double> stage_wait_s = std::nullopt) {
    int64_t rss = 0, peak = 0;
    if (std::FILE* f = std::fopen("/proc/self/status", "r")) {
        char line[256];
        while (std::fgets(line, sizeof line, f)) {
            long long kib = 0;
            if (std::sscanf(line, "VmRSS: %lld kB", &kib) == 1)
                rss = kib * 1024;
            else if (std::sscanf(line, "VmHWM: %lld kB", &kib) == 1)
                peak = kib * 1024;
        }
        std::fclose(f);
    }
    nlohmann::ordered_json j;
    j["rank"] = g.rank;
    j["dp_rank"] = g.dp_rank;
    j["tp_rank"] = g.tp_rank;
    j["pp_rank"] = g.pp_rank;
    j["step"] = step;
    j["pid"] = static_cast<int64_t>(::getpid());
    j["updated"] = unix_seconds();
    j["rss_bytes"] = rss;
    j["peak_rss_bytes"] = peak;
    if (compute_s)
        j["compute_s"] = *compute_s;
    if (stage_wait_s)  // of compute_s, the time this pipeline stage waited for its neighbours
        j["stage_wait_s"] = *stage_wait_s;
    fs::write_file_replace(run.rank_status(g.rank), j.dump() + "\n");
}

}  // namespace

double measure_peak_gflops(const std::string& backend, kernels::Precision p) {
    // The products alone: operands already in the compute precision (as a step's bf16 weights
    // are), so that no rounding of them is timed; 1024 square, whose bf16 operands stay in a
    // core's L2 (2048 square measured ~20% lower on one core); the best of several runs after
    // one that builds the kernel. A GPU runs 4096 square (1024 is over before its launch costs
    // less than the product), and each product's time ends when its result is read back.
    const kernels::Kernels& k = kernels::select_kernels(backend, p);
    const bool device = k.memory != &host_memory;
    const int64_t n = backend == "reference" ? 256 : device ? 4096 : 1024;
    const bool bf16 = p == kernels::Precision::bf16;
    const DType type = bf16 ? DType::bf16 : DType::f32;
    // Operands in the backend's memory, filled from the host.
    Arena mem("peak measurement", *k.memory);
    const size_t a_at = mem.add("a", n * n, type), b_at = mem.add("b", n * n, type);
    const size_t c_at = mem.add("c", n * n, DType::f32);
    const size_t ws_bytes = k.workspace_bytes(n * n, kernels::Attention{});
    const size_t ws_at = mem.add("workspace", int64_t(ws_bytes + 1) / 2, DType::u16);
    mem.allocate();
    for (auto [at, value] : {std::pair{a_at, 0.5f}, std::pair{b_at, 0.25f}}) {
        std::vector<float> x(size_t(n * n), value);
        std::vector<uint16_t> x16(bf16 ? x.size() : 0);
        if (bf16)
            convert_f32_to_bf16(x16.data(), x.data(), int64_t(x.size()));
        k.copy(mem.get<void>(at), bf16 ? static_cast<void*>(x16.data()) : x.data(),
               x.size() * dtype_size(type));
    }
    kernels::Gemm g;
    g.M = g.N = g.K = n;
    g.a = mem.get<void>(a_at), g.b = mem.get<void>(b_at), g.c = mem.get<float>(c_at);
    g.a_type = g.b_type = type;
    g.lda = g.ldb = g.ldc = n;
    double best = 0;
    const auto start = Clock::now();
    for (int rep = 0; rep < 6 || (rep < 200 && seconds_since(start) < 0.25); rep++) {
        auto t0 = Clock::now();
        k.gemm(g, {mem.get<void>(ws_at), ws_bytes});
        if (device) {  // a copy to the host waits for the product
            float corner = 0;
            k.copy(&corner, g.c, sizeof(corner));
        }
        if (rep > 0)
            best = std::max(best, 2.0 * double(n * n * n) / seconds_since(t0) / 1e9);
    }
    // On shared cores one quarter-second can fall entirely in someone else's work, which would
    // read as a low peak and an MFU near or over 100%. So the peak is the best this machine has
    // shown for this platform (CPU, threads, library) and precision, kept in the cache folder.
    const std::string key = fmt::format("{}; {}", k.platform ? k.platform() : std::string(backend),
                                        bf16 ? "bf16" : "fp32");
    const std::string path =
        fmt::format("{}/peaks/{:016x}.json", fs::cache_dir(), fs::xxh64(key.data(), key.size()));
    double seen = 0;
    if (fs::exists(path)) {
        auto j = nlohmann::json::parse(fs::read_file(path, 4096), nullptr, false);
        if (j.is_object() && j.value("platform", "") == key && j["gflops"].is_number())
            seen = j["gflops"].get<double>();
    }
    if (best > seen) {
        try {
            fs::make_dirs(fs::cache_dir() + "/peaks");
            const std::string tmp = path + "." + std::to_string(::getpid());
            fs::write_file_replace(tmp, nlohmann::json{{"platform", key}, {"gflops", best}}.dump());
            std::filesystem::rename(tmp, path);
        } catch (const std::exception&) {
            // A cache that cannot be written leaves the measurement as it is.
        }
    }
    return std::max(best, seen);
}

namespace {

// Sum of squares of the gradients in [begin, end), counting a tensor that every tensor-parallel
// rank holds whole (the norms) on tp rank 0 only, so that the sums over ranks add up to the
// model's. A range per tensor, summed in turn (the CPU's sum of one tensor is its own
// threaded reduction, whose rounding a merged range would change).
double grad_sum_squares(const model::Layout& layout, const float* grads, int64_t begin, int64_t end,
                        const kernels::Kernels& k) {
    std::vector<kernels::Range> ranges;
    for (const auto& p : layout.params()) {
        int64_t lo = std::max(begin, p.offset), hi = std::min(end, p.offset + p.numel);
        if (lo >= hi || (p.tp_split == model::SplitAxis::none && layout.tp_rank != 0))
            continue;
        ranges.push_back({lo, hi});
    }
    return k.sum_squares(grads, ranges);
}

// Rank 0 chooses the run folder (a generated one when run.dir is empty) and tells the others.
std::string agree_on_run_dir(const RunConfig& cfg, dist::Job& job) {
    std::string dir = cfg.run_dir;
    if (job.grid().rank == 0 && dir.empty())
        dir = checkpoint::new_run_path("runs");
    std::vector<char> buf(4096, '\0');
    std::copy(dir.begin(), dir.end(), buf.begin());
    job.world().broadcast(buf.data(), buf.size(), 0);
    return std::string(buf.data());
}

}  // namespace

TrainResult train(const RunConfig& cfg, const std::string& resolved_yaml) {
    cfg.validate();
    const TrainConfig& t = cfg.train;
    set_num_threads(static_cast<int>(t.threads));

    dist::Placement place = dist::discover();
    if (!cfg.interface.empty())
        place.interface = cfg.interface;
    // On GPUs each rank takes its host's GPU LOCAL_RANK before anything is allocated, and NCCL
    // carries the tensors.
    const bool on_gpu = t.backend == "cuda";
    if (on_gpu)
        kernels::use_cuda_device(place.local_rank);
    dist::Job job(place, static_cast<int>(cfg.tp),
                  std::chrono::milliseconds(int64_t(cfg.timeout_s * 1000)), cfg.transport,
                  static_cast<int>(cfg.pp), on_gpu ? dist::Tensors::device : dist::Tensors::host);
    const dist::Grid& g = job.grid();
    const bool lead = g.rank == 0;
    heartbeat(g.rank, 0);
    log::init(g.rank, log::parse_level(cfg.log_level));
    checkpoint::RunDir run{agree_on_run_dir(cfg, job)};

    kernels::PrecisionChoice precision = kernels::resolve_precision(t.backend, t.precision);
    if (!t.precision_why.empty())
        precision.why = t.precision_why;  // how RunConfig::resolve() settled an "auto"
    const kernels::Kernels& k = kernels::select_kernels(t.backend, precision.precision);
    // A device's tensors reach checkpoints through the host.
    const checkpoint::CopyFn device_copy = checkpoint::tensor_copy(k);
    auto source = data::open_source(cfg.data.source, t.seq_len, cfg.model.vocab_size,
                                    static_cast<uint64_t>(t.seed));
    if (auto* shards = dynamic_cast<data::ShardSet*>(source.get())) {
        if (cfg.data.verify) {
            // A tampered shard is refused before any step. Rank 0 reads the data set once for
            // everyone and tells the others.
            std::string damage;
            if (lead) {
                try {
                    shards->verify();
                } catch (const Error& e) {
                    damage = e.what();
                }
            }
            char bad = damage.empty() ? 0 : 1;
            job.world().broadcast(&bad, 1, 0);
            if (bad) {
                throw Error(lead ? damage
                                 : "rank 0 found the data set in " + cfg.data.source +
                                       " damaged (its log says which shard)");
            }
        }
        if (!cfg.data.tokenizer.empty()) {
            std::string want = data::tokenizer_identity(cfg.data.tokenizer);
            if (shards->manifest().tokenizer != want) {
                throw error(
                    "{}/manifest.json: the data set was made with tokenizer {}, not with "
                    "data.tokenizer={} ({})",
                    cfg.data.source, shards->manifest().tokenizer, cfg.data.tokenizer, want);
            }
        }
    }
    // The checkpoint to resume from, and the steps left to run, are settled before anything big
    // is allocated or any file of the run is written.
    std::unique_ptr<checkpoint::Checkpoint> found = checkpoint::newest_valid(run);
    if (found) {
        const checkpoint::Checkpoint& ck = *found;
        if (!ck.config().same_shapes(cfg.model)) {
            throw error(
                "{}: checkpoint holds a different model than the config (dim {}, {} "
                "layers, vocab {}); use another run.dir",
                ck.dir(), ck.config().dim, ck.config().n_layers, ck.config().vocab_size);
        }
        const int64_t done = ck.state().step;
        if (done > t.steps) {
            throw error(
                "{} is already at step {} ({}), past train.steps={}; raise train.steps above {} "
                "to train further, or use another run.dir",
                run.root, done, ck.dir(), t.steps, done);
        }
        if (done == t.steps) {
            // A finished run run again with its own config (kiln run reusing what is done, a
            // gang restarted after the last checkpoint) has nothing left to do: it succeeds
            // without writing anything, since config.yaml, status.json and metrics.jsonl already
            // tell what the run did and a rewrite from here would know less (no loss of its own).
            // The command says so (kiln train's last line).
            TrainResult finished;
            finished.run_dir = run.root;
            finished.checkpoint = ck.dir();
            finished.steps = done;
            finished.already_finished = true;
            finished.first_loss = finished.last_loss = ck.state().loss;
            job.finish();
            return finished;
        }
    }
    // Nothing big is allocated before the plan says it fits.
    const MemoryPlan plan = memory_plan(cfg, g.world);
    check_fits(plan, memory_limit(cfg, place.local_world_size), cfg);
    const bool zero = cfg.zero == 1 && g.dp > 1;
    const Shards sh = shard_layout(
        model::Layout(cfg.model, g.tp, g.tp_rank, g.pp, g.pp_rank).total(), g.dp, g.dp_rank, zero);
    model::Llama model(cfg.model, k, t.micro_batch, t.seq_len, model::parse_recompute(t.recompute),
                       sh.padded, &job.tp_tensors(), cfg.split(g.pp_rank));
    optim::AdamW adamw(model.layout(), cfg.adamw, sh.begin, sh.end, k);
    std::optional<Pipeline> pipeline;
    if (g.pp > 1)
        pipeline.emplace(model, job.pp_tensors());
    GradientReduce reducer(job.dp_tensors(), model.grads(), sh.chunk, zero,
                           cfg.dp_bucket(t.backend == "cuda"));
    optim::Schedule schedule = cfg.schedule;
    schedule.total_steps = t.steps;

    int64_t start_step = 0;
    if (found) {
        const checkpoint::Checkpoint& ck = *found;
        // Each rank takes its shard of the saved state, whatever layout saved it.
        auto load_start = Clock::now();
        ck.load(model.layout(), model.params(), adamw.m(), adamw.v(), sh.begin, sh.end,
                device_copy);
        adamw.set_step(ck.state().adam_step);
        start_step = ck.state().step;
        model.sync_compute_weights();
        log::info("train", "resuming from {} (step {}, loaded in {:.2f} s)", ck.dir(), start_step,
                  seconds_since(load_start));
    } else {
        model.init_weights(static_cast<uint64_t>(t.seed), t.init_std);  // same on every rank
    }

    // Only now that config, data and any checkpoint are known good is the run folder written.
    fs::make_dirs(run.checkpoints());
    log::add_file(run.rank_log(g.rank));
    if (lead)
        fs::write_file_atomic(run.config(), resolved_yaml);
    log::info("train", "run folder {}", run.root);
    log::info("train",
              "model {}: {:.1f}M parameters, {} layers, dim {}; {} kernels, {} threads; "
              "activations {:.0f} MiB",
              cfg.model.preset, cfg.model.n_params() / 1e6, cfg.model.n_layers, cfg.model.dim,
              k.name, num_threads(), model.activation_bytes() / 1048576.0);
    const double mib = 1048576.0;
    log::info("train",
              "memory plan per rank: {:.0f} MiB (parameters {:.1f}, gradients {:.1f}, optimizer "
              "state {:.1f} ({}; dp {} x pp {} x tp {}{}), activations {:.1f}, checkpoint "
              "staging {:.1f})",
              plan.total() / mib, (plan.params + plan.params_bf16) / mib, plan.grads / mib,
              plan.optimizer / mib, zero ? "ZeRO-1 shard" : "replicated", g.dp, g.pp, g.tp,
              cfg.sp && g.tp > 1 ? " with SP" : "", plan.activations / mib, plan.checkpoint / mib);
    if (reducer.overlapped())
        log::info("train",
                  "gradients summed over {} DP ranks during the backward, {:g} MiB at a time "
                  "(parallel.dp_overlap, parallel.dp_bucket_mb)",
                  g.dp, cfg.dp_bucket_mb);
    log::info("train", "precision: {}", precision.why);
    double peak =
        t.peak_gflops > 0 ? t.peak_gflops : measure_peak_gflops(t.backend, precision.precision);
    const double flops_tok = flops_per_token(cfg.model, t.seq_len);
    const int64_t B = t.micro_batch, T = t.seq_len;
    const int64_t tokens_per_step = t.grad_accum * B * T * g.dp;
    // Each rank's gradient is its share of the mean over the global batch; the DP sum is the mean.
    const float grad_scale = 1.0f / float(t.grad_accum * B * (T - 1) * g.dp);
    log::info("train",
              "{} steps of {} sequences x {} tokens ({} tokens/step); matmul peak {:.0f} GFLOP/s",
              t.steps, t.grad_accum * B * g.dp, T, tokens_per_step, peak);

    // Every step runs the products the plan chose: found in the plan cache, or tuned now.
    auto run_start = Clock::now();
    const AutotuneResult tuned =
        autotune(cfg, k, model, job.world(), g.dp, [&] { heartbeat(g.rank, start_step); });
    if (tuned.outcome == "hit") {
        log::info("train", "plan cache hit: {} ({} products)", tuned.path, tuned.products);
    } else if (tuned.outcome != "off") {
        log::info("train",
                  "plan cache {}: {}{}; tuned {} products ({} on this rank) in {} passes, {:.1f} s",
                  tuned.outcome, tuned.path, tuned.why.empty() ? "" : " (" + tuned.why + ")",
                  tuned.products, tuned.tuned_here, tuned.passes, tuned.seconds);
        if (!tuned.write_error.empty())
            log::warn("train", "plan cache not written: {}", tuned.write_error);
    }
    if (lead) {
        nlohmann::ordered_json j = {{"cache", tuned.path},
                                    {"outcome", tuned.outcome},
                                    {"why", tuned.why},
                                    {"products", tuned.products},
                                    {"tuned_s", tuned.seconds}};
        fs::write_file_replace(run.autotune(), j.dump(2) + "\n");
    }

    data::Sampler sampler(source->rows(), static_cast<uint64_t>(t.seed));
    std::unique_ptr<MetricsFile> metrics;
    if (lead)
        metrics = std::make_unique<MetricsFile>(run.metrics());
    std::vector<int32_t> tokens(B * T), targets(B * T);
    TrainResult result;
    result.run_dir = run.root;
    int64_t skipped = 0, bad_in_a_row = 0;
    double stage_wait_s = 0;  // the last step's wait for neighbouring pipeline stages
    double last_loss = 0;
    std::optional<StatusHeartbeat> beat;
    if (lead) {
        write_status(run, "running", start_step, t.steps, 0);
        beat.emplace(run.status());
    }
    fs::make_dirs(run.ranks());
    write_rank_status(run, g, start_step);

    // ZeRO-1: after the update every rank needs every new weight the steps read. In bf16 that
    // is the bf16 copy alone (half the bytes of the fp32 weights, which stay sharded until a
    // checkpoint gathers them); in fp32 the weights themselves.
    auto gather_compute_weights = [&] {
        if (uint16_t* bf16 = model.params_bf16()) {
            job.dp_tensors().all_gather_bytes(bf16, sh.chunk * sizeof(uint16_t));
        } else {
            job.dp_tensors().all_gather(model.params(), sh.chunk);
        }
    };

    uint64_t checkpoint_payload = 0;  // dp bytes moved for checkpoints, not by the steps

    // Checkpoints: every rank writes its own file in the background; once every rank's write has
    // ended (checked after each step), or at the next checkpoint or the end at the latest, rank 0
    // commits the manifest. Collective.
    checkpoint::RankWriter writer;
    std::optional<checkpoint::TrainState> pending;
    const checkpoint::RankPlace here{g.rank, g.world,   g.tp, g.tp_rank,
                                     g.dp,   g.dp_rank, g.pp, g.pp_rank};
    auto finish_checkpoint = [&] {
        if (!pending)
            return;
        checkpoint::RankFile mine = writer.finish();
        std::vector<uint64_t> sizes(2 * size_t(g.world), 0);  // [rank] bytes, xxh64
        sizes[2 * g.rank] = mine.bytes;
        sizes[2 * g.rank + 1] = mine.xxh64;
        job.world().all_gather_bytes(sizes.data(), 2 * sizeof(uint64_t));
        if (lead) {
            std::vector<checkpoint::RankFile> files(g.world);
            for (int r = 0; r < g.world; r++) {
                files[r] = {fmt::format("rank-{:05d}.safetensors", r), sizes[2 * r],
                            sizes[2 * r + 1]};
            }
            result.checkpoint = checkpoint::commit(run, cfg.model, *pending, here, zero, files,
                                                   static_cast<int>(t.keep_checkpoints));
            log::info("train", "checkpoint {} complete", result.checkpoint);
        }
        pending.reset();
        job.world().barrier();
    };
    auto save_checkpoint = [&](int64_t steps_done, double loss) {
        finish_checkpoint();
        if (zero && model.params_bf16()) {  // the master weights, saved whole
            const uint64_t before = job.dp_tensors().payload_bytes();
            job.dp_tensors().all_gather(model.params(), sh.chunk);
            checkpoint_payload += job.dp_tensors().payload_bytes() - before;
        }
        auto staging_start = Clock::now();
        if (lead)
            checkpoint::prepare_temporary_dir(run, steps_done);
        job.world().barrier();
        // Without ZeRO the moments are replicated over DP: DP rank 0 saves them.
        const bool saves_moments = zero || g.dp_rank == 0;
        writer.stage(model.layout(), here,
                     {model.params(), adamw.m(), adamw.v(), saves_moments ? sh.begin : 0,
                      saves_moments ? sh.end : 0, device_copy, device_copy ? k.staging : nullptr});
        writer.start(run, steps_done);
        pending = checkpoint::TrainState{steps_done, adamw.step(), loss};
        const double mib = double((g.dp_rank == 0 ? model.layout().total() : 0) +
                                  2 * (saves_moments ? sh.end - sh.begin : 0)) *
                           4 / 1048576.0;
        log::info("train",
                  "checkpoint of step {}: {:.1f} MiB staged in {:.2f} s; writing in "
                  "the background",
                  steps_done, mib, seconds_since(staging_start));
    };

    // After tuning, so that a recording holds the products the plan chose.
    kernels::Replays replays(k, cfg.graphs_recorded(), t.graphs == "true");
    if (replays.on() && reducer.overlapped() && t.grad_accum == 1) {
        log::info("train",
                  "train.graphs: nothing recorded: each step's one micro-batch hands its "
                  "gradients to the data-parallel sum as its backward goes, from the host "
                  "(parallel.dp_overlap=false, or train.grad_accum > 1, leaves some to record)");
    } else if (replays.on()) {
        log::info("train",
                  "micro-batches recorded as CUDA graphs the second time each kind runs (the one "
                  "that writes the gradients, the one that adds to them) and replayed after "
                  "(train.graphs){}",
                  reducer.overlapped() ? "; each step's last runs as called: the data-parallel "
                                         "sum follows its backward"
                                       : "");
    } else if (cfg.graphs_recorded() && t.backend == "cuda") {
        log::info("train",
                  "train.graphs: nothing recorded: the profiled table (KILN_CUDA_PROFILE) times "
                  "each op as it is called");
    }
    // What the steps move, without the tuning passes, the set-up before them and checkpoints.
    // Host scalars and device tensors together, where they travel apart.
    auto payload = [](Collective& host, Collective& tensors) {
        return host.payload_bytes() + (&tensors == &host ? 0 : tensors.payload_bytes());
    };
    const uint64_t dp_payload0 = payload(job.dp(), job.dp_tensors()),
                   tp_payload0 = payload(job.tp(), job.tp_tensors()),
                   pp_payload0 = payload(job.pp(), job.pp_tensors());
    for (int64_t step = start_step; step < t.steps; step++) {
        const auto step_start = Clock::now();
        auto lap_start = step_start;
        auto lap = [&] {  // seconds since the previous lap (the step's start for the first)
            const auto now = Clock::now();
            const double s = std::chrono::duration<double>(now - lap_start).count();
            lap_start = now;
            return s;
        };
        heartbeat(g.rank, step);
        double loss_sum[2] = {0, 0};  // summed loss, tokens
        auto read = [&](int64_t micro, int32_t* tokens, int32_t* targets) {
            auto rows = sampler.micro_batch(step, t.grad_accum, micro, g.dp_rank, g.dp, B);
            for (int64_t b = 0; b < B; b++) {
                source->read_row(rows[b], tokens + b * T);
            }
            for (int64_t i = 0; i < B * T; i++) {
                targets[i] = (i % T) + 1 < T ? tokens[i + 1] : -1;
            }
        };
        // The last backward hands each final region of the gradients to the data-parallel sum.
        const model::GradsReady ready = [&](int64_t offset) { reducer.ready(offset); };
        if (g.pp == 1) {
            for (int64_t micro = 0; micro < t.grad_accum; micro++) {
                read(micro, tokens.data(), targets.data());
                model.stage_batch(tokens.data(), targets.data());
                const model::Grads mode =
                    micro == 0 ? model::Grads::overwrite : model::Grads::accumulate;
                // The last backward makes the gradients final (model::GradsReady). Recorded
                // (one rank of TP, so no norms to sum), it needs no hook unless the
                // data-parallel sum follows it, a host call a recording would leave out: that
                // one runs as it is.
                const bool last = micro + 1 == t.grad_accum;
                if (replays.on() && !(last && reducer.overlapped())) {
                    replays.run(int(mode),
                                [&] { model.forward_backward_staged(grad_scale, mode); });
                } else {
                    model.forward_backward_staged(grad_scale, mode, last ? &ready : nullptr);
                }
            }
            const model::LossSum l = model.take_loss();
            loss_sum[0] = l.sum, loss_sum[1] = double(l.tokens);
        } else {
            PipelineStats p = pipeline->run(t.grad_accum, grad_scale, read, B * T, ready);
            loss_sum[0] = p.loss.sum, loss_sum[1] = double(p.loss.tokens);
            stage_wait_s = p.wait_s;
        }
        k.wait();  // a device's backward has only been queued; its time is the compute's
        const double compute_s = lap();
        // Data parallel: sum the losses (the last stage's, which the pipeline then shares) and
        // the gradients (each rank keeps its shard's under ZeRO-1). The first to finish over DP
        // waits for the slowest rank: the losses, or the gradients where the backward has been
        // summing them (they share the group).
        if (reducer.overlapped())
            reducer.finish();
        job.dp().all_reduce_sum(loss_sum, 2);
        job.pp().all_reduce_sum(loss_sum, 2);
        const double wait_s = lap();
        if (!reducer.overlapped())
            reducer.finish();
        double sq = grad_sum_squares(model.layout(), model.grads(), sh.begin, sh.end, k);
        if (zero)
            job.dp().all_reduce_sum(&sq, 1);
        if (g.tp > 1)
            job.tp().all_reduce_sum(&sq, 1);
        if (g.pp > 1)  // each stage holds its own blocks
            job.pp().all_reduce_sum(&sq, 1);
        const double reduce_s = lap();
        double loss = loss_sum[0] / loss_sum[1];
        double norm = std::sqrt(sq);
        double lr = schedule.at(step);
        if (!std::isfinite(norm) || !std::isfinite(loss)) {
            skipped++;
            log::warn("train",
                      "step {}: non-finite loss or gradient (loss {}, grad norm {}); "
                      "step skipped",
                      step + 1, loss, norm);
            if (++bad_in_a_row >= 5) {
                finish_checkpoint();
                if (lead)
                    write_status(run, "failed", step, t.steps, loss, "diverged");
                throw error(
                    "training diverged: 5 steps in a row had a non-finite loss or gradient "
                    "(lower train.lr or raise train.warmup_steps); {}",
                    result.checkpoint.empty()
                        ? std::string("no checkpoint was written before it")
                        : "the last checkpoint before it is " + result.checkpoint);
            }
        } else {
            bad_in_a_row = 0;
            adamw.update(model.params(), model.params_bf16(), model.grads(),
                         optim::clip_factor(norm, cfg.adamw.grad_clip), lr);
            if (zero)
                gather_compute_weights();
        }
        k.wait();
        const double update_s = lap();
        log::debug("train",
                   "step {}: compute {:.3f} s, wait {:.3f} s, reduce {:.3f} s, update {:.3f} s",
                   step + 1, compute_s, wait_s, reduce_s, update_s);
        last_loss = loss;
        if (pending) {  // commit a background checkpoint as soon as every rank has written it
            double done = writer.done() ? 1 : 0;
            job.world().all_reduce_sum(&done, 1);
            if (done == g.world)
                finish_checkpoint();
        }
        if (step == start_step)
            result.first_loss = loss;

        double dt = seconds_since(step_start);
        StepMetrics m;
        m.step = step + 1;
        m.loss = loss;
        m.lr = lr;
        m.grad_norm = norm;
        m.tokens_per_s = tokens_per_step / dt;
        m.mfu = m.tokens_per_s * flops_tok / (peak * 1e9 * g.world);
        m.elapsed_s = seconds_since(run_start);
        m.tokens = (step + 1) * tokens_per_step;
        m.skipped = skipped;
        m.compute_s = compute_s;
        m.wait_s = wait_s;
        m.reduce_s = reduce_s;
        m.update_s = update_s;
        m.stage_wait_s = g.pp > 1 ? stage_wait_s : 0;
        if (lead)
            metrics->write(m);
        if (lead && ((step + 1) % t.log_every == 0 || step + 1 == t.steps || step == start_step)) {
            std::printf(
                "step %6lld/%lld | loss %.4f | lr %.2e | grad %.3f | %8.0f tok/s | "
                "mfu %5.1f%% | %.1fs\n",
                static_cast<long long>(m.step), static_cast<long long>(t.steps), loss, lr, norm,
                m.tokens_per_s, 100 * m.mfu, m.elapsed_s);
            std::fflush(stdout);
            write_status(run, "running", step + 1, t.steps, loss);
        }
        if ((step + 1) % t.log_every == 0 || step + 1 == t.steps)
            write_rank_status(run, g, step + 1, compute_s,
                              g.pp > 1 ? std::optional<double>(stage_wait_s) : std::nullopt);
        bool last = step + 1 == t.steps && t.checkpoint_every >= 0;
        // No checkpoint while steps are being skipped: the newest one stays the last good state.
        bool periodic = t.checkpoint_every > 0 && (step + 1) % t.checkpoint_every == 0;
        if ((last || periodic) && bad_in_a_row == 0) {
            save_checkpoint(step + 1, loss);
        }
    }
    finish_checkpoint();
    if (result.checkpoint.empty()) {
        if (auto l = checkpoint::latest(run))
            result.checkpoint = *l;
    }
    result.steps = t.steps;
    result.last_loss = last_loss;
    if (g.world > 1) {
        double steps_run = double(std::max<int64_t>(1, t.steps - start_step));
        log::info(
            "train",
            "collective payload per step on this rank: dp {:.2f} MiB, tp {:.2f} MiB, "
            "pp {:.2f} MiB",
            double(payload(job.dp(), job.dp_tensors()) - dp_payload0 - checkpoint_payload) /
                steps_run / 1048576.0,
            double(payload(job.tp(), job.tp_tensors()) - tp_payload0) / steps_run / 1048576.0,
            double(payload(job.pp(), job.pp_tensors()) - pp_payload0) / steps_run / 1048576.0);
    }
    if (lead)
        write_status(run, "finished", t.steps, t.steps, last_loss);
    job.finish();
    return result;
}

}  // namespace kiln::train
