#include "core/threads.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>

namespace kiln {

void set_num_threads(int n) {
    if (n <= 0) {
        // All cores, unless the environment (e.g. kiln launch sharing a machine between ranks)
        // says otherwise.
        if (std::getenv("OMP_NUM_THREADS") != nullptr)
            return;
        n = omp_get_num_procs();
    }
    omp_set_num_threads(n);
}

int num_threads() {
    return omp_get_max_threads();
}

void parallel_range(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) {
        return;
    }
    int64_t chunks =
        std::min<int64_t>(num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
    if (chunks <= 1 || omp_in_parallel()) {
        fn(0, n);
        return;
    }
#pragma omp parallel for num_threads(chunks) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        fn(n * c / chunks, n * (c + 1) / chunks);
    }
}

}  // namespace kiln
