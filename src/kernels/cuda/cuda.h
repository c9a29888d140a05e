#pragma once
// The CUDA backend's first ops (device pointers, same contracts as kernels/ops.h). Only the ops
// below exist so far; the model does not run on CUDA yet.
#include <cstdint>

#include "kernels/ops.h"

namespace kiln::kernels::cuda {

int device_count();  // 0 when there is no usable device or driver

// Same contracts as the Kernels table entries of the same names, with f32 outputs only;
// pointers are device memory; each call is synchronous on the default stream.
void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t M, int64_t C,
                     float eps);
void swiglu_forward(float* h, const float* gu, int64_t M, int64_t F);
void adamw(float* p, uint16_t* p_bf16, float* m, float* v, const float* g, int64_t n,
           const AdamWStep& s);

}  // namespace kiln::kernels::cuda
