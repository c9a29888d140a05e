// The CUDA backend's row ops: one thread block per row (RMSNorm's backward: per chunk of rows),
// with kernel_math.h's per-thread shares and the block reduction of launch.h (RMSNorm,
// cross-entropy), plus RMSNorm's column sums.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/launch.h"

namespace kiln::kernels::cuda {
namespace {

template <typename Out>
__global__ void rmsnorm_forward_kernel(Out* out, float* rstd, const float* x, const float* w,
                                       int64_t C, float eps) {
    const int64_t row = blockIdx.x;
    const float* xr = x + row * C;
    const float ss = block_reduce(rmsnorm_sumsq(xr, C, threadIdx.x, blockDim.x), 0.0f, Sum{});
    const float r = rmsnorm_rstd(ss, C, eps);
    if (threadIdx.x == 0)
        rstd[row] = r;
    rmsnorm_scale(out + row * C, xr, w, r, C, threadIdx.x, blockDim.x);
}

// A chunk of `rows` rows a block: each row's dx (and its bf16 rounding), and the chunk's sums of
// dw's terms per column (C floats) in shared memory, or where a row of C floats does not fit
// there, in the chunk's row of chunk_sums itself; either way written to chunk_sums. A thread's
// columns are the same in the dot, dx and the sums, so it reads each element once from memory,
// and no other thread touches its sums.
__global__ void rmsnorm_backward_kernel(float* dx, uint16_t* dx_bf16, float* chunk_sums,
                                        const float* dout, const float* x, const float* w,
                                        const float* rstd, int64_t M, int64_t C, int64_t rows,
                                        bool in_shared) {
    extern __shared__ float shared_sums[];
    float* mine = chunk_sums + blockIdx.x * C;
    float* acc = in_shared ? shared_sums : mine;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
        acc[c] = 0.0f;
    const int64_t m0 = blockIdx.x * rows, m1 = m0 + rows < M ? m0 + rows : M;
    for (int64_t m = m0; m < m1; m++) {
        const float* dr = dout + m * C;
        const float* xr = x + m * C;
        const float dot =
            block_reduce(rmsnorm_dot(dr, w, xr, C, threadIdx.x, blockDim.x), 0.0f, Sum{});
        rmsnorm_dx(dx + m * C, dx_bf16 ? dx_bf16 + m * C : nullptr, dr, w, xr, rstd[m], dot, C,
                   threadIdx.x, blockDim.x);
        rmsnorm_dw_add(acc, dr, xr, rstd[m], C, threadIdx.x, blockDim.x);
    }
    if (in_shared) {
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
            mine[c] = acc[c];
    }
}

__global__ void rmsnorm_dw_kernel(float* dw, const float* chunk_sums, int64_t chunks, int64_t C) {
    for (int64_t c = first_index(); c < C; c += stride())
        rmsnorm_dw_column(dw, chunk_sums, chunks, C, c);
}

// Device memory for the chunks' sums: ops queue on one stream, so one buffer serves every call in
// turn. A larger shape gets a larger one; the smaller stays allocated, as a recorded graph may
// still write it.
float* rmsnorm_chunk_sums(size_t floats) {
    static float* sums = nullptr;
    static size_t have = 0;
    if (floats > have) {
        float* larger = nullptr;
        KILN_CUDA(cudaMalloc(&larger, floats * sizeof(float)));
        sums = larger, have = floats;
    }
    return sums;
}

__global__ void logit_stats_kernel(const float* logits, const int32_t* targets, int64_t V,
                                   float* max, float* sumexp, float* target_logit) {
    const int64_t row = blockIdx.x;
    const float* r = logits + row * V;
    const MaxSum s =
        block_reduce(xent_fold(r, V, threadIdx.x, blockDim.x), maxsum_identity(), MaxSumCombine{});
    if (threadIdx.x == 0) {
        max[row] = s.max;
        sumexp[row] = s.sum;
        target_logit[row] = targets[row] >= 0 ? r[targets[row]] : 0.0f;
    }
}

template <typename Out>
__global__ void cross_entropy_backward_kernel(const float* logits, const int32_t* targets,
                                              const float* max, const float* sumexp,
                                              const float* row_scale, int64_t V, Out* dlogits) {
    const int64_t row = blockIdx.x;
    xent_gradient(dlogits + row * V, logits + row * V, V, targets[row], max[row], sumexp[row],
                  row_scale[row], threadIdx.x, blockDim.x);
}

// Loss and (when dlogits is not null) gradient of a row in one launch; the target logit is read
// before the reduction's barrier, so before any thread overwrites the row (f32 dlogits may
// alias logits).
template <typename Out>
__global__ void cross_entropy_kernel(const float* logits, const int32_t* targets,
                                     const float* row_scale, int64_t V, float* losses,
                                     Out* dlogits) {
    const int64_t row = blockIdx.x;
    const float* r = logits + row * V;
    const int32_t target = targets[row];
    const float target_logit = target >= 0 ? r[target] : 0.0f;
    const MaxSum s =
        block_reduce(xent_fold(r, V, threadIdx.x, blockDim.x), maxsum_identity(), MaxSumCombine{});
    if (threadIdx.x == 0)
        losses[row] = xent_loss(s, target_logit, target);
    if (dlogits) {
        xent_gradient(dlogits + row * V, r, V, target, s.max, s.sum, row_scale[row], threadIdx.x,
                      blockDim.x);
    }
}

}  // namespace

void rmsnorm_forward(void* out, DType out_type, float* rstd, const float* x, const float* w,
                     int64_t M, int64_t C, float eps) {
    if (M == 0)
        return;
    if (out_type == DType::bf16) {
        rmsnorm_forward_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream()>>>(
            static_cast<uint16_t*>(out), rstd, x, w, C, eps);
    } else {
        rmsnorm_forward_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream()>>>(
            static_cast<float*>(out), rstd, x, w, C, eps);
    }
    finish_launch();
}

void rmsnorm_backward(float* dx, uint16_t* dx_bf16, float* dw, const float* dout, const float* x,
                      const float* w, const float* rstd, int64_t M, int64_t C) {
    if (M == 0)
        return;
    const int64_t rows = rmsnorm_dw_rows(M), chunks = (M + rows - 1) / rows;
    float* sums = rmsnorm_chunk_sums(size_t(chunks * C));
    // The sums in shared memory where C floats fit beside block_reduce's 32 slots: past 48 KB a
    // block only by asking, and never past the device's limit for one block.
    static const size_t most = [] {
        int device = 0, bytes = 0;
        KILN_CUDA(cudaGetDevice(&device));
        KILN_CUDA(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
        return size_t(bytes);
    }();
    const size_t slots = 32 * sizeof(float), bytes = size_t(C) * sizeof(float);
    const bool in_shared = bytes + slots <= most;
    const size_t shared = in_shared ? bytes : 0;
    if (shared + slots > 48 * 1024) {
        KILN_CUDA(cudaFuncSetAttribute(rmsnorm_backward_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
    }
    rmsnorm_backward_kernel<<<static_cast<unsigned>(chunks), kRowThreads, shared, stream()>>>(
        dx, dx_bf16, sums, dout, x, w, rstd, M, C, rows, in_shared);
    rmsnorm_dw_kernel<<<element_blocks(C), kElementThreads, 0, stream()>>>(dw, sums, chunks, C);
    finish_launch();
}

void logit_stats(const float* logits, const int32_t* targets, int64_t M, int64_t V, float* max,
                 float* sumexp, float* target_logit) {
    if (M == 0)
        return;
    logit_stats_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream()>>>(
        logits, targets, V, max, sumexp, target_logit);
    finish_launch();
}

void cross_entropy_backward(const float* logits, const int32_t* targets, const float* max,
                            const float* sumexp, const float* row_scale, int64_t M, int64_t V,
                            void* dlogits, DType dlogits_type) {
    if (M == 0)
        return;
    if (dlogits_type == DType::bf16) {
        cross_entropy_backward_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream()>>>(
            logits, targets, max, sumexp, row_scale, V, static_cast<uint16_t*>(dlogits));
    } else {
        cross_entropy_backward_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream()>>>(
            logits, targets, max, sumexp, row_scale, V, static_cast<float*>(dlogits));
    }
    finish_launch();
}

void cross_entropy(const float* logits, const int32_t* targets, const float* row_scale, int64_t M,
                   int64_t V, float* losses, void* dlogits, DType dlogits_type) {
    if (M == 0)
        return;
    if (dlogits_type == DType::bf16) {
        cross_entropy_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream()>>>(
            logits, targets, row_scale, V, losses, static_cast<uint16_t*>(dlogits));
    } else {
        cross_entropy_kernel<<<static_cast<unsigned>(M), kRowThreads, 0, stream()>>>(
            logits, targets, row_scale, V, losses, static_cast<float*>(dlogits));
    }
    finish_launch();
}

}  // namespace kiln::kernels::cuda
