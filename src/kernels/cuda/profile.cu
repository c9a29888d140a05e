// Device time per table op, to see where a GPU step goes. profiled_kernels() wraps each op of the
// CUDA table in a pair of events on the stream (they mark it; they do not make the host wait);
// the table's `wait`, which the trainer calls after each backward and update, then reads the
// finished pairs, adds them up per op (the products per shape, from the Gemm) and rewrites the
// report file. The span from the first op to the last of each wait's window counts too, so the
// device's idle time between ops (launch overhead, the host's own waits) shows beside the ops.
// The products' and attention's rows also give the rate they ran at (2 M N K a product; the
// causal attention's 2 B H T^2 D a product, 2 in the forward, 5 in the backward), and the
// memory-bound ops' rows the bandwidth they reached (the bytes they must read and write at
// least, work_of below), to hold against the GPU's peaks.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/launch.h"

namespace kiln::kernels::cuda {
namespace {

struct Totals {
    int64_t calls = 0;
    double ms = 0, flops = 0, bytes = 0;
};

struct Work {
    double flops = 0, bytes = 0;  // what one call computes, and moves at least
};

struct Mark {
    const char* op;
    std::string shape;  // products only
    Work work;
    cudaEvent_t start, stop;
    bool carried = false;  // queued after an earlier wait, by another thread: outside its window
};

struct Profile {
    std::mutex mutex;
    std::string path;
    std::vector<cudaEvent_t> spare, spare_later;
    std::vector<Mark> pending;
    cudaEvent_t span_start = nullptr, span_stop = nullptr;
    std::map<std::string, Totals> totals;
    double span_ms = 0, ops_ms = 0;
    int64_t windows = 0;

    cudaEvent_t event() {
        if (spare.empty()) {
            cudaEvent_t e;
            KILN_CUDA(cudaEventCreate(&e));
            return e;
        }
        const cudaEvent_t e = spare.back();
        spare.pop_back();
        return e;
    }

    // Adds up the pairs that are done (after the table's wait, all but those another thread
    // queued since) and rewrites the report.
    void fold() {
        std::vector<Mark> later;
        bool first = true;
        float span = 0;
        for (Mark& m : pending) {
            float ms = 0;
            if (cudaEventQuery(m.stop) != cudaSuccess ||
                cudaEventElapsedTime(&ms, m.start, m.stop) != cudaSuccess) {
                m.carried = true;
                later.push_back(std::move(m));
                continue;
            }
            if (!m.carried) {  // the window: from its first op to its last
                if (first)
                    span_start = m.start, first = false;
                span_stop = m.stop;
            }
            Totals& t = totals[m.shape.empty() ? m.op : m.shape];
            t.calls++;
            t.ms += ms;
            t.flops += m.work.flops;
            t.bytes += m.work.bytes;
            ops_ms += ms;
            spare_later.push_back(m.start);
            spare_later.push_back(m.stop);
        }
        (void)cudaGetLastError();
        pending = std::move(later);
        if (!first && cudaEventElapsedTime(&span, span_start, span_stop) == cudaSuccess) {
            span_ms += span;
            windows++;
        }
        // The window's ends are reused only now that the span has been read.
        spare.insert(spare.end(), spare_later.begin(), spare_later.end());
        spare_later.clear();
        write();
    }

    void write() const {
        std::vector<std::pair<std::string, Totals>> rows(totals.begin(), totals.end());
        std::sort(rows.begin(), rows.end(),
                  [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
        std::string text = fmt::format(
            "device time per op (KILN_CUDA_PROFILE), {} windows between waits\n"
            "span {:.1f} ms from each window's first op to its last; ops {:.1f} ms ({:.1f}%); "
            "idle between them {:.1f} ms\n\n{:<44} {:>8} {:>11} {:>7} {:>10} {:>9} {:>8}\n",
            windows, span_ms, ops_ms, span_ms > 0 ? 100 * ops_ms / span_ms : 0.0,
            std::max(0.0, span_ms - ops_ms), "op", "calls", "total ms", "share", "mean us",
            "TFLOP/s", "GB/s");
        // Per second of the op's time: TFLOP = 1e12 FLOP over 1e3 ms; GB = 1e9 B over 1e3 ms.
        // "-" where nothing is counted; three digits below 1 (a test's small shapes).
        auto rate = [](double work, double ms, double scale) {
            if (work <= 0 || ms <= 0)
                return std::string("-");
            const double r = work / (ms * scale);
            return r < 1 ? fmt::format("{:.3g}", r) : fmt::format("{:.1f}", r);
        };
        for (const auto& [name, t] : rows) {
            text += fmt::format("{:<44} {:>8} {:>11.2f} {:>6.1f}% {:>10.1f} {:>9} {:>8}\n", name,
                                t.calls, t.ms, ops_ms > 0 ? 100 * t.ms / ops_ms : 0.0,
                                1000 * t.ms / t.calls, rate(t.flops, t.ms, 1e9),
                                rate(t.bytes, t.ms, 1e6));
        }
        if (std::FILE* f = std::fopen(path.c_str(), "w")) {
            std::fputs(text.c_str(), f);
            std::fclose(f);
        }
    }
};

Profile& profile() {
    static Profile p;
    return p;
}

// Marks one op's work on the stream.
class Span {
public:
    explicit Span(const char* op, Work work, std::string shape = {})
        : mark_{op, std::move(shape), work, {}, {}} {
        Profile& p = profile();
        const std::lock_guard<std::mutex> lock(p.mutex);
        mark_.start = p.event();
        mark_.stop = p.event();
        KILN_CUDA(cudaEventRecord(mark_.start, stream()));
    }
    ~Span() {
        Profile& p = profile();
        const std::lock_guard<std::mutex> lock(p.mutex);
        if (cudaEventRecord(mark_.stop, stream()) == cudaSuccess) {
            p.pending.push_back(std::move(mark_));
        } else {  // in a destructor, nowhere for the failure to go: the op goes unmarked
            (void)cudaGetLastError();
            p.spare.push_back(mark_.start);
            p.spare.push_back(mark_.stop);
        }
    }
    Span(const Span&) = delete;
    Span& operator=(const Span&) = delete;

private:
    Mark mark_;
};

template <Precision P>
const Kernels& base() {
    return unprofiled_kernels(P);
}

// The work of one call of the op named Name: by default none counted (the small ops).
template <const char* Name>
struct Op {};
template <const char* Name, typename... A>
Work work_of(Op<Name>, A...) {
    return {};
}

// Timed<op's type>::call<P, &Kernels::op, name>: the op of the precision's table, marked.
template <typename F>
struct Timed;
template <typename R, typename... A>
struct Timed<R (*)(A...)> {
    template <Precision P, R (*Kernels::*Member)(A...), const char* Name>
    static R call(A... a) {
        const Span span(Name, work_of(Op<Name>{}, a...));
        return (base<P>().*Member)(a...);
    }
};

template <Precision P>
void gemm_timed(const Gemm& g, Workspace ws) {
    const Span span("gemm", {2.0 * double(g.M) * double(g.N) * double(g.K), 0},
                    fmt::format("gemm {}x{}x{} {}{}{}{}", g.M, g.N, g.K, g.trans_a ? "T" : "N",
                                g.trans_b ? "T" : "N", g.accumulate ? " +=" : "",
                                g.c_type == DType::bf16 ? " to bf16" : ""));
    base<P>().gemm(g, ws);
}

template <Precision P>
void wait_folded() {
    base<P>().wait();
    Profile& p = profile();
    const std::lock_guard<std::mutex> lock(p.mutex);
    p.fold();
}

#define KILN_OP_NAME(op) constexpr char k_##op[] = #op;
KILN_OP_NAME(embedding_forward)
KILN_OP_NAME(embedding_backward)
KILN_OP_NAME(rmsnorm_forward)
KILN_OP_NAME(rmsnorm_backward)
KILN_OP_NAME(attention_forward)
KILN_OP_NAME(attention_backward)
KILN_OP_NAME(swiglu_forward)
KILN_OP_NAME(swiglu_backward)
KILN_OP_NAME(logit_stats)
KILN_OP_NAME(cross_entropy_backward)
KILN_OP_NAME(cross_entropy)
KILN_OP_NAME(adamw)
KILN_OP_NAME(to_bf16)
KILN_OP_NAME(copy)
KILN_OP_NAME(zero)
KILN_OP_NAME(widen)
KILN_OP_NAME(add)
KILN_OP_NAME(slice_ids)
KILN_OP_NAME(rescale_sumexp)
KILN_OP_NAME(row_losses)
KILN_OP_NAME(sum_into)
KILN_OP_NAME(sum_squares)
#undef KILN_OP_NAME

// What the ops that decide a step's time do at least: attention's products (a causal product
// is half of 2 T^2 D a head; the forward runs 2, the backward 5 with the scores recomputed),
// and the bytes the memory-bound ops read and write, each element once. These overloads are
// found by argument-dependent lookup where Timed is instantiated, and preferred to work_of's
// default as functions that are not templates.
double causal_product(const Attention& a) {
    return double(a.B) * double(a.H) * double(a.T) * double(a.T) * double(a.D);
}
double sz(DType t) {
    return double(dtype_size(t));
}
Work work_of(Op<k_attention_forward>, void*, void*, const void*, DType, const Attention& a,
             Workspace) {
    return {2 * causal_product(a), 0};
}
Work work_of(Op<k_attention_backward>, void*, DType, const void*, const void*, const void*, DType,
             const void*, const Attention& a, Workspace) {
    return {5 * causal_product(a), 0};
}
Work work_of(Op<k_embedding_forward>, float*, const int32_t*, const void*, DType wte_type,
             int64_t M, int64_t C) {
    return {0, double(M) * (double(C) * (4 + sz(wte_type)) + 4)};
}
Work work_of(Op<k_embedding_backward>, float*, const float*, const int32_t*, int64_t M, int64_t C) {
    return {0, double(M) * (double(C) * 12 + 4)};  // dout read; dwte's rows read and written
}
Work work_of(Op<k_rmsnorm_forward>, void*, DType out_type, float*, const float*, const float*,
             int64_t M, int64_t C, float) {
    return {0, double(M) * (double(C) * (4 + sz(out_type)) + 4)};
}
Work work_of(Op<k_rmsnorm_backward>, float*, uint16_t* dx_bf16, float*, const float*, const float*,
             const float*, const float*, int64_t M, int64_t C) {
    // dout and x read, dx read and written, and its bf16 copy
    return {0, double(M) * double(C) * (16 + (dx_bf16 ? 2 : 0))};
}
Work work_of(Op<k_swiglu_forward>, void*, DType h_type, const void*, DType in_type, int64_t M,
             int64_t F) {
    return {0, double(M) * double(F) * (2 * sz(in_type) + sz(h_type))};
}
Work work_of(Op<k_swiglu_backward>, void*, DType dgu_type, const void*, const void*, DType in_type,
             int64_t M, int64_t F) {
    return {0, double(M) * double(F) * (3 * sz(in_type) + 2 * sz(dgu_type))};
}
Work work_of(Op<k_logit_stats>, const float*, const int32_t*, int64_t M, int64_t V, float*, float*,
             float*) {
    return {0, double(M) * double(V) * 4};
}
Work work_of(Op<k_cross_entropy_backward>, const float*, const int32_t*, const float*, const float*,
             const float*, int64_t M, int64_t V, void*, DType dlogits_type) {
    return {0, double(M) * double(V) * (4 + sz(dlogits_type))};
}
Work work_of(Op<k_cross_entropy>, const float*, const int32_t*, const float*, int64_t M, int64_t V,
             float*, void* dlogits, DType dlogits_type) {
    return {0, double(M) * double(V) * (4 + (dlogits ? sz(dlogits_type) : 0))};
}
Work work_of(Op<k_adamw>, float*, uint16_t* p_bf16, float*, float*, const float*, int64_t n,
             const AdamWStep&) {
    // p, m and v read and written, g read, and p's bf16 copy
    return {0, double(n) * (28 + (p_bf16 ? 2 : 0))};
}
Work work_of(Op<k_to_bf16>, uint16_t*, const float*, int64_t n) {
    return {0, double(n) * 6};
}
Work work_of(Op<k_widen>, float*, const uint16_t*, int64_t n) {
    return {0, double(n) * 6};
}
Work work_of(Op<k_add>, float*, const float*, const float*, int64_t n) {
    return {0, double(n) * 12};
}
Work work_of(Op<k_copy>, void*, const void*, size_t bytes) {
    return {0, 2 * double(bytes)};
}
Work work_of(Op<k_zero>, void*, size_t bytes) {
    return {0, double(bytes)};
}
Work work_of(Op<k_sum_squares>, const float*, const std::vector<Range>& ranges) {
    double n = 0;
    for (const Range& r : ranges)
        n += double(r.end - r.begin);
    return {0, 4 * n};
}

template <Precision P>
Kernels profiled() {
    Kernels k = base<P>();
#define KILN_TIMED(op) k.op = Timed<decltype(k.op)>::template call<P, &Kernels::op, k_##op>;
    KILN_TIMED(embedding_forward)
    KILN_TIMED(embedding_backward)
    KILN_TIMED(rmsnorm_forward)
    KILN_TIMED(rmsnorm_backward)
    KILN_TIMED(attention_forward)
    KILN_TIMED(attention_backward)
    KILN_TIMED(swiglu_forward)
    KILN_TIMED(swiglu_backward)
    KILN_TIMED(logit_stats)
    KILN_TIMED(cross_entropy_backward)
    KILN_TIMED(cross_entropy)
    KILN_TIMED(adamw)
    KILN_TIMED(to_bf16)
    KILN_TIMED(copy)
    KILN_TIMED(zero)
    KILN_TIMED(widen)
    KILN_TIMED(add)
    KILN_TIMED(slice_ids)
    KILN_TIMED(rescale_sumexp)
    KILN_TIMED(row_losses)
    KILN_TIMED(sum_into)
    KILN_TIMED(sum_squares)
#undef KILN_TIMED
    k.gemm = gemm_timed<P>;
    k.wait = wait_folded<P>;
    // A recording would replay the spans' events without their host side: each op is timed
    // as it is called instead.
    k.record = nullptr, k.replay = nullptr, k.release = nullptr;
    return k;
}

}  // namespace

const char* profile_path() {
    static const char* path = std::getenv("KILN_CUDA_PROFILE");
    return path && *path ? path : nullptr;
}

const Kernels& profiled_kernels(Precision precision, const std::string& path) {
    static const Kernels bf16 = profiled<Precision::bf16>();
    static const Kernels fp32 = profiled<Precision::fp32>();
    Profile& p = profile();
    {
        const std::lock_guard<std::mutex> lock(p.mutex);
        p.path = path;
    }
    return precision == Precision::bf16 ? bf16 : fp32;
}

}  // namespace kiln::kernels::cuda
