#pragma once
// Threading: one OpenMP pool shared with oneDNN (which is built on OpenMP), so our kernels and
// the matrix products never oversubscribe the cores.
#include <cstdint>
#include <functional>

namespace kiln {

void set_num_threads(int n);  // n <= 0: OMP_NUM_THREADS if set, else all cores
int num_threads();

// Splits [0, n) into contiguous chunks of at least `grain` items and calls fn(begin, end) for
// each chunk on the pool. Runs inline when n is small. fn must not throw.
void parallel_range(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace kiln
