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
    if (row >= M) return;
    const float* xr = x + row * C;
    float ss = 0;
    for (int64_t c = lane; c < C; c += 32) ss += xr[c] * xr[c];
    for (int offset = 16; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffff, ss, offset);
    float r = rsqrtf(ss / C + eps);
    if (lane == 0) rstd[row] = r;
    for (int64_t c = lane; c < C; c += 32) out[row * C + c] = xr[c] * r * w[c];
}

__global__ void swiglu_forward_kernel(float* h, const float* gu, int64_t M, int64_t F) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * F;
         i += int64_t(gridDim.x) * blockDim.x) {
        int64_t m = i / F, f = i % F;
        float g = gu[m * 2 * F + f], u = gu[m * 2 * F + F + f];
        h[i] = g / (1.0f + expf(-g)) * u;
    }
}

__global__ void adamw_kernel(float* p, float* m, float* v, const float* g, int64_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay, float bc1,
                             float bc2_sqrt) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * blockDim.x) {
        float mi = beta1 * m[i] + (1.0f - beta1) * g[i];
        float vi = beta2 * v[i] + (1.0f - beta2) * g[i] * g[i];
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr / bc1 * mi / (sqrtf(vi) / bc2_sqrt + eps) + lr * weight_decay * p[i];
    }
}

int blocks_for(int64_t n, int threads) {
    return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t M,
                     int64_t C, float eps) {
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

void adamw(float* p, float* m, float* v, const float* g, int64_t n, float lr, float beta1,
           float beta2, float eps, float weight_decay, int64_t t) {
    float bc1 = static_cast<float>(1.0 - std::pow(double(beta1), double(t)));
    float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(double(beta2), double(t))));
    adamw_kernel<<<blocks_for(n, 256), 256>>>(p, m, v, g, n, lr, beta1, beta2, eps, weight_decay,
                                              bc1, bc2_sqrt);
    KILN_CUDA(cudaGetLastError());
    KILN_CUDA(cudaDeviceSynchronize());
}

}  // namespace kiln::kernels::cuda
