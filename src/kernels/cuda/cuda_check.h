#pragma once
// Converts a failed CUDA call into kiln's Error, with CUDA's own message (core/error.h's
// library_failed: the same tier as NCCL's failures in dist/).
#include <cuda_runtime.h>

#include "core/error.h"

#define KILN_CUDA(call)                                                         \
    do {                                                                        \
        cudaError_t status_ = (call);                                           \
        if (status_ != cudaSuccess)                                             \
            ::kiln::library_failed("CUDA", #call, cudaGetErrorString(status_)); \
    } while (0)
