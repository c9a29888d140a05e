#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_check.h"

namespace kiln::kernels::cuda {

int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky error of a machine without a driver
        return 0;
    }
    return n;
}

}  // namespace kiln::kernels::cuda
