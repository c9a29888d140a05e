// The CUDA ops against the double-precision reference; skipped on machines without a GPU.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/backends.h"
#include "kernels/reference/reference.h"

#ifdef KILN_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda.h"
#endif

namespace kiln::kernels {
namespace {

#ifdef KILN_HAVE_CUDA
struct DeviceBuffer {
    float* ptr = nullptr;
    explicit DeviceBuffer(const std::vector<float>& host) {
        cudaMalloc(&ptr, host.size() * 4);
        cudaMemcpy(ptr, host.data(), host.size() * 4, cudaMemcpyHostToDevice);
    }
    std::vector<float> to_host(size_t n) const {
        std::vector<float> h(n);
        cudaMemcpy(h.data(), ptr, n * 4, cudaMemcpyDeviceToHost);
        return h;
    }
    ~DeviceBuffer() { cudaFree(ptr); }
};

std::vector<float> randn(size_t n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> d;
    std::vector<float> v(n);
    for (auto& x : v)
        x = d(rng);
    return v;
}

TEST(Cuda, OpsMatchReference) {
    if (!cuda_available())
        GTEST_SKIP() << "no CUDA device";
    const auto& ref = reference_kernels(Precision::fp32);
    const int64_t M = 33, C = 200, F = 50;
    auto x = randn(M * C, 1), w = randn(C, 2);
    std::vector<float> out(M * C), rstd(M);
    ref.rmsnorm_forward(out.data(), DType::f32, rstd.data(), x.data(), w.data(), M, C, 1e-5f);
    DeviceBuffer dx(x), dw(w), dout(std::vector<float>(M * C, 0.0f)),
        drstd(std::vector<float>(M, 0.0f));
    cuda::rmsnorm_forward(dout.ptr, drstd.ptr, dx.ptr, dw.ptr, M, C, 1e-5f);
    auto got = dout.to_host(M * C);
    for (int64_t i = 0; i < M * C; i++)
        ASSERT_NEAR(got[i], out[i], 1e-4 + 1e-4 * std::fabs(out[i]));

    auto gu = randn(M * 2 * F, 3);
    std::vector<float> h(M * F);
    ref.swiglu_forward(h.data(), DType::f32, gu.data(), M, F);
    DeviceBuffer dgu(gu), dh(std::vector<float>(M * F, 0.0f));
    cuda::swiglu_forward(dh.ptr, dgu.ptr, M, F);
    auto hg = dh.to_host(M * F);
    for (int64_t i = 0; i < M * F; i++)
        ASSERT_NEAR(hg[i], h[i], 1e-5 + 1e-5 * std::fabs(h[i]));

    const int64_t n = 5000;
    auto p = randn(n, 4), g = randn(n, 5), m = randn(n, 6), v = randn(n, 7);
    for (auto& e : v)
        e = e * e;
    DeviceBuffer dp(p), dm(m), dv(v), dg(g);
    AdamWStep s{1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 2};
    ref.adamw(p.data(), nullptr, m.data(), v.data(), g.data(), n, s);
    cuda::adamw(dp.ptr, nullptr, dm.ptr, dv.ptr, dg.ptr, n, s);
    auto pg = dp.to_host(n);
    for (int64_t i = 0; i < n; i++)
        ASSERT_NEAR(pg[i], p[i], 1e-6 + 1e-5 * std::fabs(p[i]));
}
#else
TEST(Cuda, OpsMatchReference) {
    GTEST_SKIP() << "built without CUDA";
}
#endif

}  // namespace
}  // namespace kiln::kernels
