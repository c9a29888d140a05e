// Matrix products through cuBLASLt, with the contract of kernels/ops.h's Gemm (row-major), in
// cuBLASLt's column-major terms as gemm_layout.h maps them. Operands in the dtype the precision
// reads (bf16 products with fp32 accumulation, or fp32 throughout) go straight in; the others
// are converted into the workspace first (pack_at), as the CPU backend packs them.
#include <cublasLt.h>

#include <array>
#include <map>
#include <memory>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/gemm_layout.h"
#include "kernels/cuda/launch.h"

#define KILN_CUBLAS(call)                                                                \
    do {                                                                                 \
        cublasStatus_t status_ = (call);                                                 \
        if (status_ != CUBLAS_STATUS_SUCCESS)                                            \
            ::kiln::library_failed("cuBLASLt", #call, cublasLtGetStatusString(status_)); \
    } while (0)

namespace kiln::kernels::cuda {
namespace {

// cuBLASLt's own scratch per call; 32 MiB is what NVIDIA suggests for Hopper.
constexpr size_t kLtWorkspace = size_t(32) << 20;
constexpr size_t kAlign = 256;

size_t round_up(size_t n) {
    return (n + kAlign - 1) / kAlign * kAlign;
}

struct HandleDeleter {
    void operator()(cublasLtContext* h) const { cublasLtDestroy(h); }
};
struct DescDeleter {
    void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
};
struct LayoutDeleter {
    void operator()(cublasLtMatrixLayoutOpaque_t* l) const { cublasLtMatrixLayoutDestroy(l); }
};
struct PreferenceDeleter {
    void operator()(cublasLtMatmulPreferenceOpaque_t* p) const {
        cublasLtMatmulPreferenceDestroy(p);
    }
};
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter>;

cublasLtHandle_t handle() {
    static const std::unique_ptr<cublasLtContext, HandleDeleter> h = [] {
        cublasLtHandle_t raw = nullptr;
        KILN_CUBLAS(cublasLtCreate(&raw));
        return std::unique_ptr<cublasLtContext, HandleDeleter>(raw);
    }();
    return h.get();
}

// Column-major (rows, cols) with leading dimension ld.
Layout layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    cublasLtMatrixLayout_t raw = nullptr;
    KILN_CUBLAS(cublasLtMatrixLayoutCreate(&raw, type, uint64_t(rows), uint64_t(cols), ld));
    return Layout(raw);
}

// The largest power of two (at most kAlign) that divides the address.
uint32_t alignment(const void* p) {
    uint32_t a = kAlign;
    while (a > 1 && reinterpret_cast<uintptr_t>(p) % a)
        a /= 2;
    return a;
}

// What cuBLASLt needs for one product shape: its descriptors and the algorithm its heuristic
// chose, made once per shape (a step runs the same few shapes again and again; attention runs
// one per head) and kept for the process.
struct Plan {
    std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter> desc;
    Layout first, second, out;
    cublasLtMatmulAlgo_t algo;
};

const Plan& plan_for(cudaDataType_t type, const ColumnMajorProduct& p, uint32_t align_first,
                     uint32_t align_second, uint32_t align_c) {
    using Key = std::array<int64_t, 14>;
    static std::map<Key, Plan> plans;
    const Key key = {int64_t(type),
                     p.first.rows,
                     p.first.cols,
                     p.first.ld,
                     p.first.trans,
                     p.second.rows,
                     p.second.cols,
                     p.second.ld,
                     p.second.trans,
                     p.out.rows,
                     p.out.cols,
                     p.out.ld,
                     int64_t(align_first) << 32 | align_second,
                     align_c};
    if (auto it = plans.find(key); it != plans.end())
        return it->second;
    Plan plan;
    cublasLtMatmulDesc_t raw_desc = nullptr;
    KILN_CUBLAS(cublasLtMatmulDescCreate(&raw_desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    plan.desc.reset(raw_desc);
    const cublasOperation_t op_first = p.first.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = p.second.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
    KILN_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc.get(), CUBLASLT_MATMUL_DESC_TRANSA,
                                               &op_first, sizeof(op_first)));
    KILN_CUBLAS(cublasLtMatmulDescSetAttribute(plan.desc.get(), CUBLASLT_MATMUL_DESC_TRANSB,
                                               &op_second, sizeof(op_second)));
    plan.first = layout(type, p.first.rows, p.first.cols, p.first.ld);
    plan.second = layout(type, p.second.rows, p.second.cols, p.second.ld);
    plan.out = layout(CUDA_R_32F, p.out.rows, p.out.cols, p.out.ld);

    cublasLtMatmulPreference_t raw_pref = nullptr;
    KILN_CUBLAS(cublasLtMatmulPreferenceCreate(&raw_pref));
    const std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter> pref(raw_pref);
    const uint64_t max_ws = kLtWorkspace;
    KILN_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_ws, sizeof(max_ws)));
    KILN_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_first, sizeof(uint32_t)));
    KILN_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_second, sizeof(uint32_t)));
    KILN_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(uint32_t)));
    KILN_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(uint32_t)));
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    KILN_CUBLAS(cublasLtMatmulAlgoGetHeuristic(handle(), plan.desc.get(), plan.first.get(),
                                               plan.second.get(), plan.out.get(), plan.out.get(),
                                               pref.get(), 1, &result, &found));
    KILN_CHECK(found > 0, "cuBLASLt has no algorithm for the column-major product m={} n={} k={}",
               p.m, p.n, p.k);
    plan.algo = result.algo;
    return plans.emplace(key, std::move(plan)).first->second;
}

template <typename Out, typename In>
__global__ void pack_kernel(Out* dst, const In* src, int64_t cols, int64_t ld, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        pack_at(dst, src, cols, ld, i);
}

// A row-major operand stored (rows, cols) with row stride ld, in the dtype `want`: itself, or a
// dense converted copy at `scratch` (then ld becomes cols).
struct Operand {
    const void* ptr;
    int64_t ld;
};
Operand prepare(const void* src, DType type, int64_t rows, int64_t cols, int64_t ld, DType want,
                void* scratch) {
    if (type == want)
        return {src, ld};
    const int64_t n = rows * cols;
    if (want == DType::bf16) {
        pack_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
            static_cast<uint16_t*>(scratch), static_cast<const float*>(src), cols, ld, n);
    } else {
        pack_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
            static_cast<float*>(scratch), static_cast<const uint16_t*>(src), cols, ld, n);
    }
    KILN_CUDA(cudaGetLastError());
    return {scratch, cols};
}

}  // namespace

std::string device_platform() {
    int device = 0, driver = 0, runtime = 0;
    KILN_CUDA(cudaGetDevice(&device));
    cudaDeviceProp prop = {};
    KILN_CUDA(cudaGetDeviceProperties(&prop, device));
    KILN_CUDA(cudaDriverGetVersion(&driver));
    KILN_CUDA(cudaRuntimeGetVersion(&runtime));
    return fmt::format("{} (sm_{}{}); driver {}; CUDA runtime {}; cuBLASLt {}", prop.name,
                       prop.major, prop.minor, driver, runtime, cublasLtGetVersion());
}

size_t gemm_workspace_bytes(int64_t max_operand) {
    return 2 * round_up(size_t(max_operand) * 4) + kLtWorkspace;
}

void gemm(const Gemm& g, Precision precision, Workspace ws) {
    if (g.M == 0 || g.N == 0)
        return;
    if (g.K == 0) {  // an empty sum: C = 0, or C unchanged when accumulating
        if (!g.accumulate)
            KILN_CUDA(cudaMemset2DAsync(g.c, g.ldc * 4, 0, g.N * 4, g.M, stream()));
        return;
    }
    const DType want = compute_dtype(precision);
    const cudaDataType_t type = want == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
    // Stored shapes, row-major.
    const int64_t a_rows = g.trans_a ? g.K : g.M, a_cols = g.trans_a ? g.M : g.K;
    const int64_t b_rows = g.trans_b ? g.N : g.K, b_cols = g.trans_b ? g.K : g.N;
    char* scratch = static_cast<char*>(ws.ptr);
    // Room to convert an operand only where its dtype is not the one the product reads (weights
    // and activations the model keeps in the compute dtype go straight in).
    const size_t a_bytes = g.a_type == want ? 0 : round_up(size_t(a_rows * a_cols) * 4);
    const size_t b_bytes = g.b_type == want ? 0 : round_up(size_t(b_rows * b_cols) * 4);
    KILN_CHECK(ws.bytes >= a_bytes + b_bytes + kLtWorkspace,
               "gemm workspace of {} bytes, {} needed", ws.bytes, a_bytes + b_bytes + kLtWorkspace);
    const Operand a = prepare(g.a, g.a_type, a_rows, a_cols, g.lda, want, scratch);
    const Operand b = prepare(g.b, g.b_type, b_rows, b_cols, g.ldb, want, scratch + a_bytes);
    void* lt_workspace = scratch + a_bytes + b_bytes;

    const ColumnMajorProduct p = column_major(g, a.ld, b.ld);
    // The algorithms offered must suit the pointers' actual alignment.
    const Plan& plan = plan_for(type, p, alignment(b.ptr), alignment(a.ptr), alignment(g.c));
    const float alpha = g.alpha, beta = g.accumulate ? 1.0f : 0.0f;
    KILN_CUBLAS(cublasLtMatmul(handle(), plan.desc.get(), &alpha, b.ptr, plan.first.get(), a.ptr,
                               plan.second.get(), &beta, g.c, plan.out.get(), g.c, plan.out.get(),
                               &plan.algo, lt_workspace, kLtWorkspace, stream()));
    finish_launch();
}

}  // namespace kiln::kernels::cuda
