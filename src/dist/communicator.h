#pragma once
// The process grid of a distributed run and its communicators (shared memory within a host,
// gloo over TCP between hosts).
// World = DP x TP; the ranks of one TP group are consecutive: rank = dp_rank * tp + tp_rank.
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
};

// Derives the grid; throws Error when world_size is not divisible by tp.
Grid make_grid(int world_size, int rank, int tp);

// A connected job: the store, the world and the DP and TP groups this rank belongs to.
class Job {
public:
    // Rendezvous: every rank announces itself; after `timeout` the ranks that never arrived are
    // named in the Error. Then each group connects: through shared memory when `shared_memory`
    // and its ranks share a host, else with gloo over TCP.
    Job(const Placement& placement, int tp, std::chrono::milliseconds timeout,
        bool shared_memory = true);
    ~Job();
    // Waits for every rank at the end of a run, so rank 0's store outlives everyone's use of it.
    void finish() { world_->barrier(); }
    const Grid& grid() const { return grid_; }
    Collective& world() { return *world_; }
    Collective& dp() { return *dp_; }
    Collective& tp() { return *tp_; }
    // The DP group reduces through gloo over TCP (not shared memory, not a group of one).
    bool dp_over_tcp() const { return dp_over_tcp_; }

private:
    Grid grid_;
    std::unique_ptr<TcpStore> store_;
    std::unique_ptr<Collective> world_, dp_, tp_;
    bool dp_over_tcp_ = false;
};

}  // namespace kiln::dist
