// Matrix products through cuBLASLt, with the contract of kernels/ops.h's Gemm (row-major), in
// cuBLASLt's column-major terms as gemm_layout.h maps them. Operands in the dtype the precision
// reads (bf16 products with fp32 accumulation, or fp32 throughout) go straight in; the others
// are converted into the workspace first (pack_at), as the CPU backend packs them.
//
// Autotuning (table.h's tune .. use): a product shape's candidates are the algorithms cuBLASLt's
// heuristic ranks first for it (at most kCandidates), named by their rank ("heuristic 2"), which
// a plan holds for the platform it names (GPU, driver, cuBLASLt version): the same library on
// the same GPU ranks the same algorithms. Only those whose result has the default's bits are
// kept (split-K and other reduction orders are not), so a tuned run computes the numbers of an
// untuned one. Each is timed by events around its products, where the training step runs them.
#include <cublasLt.h>

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

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

// What cuBLASLt needs for one product shape: its descriptors, the algorithms its heuristic
// ranks first, and the one it runs (the plan's choice, else the first), made once per shape (a
// step runs the same few shapes again and again; attention's products rung one per head) and
// kept until a plan is chosen.
struct Product {
    std::string name;
    std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter> desc;
    Layout first, second, out;
    std::vector<cublasLtMatmulAlgo_t> ranked;
    cublasLtMatmulAlgo_t algo;
};

constexpr int kCandidates = 6;    // heuristic ranks tried
constexpr int kRounds = 2;        // passes each candidate is timed in
constexpr double kMargin = 0.03;  // another than the first must be this much faster

using Key = std::array<int64_t, 14>;

// A shape being tuned: its candidates (ranks; [0] is the default) and their least time in one
// pass, the events around this pass's products.
struct Trial {
    std::vector<int> ranks;
    std::vector<double> fastest;
    std::vector<std::pair<cudaEvent_t, cudaEvent_t>> timed;
};

struct State {
    std::map<Key, Product> products;
    bool tuning = false;
    int part = 0, parts = 1, pass = 0;    // pass 0: the pass that finds the shapes
    std::map<std::string, Trial> trials;  // by product name
    kernels::Plan plan, tuned;
};

State& state() {
    static State s;
    return s;
}

// Which of `parts` tunes a shape: FNV-1a of its name, the same on every rank.
int part_of(const std::string& name, int parts) {
    uint64_t h = 14695981039346656037ull;
    for (unsigned char c : name)
        h = (h ^ c) * 1099511628211ull;
    return int(h % uint64_t(parts));
}

std::string choice_name(int rank) {
    return fmt::format("heuristic {}", rank);
}

// The rank a plan's choice names, or 0 (the default) for one this library does not offer.
int chosen_rank(const Product& p, const kernels::Plan& plan) {
    const auto it = plan.find(p.name);
    for (int r = 1; it != plan.end() && r < int(p.ranked.size()); r++) {
        if (it->second == choice_name(r))
            return r;
    }
    return 0;
}

Product& product_for(cudaDataType_t type, cudaDataType_t out_type, const ColumnMajorProduct& p,
                     uint32_t align_first, uint32_t align_second, uint32_t align_c) {
    State& st = state();
    const Key key = {int64_t(type) << 16 | int64_t(out_type),
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
    if (auto it = st.products.find(key); it != st.products.end())
        return it->second;
    Product plan;
    plan.name = fmt::format(
        "{} {}x{}x{} {}{} ld {} {} {} align {} {} {}{}", type == CUDA_R_16BF ? "bf16" : "f32", p.m,
        p.n, p.k, p.first.trans ? "T" : "N", p.second.trans ? "T" : "N", p.first.ld, p.second.ld,
        p.out.ld, align_first, align_second, align_c, out_type == CUDA_R_16BF ? " to bf16" : "");
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
    plan.out = layout(out_type, p.out.rows, p.out.cols, p.out.ld);

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
    cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
    int found = 0;
    KILN_CUBLAS(cublasLtMatmulAlgoGetHeuristic(handle(), plan.desc.get(), plan.first.get(),
                                               plan.second.get(), plan.out.get(), plan.out.get(),
                                               pref.get(), kCandidates, results, &found));
    KILN_CHECK(found > 0, "cuBLASLt has no algorithm for the column-major product m={} n={} k={}",
               p.m, p.n, p.k);
    for (int i = 0; i < found; i++) {
        if (results[i].state == CUBLAS_STATUS_SUCCESS)
            plan.ranked.push_back(results[i].algo);
    }
    KILN_CHECK(!plan.ranked.empty(), "cuBLASLt's algorithms for the product {} all failed",
               plan.name);
    plan.algo = plan.ranked[size_t(chosen_rank(plan, st.plan))];
    return st.products.emplace(key, std::move(plan)).first->second;
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

// differs = 1 where got and want (M, N) row stride ld, f32 or bf16, differ in any bit.
__device__ uint32_t bits_of(float x) {
    return float_bits(x);
}
__device__ uint32_t bits_of(uint16_t x) {
    return x;
}
template <typename T>
__global__ void differ_kernel(int* differs, const T* got, const T* want, int64_t M, int64_t N,
                              int64_t ld) {
    for (int64_t i = first_index(); i < M * N; i += stride()) {
        const int64_t at = i / N * ld + i % N;
        if (bits_of(got[at]) != bits_of(want[at]))
            *differs = 1;
    }
}

// Fills x (n elements of its dtype) with values in [-0.5, 0.5) from a hash of the index: every
// bit of a product's rounding shows in its sums.
template <typename T>
__global__ void hash_fill_kernel(T* x, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        store(x + i, float(uint32_t(i * 2654435761u) >> 8) / 16777216.0f - 0.5f);
}

// One run of the product with `algo` on operands (first, second) in the product's layouts
// into c, beta 0 (c only written) or 1 (c_in added: c itself, or another matrix of its layout,
// which cuBLASLt reads in the epilogue and leaves as it is).
using Run = cublasStatus_t (*)(const void* ctx, const cublasLtMatmulAlgo_t& algo, const void* first,
                               const void* second, const void* c_in, void* c, float beta);

// The ranks whose result has the default's bits, each run once with beta 0 on operands of its
// own, pseudo-random (the pass's may be zeros, as a pipeline stage's throwaway pass is, where
// any summation order agrees), and compared on the device; only the default when the scratch
// cannot be had, or when the output is bf16: rounding to bf16 hides most last-bit differences
// of the f32 sums, so on a small product another summation order could pass for the default's.
Trial discover(const Product& prod, const ColumnMajorProduct& p, cudaDataType_t type,
               cudaDataType_t out_type, Run run, const void* ctx) {
    Trial t;
    t.ranks = {0};
    t.fastest.assign(1, 1e300);
    if (out_type == CUDA_R_16BF)
        return t;
    const size_t size = type == CUDA_R_16BF ? 2 : 4, out_size = out_type == CUDA_R_16BF ? 2 : 4;
    const int64_t first_n = p.first.ld * p.first.cols, second_n = p.second.ld * p.second.cols;
    const int64_t out_n = p.out.ld * p.out.cols;
    void *first = nullptr, *second = nullptr, *want = nullptr, *got = nullptr;
    int* differs = nullptr;
    auto fill = [&](void* x, int64_t n) {
        if (type == CUDA_R_16BF) {
            hash_fill_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
                static_cast<uint16_t*>(x), n);
        } else {
            hash_fill_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
                static_cast<float*>(x), n);
        }
        KILN_CUDA(cudaGetLastError());
    };
    if (cudaMalloc(&first, size_t(first_n) * size) == cudaSuccess &&
        cudaMalloc(&second, size_t(second_n) * size) == cudaSuccess &&
        cudaMalloc(&want, size_t(out_n) * out_size) == cudaSuccess &&
        cudaMalloc(&got, size_t(out_n) * out_size) == cudaSuccess &&
        cudaMalloc(&differs, sizeof(int)) == cudaSuccess) {
        fill(first, first_n);
        fill(second, second_n);
        if (run(ctx, prod.ranked[0], first, second, want, want, 0.0f) == CUBLAS_STATUS_SUCCESS) {
            for (int r = 1; r < int(prod.ranked.size()); r++) {
                if (run(ctx, prod.ranked[size_t(r)], first, second, got, got, 0.0f) !=
                    CUBLAS_STATUS_SUCCESS)
                    continue;
                int host = 1;
                KILN_CUDA(cudaMemsetAsync(differs, 0, sizeof(int), stream()));
                // out is column-major (rows, cols): row-major (cols, rows) with stride ld.
                if (out_type == CUDA_R_16BF) {
                    differ_kernel<<<element_blocks(out_n), kElementThreads, 0, stream()>>>(
                        differs, static_cast<const uint16_t*>(got),
                        static_cast<const uint16_t*>(want), p.out.cols, p.out.rows, p.out.ld);
                } else {
                    differ_kernel<<<element_blocks(out_n), kElementThreads, 0, stream()>>>(
                        differs, static_cast<const float*>(got), static_cast<const float*>(want),
                        p.out.cols, p.out.rows, p.out.ld);
                }
                KILN_CUDA(cudaGetLastError());
                KILN_CUDA(
                    cudaMemcpyAsync(&host, differs, sizeof(int), cudaMemcpyDeviceToHost, stream()));
                KILN_CUDA(cudaStreamSynchronize(stream()));
                if (host == 0)
                    t.ranks.push_back(r);
            }
        }
    }
    (void)cudaGetLastError();  // a failed allocation or run: the default alone
    KILN_CUDA(cudaStreamSynchronize(stream()));
    cudaFree(first), cudaFree(second), cudaFree(want), cudaFree(got), cudaFree(differs);
    t.fastest.assign(t.ranks.size(), 1e300);
    return t;
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

void gemm(const Gemm& g, Precision precision, Workspace ws) {
    if (g.M == 0 || g.N == 0)
        return;
    KILN_CHECK(g.c_type == DType::f32 || !g.accumulate, "a bf16 product output is not added to");
    const void* c_in = g.accumulate && g.c_in ? static_cast<const void*>(g.c_in) : g.c;
    const size_t c_size = dtype_size(g.c_type);
    if (g.K == 0) {  // an empty sum: C = 0, or what accumulating adds
        if (!g.accumulate)
            KILN_CUDA(cudaMemset2DAsync(g.c, g.ldc * c_size, 0, g.N * c_size, g.M, stream()));
        else if (c_in != g.c)
            KILN_CUDA(cudaMemcpy2DAsync(g.c, g.ldc * 4, c_in, g.ldc * 4, g.N * 4, g.M,
                                        cudaMemcpyDeviceToDevice, stream()));
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
    const cudaDataType_t out_type = g.c_type == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const Product& prod = product_for(type, out_type, p, alignment(b.ptr), alignment(a.ptr),
                                      std::min(alignment(g.c), alignment(c_in)));
    struct Context {
        const Product& prod;
        float alpha;
        void* lt_workspace;
    } ctx{prod, g.alpha, lt_workspace};
    const Run run = [](const void* raw, const cublasLtMatmulAlgo_t& algo, const void* first,
                       const void* second, const void* c_in, void* c, float beta) {
        const auto& x = *static_cast<const Context*>(raw);
        return cublasLtMatmul(handle(), x.prod.desc.get(), &x.alpha, first, x.prod.first.get(),
                              second, x.prod.second.get(), &beta, c_in, x.prod.out.get(), c,
                              x.prod.out.get(), &algo, x.lt_workspace, kLtWorkspace, stream());
    };
    const float beta = g.accumulate ? 1.0f : 0.0f;
    State& st = state();
    if (st.tuning) {
        auto trial = st.trials.find(prod.name);
        if (st.pass == 0 && trial == st.trials.end() && part_of(prod.name, st.parts) == st.part) {
            st.trials.emplace(prod.name, discover(prod, p, type, out_type, run, &ctx));
        } else if (st.pass > 0 && trial != st.trials.end()) {
            Trial& t = trial->second;
            const int rank = t.ranks[size_t(st.pass - 1) % t.ranks.size()];
            std::pair<cudaEvent_t, cudaEvent_t> ev;
            KILN_CUDA(cudaEventCreate(&ev.first));
            KILN_CUDA(cudaEventCreate(&ev.second));
            KILN_CUDA(cudaEventRecord(ev.first, stream()));
            KILN_CUBLAS(run(&ctx, prod.ranked[size_t(rank)], b.ptr, a.ptr, c_in, g.c, beta));
            KILN_CUDA(cudaEventRecord(ev.second, stream()));
            t.timed.push_back(ev);
            finish_launch();
            return;
        }
    }
    KILN_CUBLAS(run(&ctx, prod.algo, b.ptr, a.ptr, c_in, g.c, beta));
    finish_launch();
}

void tune(int part, int parts) {
    State& st = state();
    use({});  // drops any earlier trial; the shapes not tuned here run their default
    st.tuning = true;
    st.part = part;
    st.parts = std::max(1, parts);
    st.pass = 0;
    st.tuned.clear();
}

bool tune_next() {
    State& st = state();
    if (!st.tuning)
        return false;
    KILN_CUDA(cudaStreamSynchronize(stream()));
    size_t most = 1;
    for (auto& [name, t] : st.trials) {
        most = std::max(most, t.ranks.size());
        double pass_ms = 0;
        for (auto [start, stop] : t.timed) {
            float ms = 0;
            KILN_CUDA(cudaEventElapsedTime(&ms, start, stop));
            pass_ms += ms;
            cudaEventDestroy(start), cudaEventDestroy(stop);
        }
        if (st.pass > 0 && !t.timed.empty()) {
            double& f = t.fastest[size_t(st.pass - 1) % t.ranks.size()];
            f = std::min(f, pass_ms);
        }
        t.timed.clear();
    }
    if (most > 1 && ++st.pass <= kRounds * int(most))
        return true;
    for (auto& [name, t] : st.trials) {
        const size_t best = fastest_candidate(t.fastest, kMargin);
        st.tuned[name] = choice_name(t.ranks[best]);
    }
    for (auto& [key, prod] : st.products)
        prod.algo = prod.ranked[size_t(chosen_rank(prod, st.tuned))];
    st.trials.clear();
    st.tuning = false;
    return false;
}

kernels::Plan tuned() {
    return state().tuned;
}

void use(const kernels::Plan& plan) {
    State& st = state();
    for (auto& [name, t] : st.trials) {
        for (auto [start, stop] : t.timed)
            cudaEventDestroy(start), cudaEventDestroy(stop);
    }
    st.trials.clear();
    st.tuning = false;
    st.plan = plan;
    st.products.clear();  // each shape is made again, with the plan's choice
}

}  // namespace kiln::kernels::cuda
