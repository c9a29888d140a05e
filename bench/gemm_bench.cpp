// GEMM throughput on the matrix products of a training step.
//
// Families (one per backend x precision), each over the same shapes:
//   kiln_fp32/...      kiln::kernels::cpu_kernels(fp32).gemm
//   kiln_bf16/...      kiln::kernels::cpu_kernels(bf16).gemm, weight operand already bf16
//   openblas_fp32/...  cblas_sgemm
//
// Every product is C (M, N) = A (M, K) · B^T with B stored (N, K), the layout of a Linear
// weight, as in the model's forward pass. Shapes are those of the tiny and small presets at
// their benchmark batch sizes (M = B*T = 2048 rows), an LM-head chunk of 128 rows, and a
// square 2048^3 product used as the ceiling.
//
// Threads: kiln runs on OpenMP (OMP_NUM_THREADS), OpenBLAS on its own pool
// (OPENBLAS_NUM_THREADS); OPENBLAS_CORETYPE selects OpenBLAS's kernel. All three are shown in
// the benchmark context.
//
//   build/bench/bench_gemm --benchmark_filter='kiln_bf16/.*'
#include <benchmark/benchmark.h>
#include <cblas.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kernels/cpu/cpu.h"
#include "kernels/ops.h"
#include "kernels/table.h"

namespace {

using kiln::DType;
using kiln::kernels::Precision;

struct Shape {
    std::string name;
    int64_t M, N, K;
};

// C model dim, F ffn hidden dim, V vocabulary, M rows of a micro-batch.
void add_model(std::vector<Shape>& out, const std::string& preset, int64_t C, int64_t F, int64_t V,
               int64_t M) {
    out.push_back({preset + "/qkv", M, 3 * C, C});
    out.push_back({preset + "/out_proj", M, C, C});
    out.push_back({preset + "/gate_up", M, 2 * F, C});
    out.push_back({preset + "/down", M, C, F});
    out.push_back({preset + "/lm_head_chunk", 128, V, C});
}

std::vector<Shape> shapes() {
    std::vector<Shape> s;
    add_model(s, "tiny", 288, 768, 32000, 8 * 256);
    add_model(s, "small", 512, 1376, 32000, 4 * 512);
    s.push_back({"square", 2048, 2048, 2048});
    return s;
}

std::vector<float> random_matrix(int64_t n, uint32_t seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    std::vector<float> v(n);
    for (auto& x : v)
        x = dist(gen);
    return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); i++)
        out[i] = kiln::f32_to_bf16(v[i]);
    return out;
}

void set_counters(benchmark::State& state, const Shape& s) {
    state.counters["GFLOP/s"] = benchmark::Counter(2.0 * s.M * s.N * s.K * 1e-9,
                                                   benchmark::Counter::kIsIterationInvariantRate,
                                                   benchmark::Counter::kIs1000);
    state.SetLabel(std::to_string(s.M) + "x" + std::to_string(s.N) + "x" + std::to_string(s.K));
}

// One Gemm descriptor for A (M, K) · B^T, B stored (N, K) as `b_type`.
kiln::kernels::Gemm make_gemm(const Shape& s, const float* a, const void* b, DType b_type,
                              float* c) {
    kiln::kernels::Gemm g;
    g.M = s.M, g.N = s.N, g.K = s.K;
    g.a = a, g.lda = s.K, g.a_type = DType::f32;
    g.b = b, g.ldb = s.K, g.trans_b = true, g.b_type = b_type;
    g.c = c, g.ldc = s.N;
    return g;
}

void bm_kiln(benchmark::State& state, Shape s, Precision p) {
    const kiln::kernels::Kernels& k = kiln::kernels::cpu_kernels(p);
    std::vector<float> a = random_matrix(s.M * s.K, 1);
    std::vector<float> b = random_matrix(s.N * s.K, 2);
    std::vector<uint16_t> b16;
    std::vector<float> c(s.M * s.N);
    std::vector<char> ws(k.workspace_bytes(s.M * s.K + s.N * s.K, kiln::kernels::Attention{}));
    // As in the model: in bf16 mode the weights are kept in bf16 (converted once per update),
    // the activations arrive in f32 and are rounded inside the call.
    const void* bp = b.data();
    DType bt = DType::f32;
    if (p == Precision::bf16) {
        b16 = to_bf16(b);
        bp = b16.data();
        bt = DType::bf16;
    }
    kiln::kernels::Gemm g = make_gemm(s, a.data(), bp, bt, c.data());
    kiln::kernels::Workspace w{ws.data(), ws.size()};
    for (auto _ : state) {
        k.gemm(g, w);
        benchmark::DoNotOptimize(c.data());
        benchmark::ClobberMemory();
    }
    set_counters(state, s);
}

void bm_openblas(benchmark::State& state, Shape s) {
    std::vector<float> a = random_matrix(s.M * s.K, 1);
    std::vector<float> b = random_matrix(s.N * s.K, 2);
    std::vector<float> c(s.M * s.N);
    for (auto _ : state) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(s.M), int(s.N), int(s.K), 1.0f,
                    a.data(), int(s.K), b.data(), int(s.K), 0.0f, c.data(), int(s.N));
        benchmark::DoNotOptimize(c.data());
        benchmark::ClobberMemory();
    }
    set_counters(state, s);
}

// Checks, on a small odd shape, that the kiln calls compute what OpenBLAS computes (so the
// operand layouts above mean what they claim). Returns false on a mismatch.
bool self_check() {
    const Shape s{"check", 67, 45, 99};
    std::vector<float> a = random_matrix(s.M * s.K, 3);
    std::vector<float> b = random_matrix(s.N * s.K, 4);
    std::vector<float> ref(s.M * s.N);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(s.M), int(s.N), int(s.K), 1.0f,
                a.data(), int(s.K), b.data(), int(s.K), 0.0f, ref.data(), int(s.N));
    bool ok = true;
    for (Precision p : {Precision::fp32, Precision::bf16}) {
        if (p == Precision::bf16 && !kiln::kernels::cpu::cpu_info().bf16_products)
            continue;  // no bf16 products here: the kiln_bf16 cases are not registered either
        const kiln::kernels::Kernels& k = kiln::kernels::cpu_kernels(p);
        std::vector<uint16_t> b16 = to_bf16(b);
        std::vector<float> c(s.M * s.N);
        std::vector<char> ws(k.workspace_bytes(s.M * s.K + s.N * s.K, kiln::kernels::Attention{}));
        bool half = p == Precision::bf16;
        kiln::kernels::Gemm g = make_gemm(
            s, a.data(),
            half ? static_cast<const void*>(b16.data()) : static_cast<const void*>(b.data()),
            half ? DType::bf16 : DType::f32, c.data());
        k.gemm(g, {ws.data(), ws.size()});
        // bf16 rounding of both operands: relative error ~2^-8 per term, K = 99 terms of
        // magnitude <= 1, so |error| well under 0.5; fp32 should agree to ~1e-4.
        double tol = half ? 0.5 : 1e-3, worst = 0;
        for (size_t i = 0; i < c.size(); i++)
            worst = std::max(worst, double(std::fabs(c[i] - ref[i])));
        if (!(worst <= tol)) {
            std::fprintf(stderr, "self-check failed: %s gemm differs from cblas_sgemm by %g\n",
                         k.name, worst);
            ok = false;
        }
    }
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv))
        return 1;
    if (!self_check())
        return 1;

    const char* coretype = std::getenv("OPENBLAS_CORETYPE");
    benchmark::AddCustomContext("omp_max_threads", std::to_string(omp_get_max_threads()));
    benchmark::AddCustomContext("openblas_threads", std::to_string(openblas_get_num_threads()));
    benchmark::AddCustomContext("openblas_core", openblas_get_corename());
    benchmark::AddCustomContext("openblas_config", openblas_get_config());
    benchmark::AddCustomContext("OPENBLAS_CORETYPE", coretype ? coretype : "(unset)");

    for (const Shape& s : shapes()) {
        benchmark::RegisterBenchmark(("kiln_fp32/" + s.name).c_str(), bm_kiln, s, Precision::fp32)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
        if (kiln::kernels::cpu::cpu_info().bf16_products) {
            benchmark::RegisterBenchmark(("kiln_bf16/" + s.name).c_str(), bm_kiln, s,
                                         Precision::bf16)
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime();
        }
        benchmark::RegisterBenchmark(("openblas_fp32/" + s.name).c_str(), bm_openblas, s)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
