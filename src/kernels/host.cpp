#include "kernels/host.h"

#include <cmath>
#include <cstring>
#include <mutex>

#include "core/dtype.h"
#include "core/threads.h"

namespace kiln::kernels::host {

void copy(void* dst, const void* src, size_t bytes) {
    if (bytes > 0)
        std::memcpy(dst, src, bytes);
}

void zero(void* dst, size_t bytes) {
    if (bytes > 0)
        std::memset(dst, 0, bytes);
}

void widen(float* dst, const uint16_t* src, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        dst[i] = bf16_to_f32(src[i]);
}

void add(float* y, const float* a, const float* b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}

void slice_ids(int32_t* local, float* weight, const int32_t* ids, int64_t n, int64_t begin,
               int64_t count, float value) {
    for (int64_t i = 0; i < n; i++) {
        const int32_t t = ids[i];
        local[i] = t >= begin && t < begin + count ? int32_t(t - begin) : -1;
        if (weight)
            weight[i] = t >= 0 ? value : 0.0f;
    }
}

void rescale_sumexp(float* sumexp, const float* local_max, const float* max, int64_t M) {
    for (int64_t i = 0; i < M; i++)
        sumexp[i] *= std::exp(local_max[i] - max[i]);
}

void row_losses(float* losses, const float* max, const float* sumexp, const float* target_logit,
                const int32_t* targets, int64_t M) {
    for (int64_t i = 0; i < M; i++)
        losses[i] = targets[i] >= 0 ? std::log(sumexp[i]) + max[i] - target_logit[i] : 0.0f;
}

void sum_into(double* total, const float* x, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += x[i];
    *total += s;
}

double sum_squares(const float* x, int64_t n) {
    std::mutex mutex;
    double total = 0;
    parallel_range(n, 1 << 16, [&](int64_t i0, int64_t i1) {
        // A local pointer: through the lambda's capture GCC vectorized this with gathers.
        const float* __restrict p = x;
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = i0; i < i1; i++)
            s += double(p[i]) * p[i];
        std::lock_guard<std::mutex> lock(mutex);
        total += s;
    });
    return total;
}

double sum_squares(const float* x, const std::vector<Range>& ranges) {
    double total = 0;
    for (const Range& r : ranges)
        total += sum_squares(x + r.begin, r.end - r.begin);
    return total;
}

}  // namespace kiln::kernels::host
