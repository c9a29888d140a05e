// Row-wise ops on CUDA: one warp-per-row RMSNorm, grid-stride SwiGLU and AdamW.
#include <cmath>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cuda_check.h"

namespace kiln::kernels::cuda {
namespace {

__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* x, const float* w,
                                       int64_t M, int64_t C, float eps) {
    int64_t row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= M)
        return;
    const float* xr = x + row * C;
    float ss = 0;
    for (int64_t c = lane; c < C; c += 32)
        ss += xr[c] * xr[c];
    for (int offset = 16; offset > 0; offset /= 2)
        ss += __shfl_xor_sync(0xffffffff, ss, offset);
    float r = rsqrtf(ss / C + eps);
    if (lane == 0)
        rstd[row] = r;
    for (int64_t c = lane; c < C; c += 32)
        out[row * C + c] = xr[c] * r * w[c];
}

__global__ void swiglu_forward_kernel(float* h, const float* gu, int64_t M, int64_t F) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * F;
         i += int64_t(gridDim.x) * blockDim.x) {
        int64_t m = i / F, f = i % F;
        float g = gu[m * 2 * F + f], u = gu[m * 2 * F + F + f];
        h[i] = g / (1.0f + expf(-g)) * u;
    }
}

__global__ void adamw_kernel(float* p, uint16_t* p_bf16, float* m, float* v, const float* g,
                             int64_t n, AdamWStep s, float bc1, float bc2_sqrt) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x) {
        float gi = s.grad_scale * g[i];
        float mi = s.beta1 * m[i] + (1.0f - s.beta1) * gi;
        float vi = s.beta2 * v[i] + (1.0f - s.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float pi = p[i] - (s.lr / bc1 * mi / (sqrtf(vi) / bc2_sqrt + s.eps) +
                           s.lr * s.weight_decay * p[i]);
        p[i] = pi;
        if (p_bf16) {
            uint32_t u = __float_as_uint(pi);
            p_bf16[i] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
}

int blocks_for(int64_t n, int threads) {
    return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t M, int64_t C,
                     float eps) {
    const int warps = 8;
    rmsnorm_forward_kernel<<<static_cast<unsigned>((M + warps - 1) / warps), warps * 32>>>(
        out, rstd, x, w, M, C, eps);
    KILN_CUDA(cudaGetLastError());
    KILN_CUDA(cudaDeviceSynchronize());
}

void swiglu_forward(float* h, const float* gu, int64_t M, int64_t F) {
    swiglu_forward_kernel<<<blocks_for(M * F, 256), 256>>>(h, gu, M, F);
    KILN_CUDA(cudaGetLastError());
    KILN_CUDA(cudaDeviceSynchronize());
}

void adamw(float* p, uint16_t* p_bf16, float* m, float* v, const float* g, int64_t n,
           const AdamWStep& s) {
    float bc1 = static_cast<float>(1.0 - std::pow(double(s.beta1), double(s.t)));
    float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(double(s.beta2), double(s.t))));
    adamw_kernel<<<blocks_for(n, 256), 256>>>(p, p_bf16, m, v, g, n, s, bc1, bc2_sqrt);
    KILN_CUDA(cudaGetLastError());
    KILN_CUDA(cudaDeviceSynchronize());
}

}  // namespace kiln::kernels::cuda
