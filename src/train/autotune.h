#pragma once
// Autotuning the training step's products into a plan cache (docs/plan.md).
//
// The plan cache is one JSON file per (platform, backend, model shapes, layout) in a folder all
// ranks share. On a hit every product runs the choice it records from the first step on. On a
// miss, or a file made for anything else (another machine, thread count or library version),
// the ranks run one throwaway forward and backward pass in which each times the candidate
// implementations of its share of the product shapes; the shares are merged, every rank uses
// the merged plan from the first real step on, and rank 0 writes the file. Either way the
// numbers a run computes depend only on the plan it ran, which a restart finds again.
#include <functional>
#include <string>

#include "core/collective.h"
#include "kernels/table.h"
#include "model/llama.h"
#include "train/config.h"

namespace kiln::train {

struct AutotuneResult {
    std::string path;         // the cache file ("" when autotuning is off)
    std::string outcome;      // "hit", "miss", "ignored" or "off"
    std::string why;          // for "ignored": what made the file unusable
    int products = 0;         // choices in the plan used
    int tuned_here = 0;       // products this rank timed
    int passes = 0;           // forward and backward passes the tuning ran
    double seconds = 0;       // spent tuning (0 on a hit)
    std::string write_error;  // why the cache could not be written ("" when it was)
};

// The folder of plan caches: train.plan_cache, else $XDG_CACHE_HOME/kiln/plans, else
// ~/.cache/kiln/plans.
std::string plan_cache_dir(const RunConfig& cfg);

// Collective over `world`: every rank calls it once, before the first step, with its model.
// Afterwards the model's gradients and activations are meaningless (the step zeroes them).
// `progress` is called after each tuning pass (a heartbeat for the supervisor).
AutotuneResult autotune(const RunConfig& cfg, const kernels::Kernels& k, model::Llama& model,
                        Collective& world, int dp, const std::function<void()>& progress);

}  // namespace kiln::train
