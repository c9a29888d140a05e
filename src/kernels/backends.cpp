#include "kernels/backends.h"

#include "core/error.h"
#include "kernels/cpu/cpu.h"
#include "kernels/reference/reference.h"

#ifdef KILN_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

namespace kiln::kernels {

int cuda_devices() {
#ifdef KILN_HAVE_CUDA
    return cuda::device_count();
#else
    return 0;
#endif
}

bool cuda_available() {
    return cuda_devices() > 0;
}

const Kernels& select_kernels(const std::string& backend, Precision precision) {
    if (backend == "cpu")
        return cpu_kernels(precision);
    if (backend == "reference")
        return reference_kernels(precision);
    if (backend == "cuda") {
        throw error("train.backend=cuda: the CUDA training path is not available yet; use cpu");
    }
    throw error("train.backend={} is not one of cpu, reference", backend);
}

}  // namespace kiln::kernels
