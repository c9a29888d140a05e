#pragma once
// Launch shapes shared by the CUDA kernels (nvcc only): grid-stride loops for elementwise ops,
// one block per row for row ops, and the block reduction whose order kernel_math.h documents.
#include <algorithm>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kernel_math.h"

namespace kiln::kernels::cuda {

constexpr int kElementThreads = 256;
static_assert(kRowThreads % 32 == 0 && kRowThreads <= 1024, "whole warps, one block");

// Blocks of kElementThreads for n elements; past 65535 blocks the grid-stride loop goes round.
inline unsigned element_blocks(int64_t n) {
    return static_cast<unsigned>(std::max<int64_t>(
        1, std::min<int64_t>((n + kElementThreads - 1) / kElementThreads, 65535)));
}

// fn(x typed): x as float* or uint16_t*, as `type` says, so that each kernel a launch names is
// built for both dtypes (a caller that only reads takes it as `const auto*`).
template <typename Fn>
void typed(const void* x, DType type, Fn&& fn) {
    if (type == DType::bf16)
        fn(static_cast<uint16_t*>(const_cast<void*>(x)));
    else
        fn(static_cast<float*>(const_cast<void*>(x)));
}

// The flat indices of a grid-stride loop: for (int64_t i = first_index(); i < n; i += stride())
__device__ __forceinline__ int64_t first_index() {
    return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t stride() {
    return int64_t(gridDim.x) * blockDim.x;
}

__device__ __forceinline__ float shfl_xor(float v, int o) {
    return __shfl_xor_sync(0xffffffffu, v, o);
}
__device__ __forceinline__ double shfl_xor(double v, int o) {
    return __shfl_xor_sync(0xffffffffu, v, o);
}
__device__ __forceinline__ MaxSum shfl_xor(MaxSum v, int o) {
    return {__shfl_xor_sync(0xffffffffu, v.max, o), __shfl_xor_sync(0xffffffffu, v.sum, o)};
}

// The whole block's combine of every thread's v, in the order of kernel_math.h; every thread
// gets the result. Called by all threads of the block; safe to call again right after.
template <typename T, typename Combine>
__device__ T block_reduce(T v, T identity, Combine combine) {
    __shared__ T slots[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int o = 16; o > 0; o /= 2)
        v = combine(v, shfl_xor(v, o));
    if (lane == 0)
        slots[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? slots[lane] : identity;
        for (int o = 16; o > 0; o /= 2)
            v = combine(v, shfl_xor(v, o));
        if (lane == 0)
            slots[0] = v;
    }
    __syncthreads();
    const T result = slots[0];
    __syncthreads();  // before a next call overwrites the slots
    return result;
}

// The stream every op of this process runs on, in order (created on first use). A blocking
// stream: work on the legacy default stream (a plain cudaMemcpy) and on other blocking streams
// (NCCL's) is ordered with it, so no op waits for another's kernels but where the host reads.
cudaStream_t stream();
// Whether every launch waits for its kernel: KILN_CUDA_SYNC=1 in the environment, to name the
// op whose kernel failed at the cost of speed. Read once.
bool sync_each_launch();

// After a launch: the launch's own error; with sync_each_launch(), the kernel's too.
inline void finish_launch() {
    KILN_CUDA(cudaGetLastError());
    if (sync_each_launch())
        KILN_CUDA(cudaStreamSynchronize(stream()));
}

}  // namespace kiln::kernels::cuda
