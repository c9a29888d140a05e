#pragma once
// The memory ops of the tables whose memory is the host's (cpu/ and reference/): copies, fills
// and the small elementwise ops around the products (table.h, "Memory").
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/table.h"

namespace kiln::kernels::host {

void copy(void* dst, const void* src, size_t bytes);
void zero(void* dst, size_t bytes);
void widen(float* dst, const uint16_t* src, int64_t n);
void add(float* y, const float* a, const float* b, int64_t n);
void slice_ids(int32_t* local, float* weight, const int32_t* ids, int64_t n, int64_t begin,
               int64_t count, float value);
void rescale_sumexp(float* sumexp, const float* local_max, const float* max, int64_t M);
void row_losses(float* losses, const float* max, const float* sumexp, const float* target_logit,
                const int32_t* targets, int64_t M);
void sum_into(double* total, const float* x, int64_t n);
double sum_squares(const float* x, int64_t n);  // threaded
double sum_squares(const float* x, const std::vector<Range>& ranges);
inline void wait() {}  // host ops end when they return

}  // namespace kiln::kernels::host
