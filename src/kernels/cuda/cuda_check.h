#pragma once
// Converts a CUDA status into kiln's invariant check, with CUDA's own message.
#include <cuda_runtime.h>

#include "core/error.h"

#define KILN_CUDA(call)                                                                          \
    do {                                                                                         \
        cudaError_t status_ = (call);                                                            \
        KILN_CHECK(status_ == cudaSuccess, "{} failed: {}", #call, cudaGetErrorString(status_)); \
    } while (0)
