#pragma once
// The process grid of a distributed run and its communicators: gloo, with its TCP transport or,
// when every rank runs on one host, its shared-memory transport (dist/shm_transport.h).
// World = DP x PP x TP, TP innermost: rank = (dp_rank * pp + pp_rank) * tp + tp_rank. The
// ranks of one TP group are consecutive (one host's fast links), the stages of one pipeline
// next, and the data-parallel replicas outermost (docs/architecture.md).
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/collective.h"
#include "dist/env.h"

namespace kiln::dist {

class TcpStore;

struct Grid {
    int world = 1, rank = 0;
    int tp = 1, tp_rank = 0;
    int dp = 1, dp_rank = 0;
    int pp = 1, pp_rank = 0;
};

// Derives the grid; throws Error when world_size is not divisible by tp x pp.
Grid make_grid(int world_size, int rank, int tp, int pp = 1);

// Where the tensors the groups carry live: host memory (gloo carries everything), or a CUDA
// device (NCCL carries the tensor collectives; gloo keeps the host scalars and control).
enum class Tensors { host, device };

// A connected job: the store, the world and the DP, TP and PP groups this rank belongs to.
class Job {
public:
    // Rendezvous: every rank announces itself; after `timeout` the ranks that never arrived are
    // named in the Error. Then gloo connects each group through `transport`: "shm" (shared
    // memory; Error unless every rank can use it), "tcp", or "auto" (shm where it can, else tcp).
    // With Tensors::device NCCL also connects the DP, TP and PP groups, on the current CUDA
    // device (an Error in a build without NCCL).
    Job(const Placement& placement, int tp, std::chrono::milliseconds timeout,
        const std::string& transport = "auto", int pp = 1, Tensors tensors = Tensors::host);
    ~Job();
    // Waits for every rank at the end of a run, so rank 0's store outlives everyone's use of it.
    void finish() { world_->barrier(); }
    const Grid& grid() const { return grid_; }
    // Host memory: control, scalars (losses, norms), checkpoint bookkeeping.
    Collective& world() { return *world_; }
    Collective& dp() { return *dp_; }
    Collective& tp() { return *tp_; }
    Collective& pp() { return *pp_; }  // this pipeline's stages, group rank = pp_rank
    // The same groups for the training tensors (gradients, weights, activations): NCCL's with
    // Tensors::device, else the ones above.
    Collective& dp_tensors() { return dp_nccl_ ? *dp_nccl_ : *dp_; }
    Collective& tp_tensors() { return tp_nccl_ ? *tp_nccl_ : *tp_; }
    Collective& pp_tensors() { return pp_nccl_ ? *pp_nccl_ : *pp_; }

private:
    Grid grid_;
    std::unique_ptr<TcpStore> store_;
    std::unique_ptr<Collective> world_, dp_, tp_, pp_;
    std::unique_ptr<Collective> dp_nccl_, tp_nccl_, pp_nccl_;
};

}  // namespace kiln::dist
