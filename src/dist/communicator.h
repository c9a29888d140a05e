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

// A connected job: the store, the world and the DP and TP groups this rank belongs to.
class Job {
public:
    // Rendezvous: every rank announces itself; after `timeout` the ranks that never arrived are
    // named in the Error. Then gloo connects each group through `transport`: "shm" (shared
    // memory; Error unless every rank can use it), "tcp", or "auto" (shm where it can, else tcp).
    Job(const Placement& placement, int tp, std::chrono::milliseconds timeout,
        const std::string& transport = "auto", int pp = 1);
    ~Job();
    // Waits for every rank at the end of a run, so rank 0's store outlives everyone's use of it.
    void finish() { world_->barrier(); }
    const Grid& grid() const { return grid_; }
    Collective& world() { return *world_; }
    Collective& dp() { return *dp_; }
    Collective& tp() { return *tp_; }
    Collective& pp() { return *pp_; }  // this pipeline's stages, group rank = pp_rank

private:
    Grid grid_;
    std::unique_ptr<TcpStore> store_;
    std::unique_ptr<Collective> world_, dp_, tp_, pp_;
};

}  // namespace kiln::dist
