#pragma once
// The data-parallel sum of a step's gradients, overlapped with the backward that makes them.
//
// The backward finishes gradients from the top of the flat buffer down (the head first, the
// embedding last; model::GradsReady). Once a region of at least `bucket` elements is final it
// is reduced by a thread of its own while the backward goes on below it; what is left when the
// backward ends is reduced then. Under ZeRO-1 each rank keeps the sum of its own shard only, so
// a bucket is reduced to the rank whose shard it lies in (split where it crosses one); without
// ZeRO it is all-reduced. On a GPU the reductions are NCCL's, on its own stream: the backward's
// kernels and the gradients' traffic run at once.
//
// With `bucket` 0, or one data-parallel rank, nothing is overlapped: finish() reduces the whole
// buffer at once (a reduce-scatter under ZeRO-1, an all-reduce without).
//
// Every rank must see the same ready() calls: the buckets, and so the collectives, follow from
// them.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#include "core/collective.h"

namespace kiln::train {

class GradientReduce {
public:
    // grads (dp.size() * shard elements, zero padding included; the model's memory); zero:
    // rank r keeps the sum of [r * shard, (r + 1) * shard) (ZeRO-1), else every rank the whole.
    GradientReduce(Collective& dp, float* grads, int64_t shard, bool zero, int64_t bucket);
    ~GradientReduce();  // waits for a reduction in flight
    GradientReduce(const GradientReduce&) = delete;
    GradientReduce& operator=(const GradientReduce&) = delete;

    bool overlapped() const { return bucket_ > 0; }
    // During the step's last backward: [offset, end of the buffer) is final.
    void ready(int64_t offset);
    // After it: reduces what is left and waits for every reduction of the step; rethrows the
    // first one that failed.
    void finish();

private:
    void reduce(int64_t begin, int64_t end);  // one bucket, on the calling thread
    void work();                              // the reducing thread

    Collective& dp_;
    float* grads_;
    const int64_t shard_, end_;  // end_: dp * shard, the buffer's length
    const bool zero_;
    const int64_t bucket_;
    int64_t unsent_ = 0;  // [.., unsent_) is not yet handed to the thread this step

    std::mutex mutex_;
    std::condition_variable changed_;
    std::deque<std::pair<int64_t, int64_t>> queue_;  // buckets to reduce, in order
    bool busy_ = false, stop_ = false;
    std::exception_ptr failed_;
    std::thread thread_;
};

}  // namespace kiln::train
