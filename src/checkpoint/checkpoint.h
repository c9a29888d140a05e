#pragma once
// Checkpoints: checkpoints/step-NNNNNNNN/ holds manifest.json (step, model config, the layout
// that wrote it, and every rank file with its size and xxh64) and one safetensors file per rank:
// rank-RRRRR.safetensors with that rank's shard (its pipeline stage's tensors, split by tensor
// parallelism) of the fp32 weights (written by data-parallel rank 0 of each shard) and its range
// of the AdamW moments (its ZeRO-1 part, or everything). Every rank writes its own file in the
// background into a temporary folder; rank 0 then writes the manifest, renames the folder into
// place and updates `latest`. A checkpoint loads into any other DP x PP x TP layout.
// Format: docs/formats.md.
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/rundir.h"
#include "core/arena.h"
#include "core/safetensors.h"
#include "kernels/table.h"
#include "model/config.h"
#include "model/layout.h"

namespace kiln::checkpoint {

struct TrainState {
    int64_t step = 0;       // optimizer steps completed
    int64_t adam_step = 0;  // AdamW's bias-correction counter
    double loss = 0;        // mean loss of the last step
};

// Where a rank sits, as a checkpoint records it.
struct RankPlace {
    int rank = 0, world = 1;
    int tp = 1, tp_rank = 0;
    int dp = 1, dp_rank = 0;
    int pp = 1, pp_rank = 0;
};

// Copies bytes between host memory and the memory training tensors live in: a kernel table's
// copy (kernels/table.h), through which a device's tensors are read and written. Null where they
// are host memory.
using CopyFn = void (*)(void* dst, const void* src, size_t bytes);
// That copy for the tensors of kernel table `k`.
inline CopyFn tensor_copy(const kernels::Kernels& k) {
    return k.memory == &host_memory ? nullptr : k.copy;
}

// What one rank saves. The moments cover [begin, end) of its layout's flat buffers.
struct RankTensors {
    const float* params = nullptr;  // (layout.total()) this rank's shard; saved by dp_rank 0
    const float* m = nullptr;       // (end - begin)
    const float* v = nullptr;
    int64_t begin = 0, end = 0;
    CopyFn copy = nullptr;  // the tensors' memory (null: host memory)
    // Where the staging copy lives (pinned host memory for a device's tensors); null: plain
    // host memory.
    const Memory* staging = nullptr;
};

// One rank file as the manifest lists it.
struct RankFile {
    std::string file;
    uint64_t bytes = 0, xxh64 = 0;
};

// Writes this rank's file in the background: stage() copies the tensors (so training may change
// them), start() writes them into the checkpoint's temporary folder on a thread, finish() joins
// it (rethrowing its error) and returns what the manifest needs. One checkpoint at a time.
class RankWriter {
public:
    RankWriter() = default;
    RankWriter(const RankWriter&) = delete;
    RankWriter& operator=(const RankWriter&) = delete;
    ~RankWriter();
    void stage(const model::Layout& layout, const RankPlace& place, const RankTensors& tensors);
    void start(const RunDir& run, int64_t step);
    RankFile finish();
    bool done() const { return done_; }  // the write has ended (finish() will not block)

private:
    RankPlace place_;
    int64_t begin_ = 0, end_ = 0, n_params_ = 0;
    // params (if saved), m, v; allocated uninitialized (the copy is its first touch) and kept.
    // Small pages: this buffer is first touched on the training thread's critical path, where
    // huge pages' direct compaction measured slower (0.85 s against 0.16 s for 665 MiB).
    float* staged_ = nullptr;
    std::unique_ptr<float[]> plain_;  // staged_ in plain host memory, or
    std::unique_ptr<Arena> pinned_;   // in the memory RankTensors::staging names
    int64_t staged_capacity_ = 0;
    std::thread thread_;
    std::exception_ptr failure_;
    RankFile written_;
    std::atomic<bool> done_{false};
};

// The temporary folder of a checkpoint being written (rank 0 makes it empty before ranks write).
std::string temporary_dir(const RunDir& run, int64_t step);
void prepare_temporary_dir(const RunDir& run, int64_t step);

// Rank 0, once every rank's file is written: the manifest, the rename into place, `latest`,
// and pruning to the newest `keep` checkpoints (0 keeps all). Returns the checkpoint folder.
std::string commit(const RunDir& run, const model::LlamaConfig& config, const TrainState& state,
                   const RankPlace& layout, bool zero, const std::vector<RankFile>& files,
                   int keep);

// The newest complete checkpoint of a run, if any (what `latest` names; not verified).
std::optional<std::string> latest(const RunDir& run);

class Checkpoint;
// The newest checkpoint of a run that opens and verifies: the one `latest` names, else the
// step-* folders newest first. Each damaged one is reported (log warning) and skipped; a bad
// file is never loaded. Empty when the run has no checkpoint; throws Error, naming the run
// folder, when it has some and every one is damaged.
std::unique_ptr<Checkpoint> newest_valid(const RunDir& run);

// A checkpoint opened for reading; every rank file's size and checksum are verified on open.
class Checkpoint {
public:
    explicit Checkpoint(const std::string& dir);  // throws Error naming the file at fault
    ~Checkpoint();
    const model::LlamaConfig& config() const { return config_; }
    const TrainState& state() const { return state_; }
    const std::string& dir() const { return dir_; }
    // Fills `params` (layout.total()) with this layout's shard of the weights and m/v (each
    // end - begin, may be null) with the moments of [begin, end) of this layout, whatever the
    // DP x PP x TP layout that wrote the checkpoint. `copy` writes them where they are not host
    // memory (RankTensors::copy).
    void load(const model::Layout& layout, float* params, float* m, float* v, int64_t begin,
              int64_t end, CopyFn copy = nullptr) const;
    // Fills `full` (p.full_shape) with the whole weight tensor named p.name, gathered from the
    // saved tensor-parallel shards as they lie in the mapped files: one tensor at a time, for
    // exports that must not hold the model twice.
    void read_tensor(const model::ParamInfo& p, float* full) const;

private:
    struct File {
        RankPlace place;
        int64_t begin = 0, end = 0;
        bool has_params = false;
        std::unique_ptr<SafetensorsFile> st;
    };
    // The layout of one saved shard (pipeline stage, TP rank).
    model::Layout saved_layout(int pp_rank, int tp_rank) const;
    // One saved shard's whole local buffers (params, m, v), assembled from its files.
    void assemble(const model::Layout& saved, std::vector<float>& params, std::vector<float>& m,
                  std::vector<float>& v) const;
    // The file holding the parameters of a saved shard.
    const float* saved_params(const model::Layout& saved) const;
    std::string dir_;
    model::LlamaConfig config_;
    TrainState state_;
    int saved_tp_ = 1, saved_pp_ = 1;
    std::vector<File> files_;
};

}  // namespace kiln::checkpoint
