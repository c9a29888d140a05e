#include "train/grad_reduce.h"

#include <algorithm>

namespace kiln::train {

GradientReduce::GradientReduce(Collective& dp, float* grads, int64_t shard, bool zero,
                               int64_t bucket)
    : dp_(dp),
      grads_(grads),
      shard_(shard),
      end_(shard * dp.size()),
      zero_(zero),
      bucket_(dp.size() > 1 ? std::max<int64_t>(bucket, 0) : 0),
      unsent_(end_) {
    if (overlapped())
        thread_ = std::thread([this] { work(); });
}

GradientReduce::~GradientReduce() {
    if (!thread_.joinable())
        return;
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    changed_.notify_all();
    thread_.join();
}

void GradientReduce::ready(int64_t offset) {
    if (!overlapped() || unsent_ - offset < bucket_)
        return;
    {
        std::lock_guard lock(mutex_);
        queue_.emplace_back(offset, unsent_);
    }
    unsent_ = offset;
    changed_.notify_all();
}

void GradientReduce::finish() {
    if (!overlapped()) {
        if (zero_)
            dp_.reduce_scatter_sum(grads_, size_t(shard_));
        else
            dp_.all_reduce_sum(grads_, size_t(end_));
    } else {
        std::unique_lock lock(mutex_);
        if (unsent_ > 0)
            queue_.emplace_back(0, unsent_);
        unsent_ = end_;
        changed_.notify_all();
        changed_.wait(lock, [&] { return (queue_.empty() && !busy_) || failed_; });
        if (failed_)
            std::rethrow_exception(failed_);  // the thread has stopped: the job ends with this
    }
}

void GradientReduce::reduce(int64_t begin, int64_t end) {
    if (!zero_)
        return dp_.all_reduce_sum(grads_ + begin, size_t(end - begin));
    // To each shard's owner, its part of the bucket.
    while (begin < end) {
        const int64_t owner = begin / shard_, stop = std::min(end, (owner + 1) * shard_);
        dp_.reduce_sum(grads_ + begin, size_t(stop - begin), int(owner));
        begin = stop;
    }
}

void GradientReduce::work() {
    std::unique_lock lock(mutex_);
    for (;;) {
        changed_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (stop_)
            return;
        const auto [begin, end] = queue_.front();
        queue_.pop_front();
        busy_ = true;
        lock.unlock();
        try {
            reduce(begin, end);
        } catch (...) {
            lock.lock();
            failed_ = std::current_exception();
            busy_ = false;
            changed_.notify_all();
            return;
        }
        lock.lock();
        busy_ = false;
        changed_.notify_all();
    }
}

}  // namespace kiln::train
