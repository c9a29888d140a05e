#pragma once
// Checkpoints: checkpoints/step-NNNNNNNN/ holds manifest.json (step, model config, per-rank
// files with sizes and xxh64 sums) and one safetensors file per rank with that rank's
// parameters (fp32 master weights) and AdamW moments. Written into a temporary folder, fsynced,
// renamed into place; `latest` names the newest complete one. Format: docs/formats.md.
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/rundir.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/layout.h"

namespace kiln::checkpoint {

struct TrainState {
    int64_t step = 0;       // optimizer steps completed
    int64_t adam_step = 0;  // AdamW's bias-correction counter
    double loss = 0;        // mean loss of the last step
};

// What one rank saves: its parameters and optimizer moments over the layout.
struct RankTensors {
    const float* params = nullptr;  // (layout.total())
    const float* m = nullptr;       // (layout.total()) or null
    const float* v = nullptr;
};

// Writes checkpoint `state.step`, updates `latest`, keeps the newest `keep` checkpoints (0 keeps
// all). `layout` is the whole model's (tp = 1) and the tensors whole: a checkpoint does not
// depend on the layout that wrote it. Returns the checkpoint folder.
std::string save(const RunDir& run, const model::LlamaConfig& config, const model::Layout& layout,
                 const RankTensors& tensors, const TrainState& state, int keep);

// Writes checkpoints in the background: stage() copies the state (so training may change it),
// start() runs save() on a thread, wait() joins it and rethrows its error. One at a time.
class AsyncWriter {
public:
    AsyncWriter() = default;
    AsyncWriter(const AsyncWriter&) = delete;
    AsyncWriter& operator=(const AsyncWriter&) = delete;
    ~AsyncWriter();
    void stage(const model::Layout& layout, const RankTensors& tensors);
    void start(const RunDir& run, const model::LlamaConfig& config, const TrainState& state,
               int keep);
    void wait();

private:
    std::unique_ptr<model::Layout> layout_;
    std::vector<float> staged_;  // params, m, v of the whole model
    std::thread thread_;
    std::exception_ptr failure_;
};

// The newest complete checkpoint of a run, if any (what `latest` names; not verified).
std::optional<std::string> latest(const RunDir& run);

class Checkpoint;
// The newest checkpoint of a run that opens and verifies: the one `latest` names, else the
// step-* folders newest first. Each damaged one is reported (log warning) and skipped; a bad
// file is never loaded. Empty when the run has none that is good.
std::unique_ptr<Checkpoint> newest_valid(const RunDir& run);

// A checkpoint opened for reading; the rank file's checksum is verified on open.
class Checkpoint {
public:
    explicit Checkpoint(const std::string& dir);  // throws Error naming the file at fault
    const model::LlamaConfig& config() const { return config_; }
    const TrainState& state() const { return state_; }
    const std::string& dir() const { return dir_; }
    // Copies the named tensors (this layout's tensor-parallel shard of each) into the flat
    // buffers (any of m/v may be null).
    void load(const model::Layout& layout, float* params, float* m, float* v) const;

private:
    std::string dir_;
    model::LlamaConfig config_;
    TrainState state_;
    std::unique_ptr<SafetensorsFile> file_;
};

}  // namespace kiln::checkpoint
