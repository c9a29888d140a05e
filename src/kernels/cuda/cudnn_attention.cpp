// Causal attention through cuDNN's fused attention: the operation graphs its runtime fusion
// engines recognize as scaled dot-product attention (flash attention, with Hopper's own
// kernels), written against cuDNN's backend API, which is all cuDNN's C library offers.
//
// Layout. Q, K and V are views of the packed bf16 qkv (M, ldqkv) with no copy: dims (B, heads,
// T, D), strides (T ldqkv, D, ldqkv, 1), K and V at their column offsets. The graphs take K (and
// in the backward V) transposed, (B, Hkv, D, T), by swapping the last two strides. The output and
// its gradient are (M, H*D): strides (T H D, D, H D, 1). The statistics are (B, H, T, 1) f32, the
// same log-sum-exp of the scaled scores as the own kernels' (attention_flash.h).
//
// Forward: S = Q K^T (f32), times 1/sqrt(D); the causal mask (row index >= column index, else
// -inf); softmax as max, exp(S - max), sum, their quotient P (bf16), and stats = max + log sum;
// O = P V (bf16).
// Backward: rowdot = sum_d dO O (f32, kept in memory the caller never sees); S again, minus
// stats, masked, exp: P; dV = P^T dO; dP = dO V^T; dS = P (dP - rowdot) / sqrt(D); dK = dS^T Q;
// dQ = dS K through an f32 accumulator. With grouped-query heads, dK and dV are made per query
// head and summed over each group by a reduction the graph fuses.
//
// A build that found no cudnn.h (KILN_HAVE_CUDNN unset) keeps only the switch, and refuses.
#include "kernels/cuda/cudnn_attention.h"

#include <cstdlib>
#include <string>

#include "core/error.h"
#include "core/log.h"

namespace kiln::kernels::cuda {

bool cudnn_attention_requested() {
    static const bool requested = [] {
        const char* v = std::getenv("KILN_CUDA_ATTENTION");
        const std::string value = v ? v : "";
        if (value.empty() || value == "kiln")
            return false;
        if (value == "cudnn")
            return true;
        throw Error(fmt::format("KILN_CUDA_ATTENTION={}: expected kiln or cudnn", value));
    }();
    return requested;
}

}  // namespace kiln::kernels::cuda

#if KILN_HAVE_CUDNN
#include <cuda_runtime.h>
#include <cudnn.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels/cuda/cuda_check.h"

namespace kiln::kernels::cuda {

cudaStream_t stream();  // the backend's one stream (device.cu)

namespace {

// cuDNN's functions, loaded at first use, so that the binary needs no cuDNN where nothing asks for
// its attention (and a machine without it runs kiln's own kernels).
struct Cudnn {
    decltype(&cudnnBackendCreateDescriptor) BackendCreateDescriptor = nullptr;
    decltype(&cudnnBackendDestroyDescriptor) BackendDestroyDescriptor = nullptr;
    decltype(&cudnnBackendExecute) BackendExecute = nullptr;
    decltype(&cudnnBackendFinalize) BackendFinalize = nullptr;
    decltype(&cudnnBackendGetAttribute) BackendGetAttribute = nullptr;
    decltype(&cudnnBackendSetAttribute) BackendSetAttribute = nullptr;
    decltype(&cudnnCreate) Create = nullptr;
    decltype(&cudnnGetErrorString) GetErrorString = nullptr;
    decltype(&cudnnGetLastErrorString) GetLastErrorString = nullptr;
    decltype(&cudnnGetVersion) GetVersion = nullptr;
    decltype(&cudnnSetStream) SetStream = nullptr;
    std::string missing;  // why it could not be loaded; empty when it was
};

const Cudnn& cudnn_library() {
    static const Cudnn c = [] {
        Cudnn c;
        void* lib = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
        if (!lib) {
            const char* e = dlerror();
            c.missing = e ? e : "libcudnn.so.9 not found";
            return c;
        }
        auto load = [&](auto& f, const char* name) {
            f = reinterpret_cast<std::remove_reference_t<decltype(f)>>(dlsym(lib, name));
            if (!f && c.missing.empty())
                c.missing = fmt::format("libcudnn.so.9 lacks {}", name);
        };
        load(c.BackendCreateDescriptor, "cudnnBackendCreateDescriptor");
        load(c.BackendDestroyDescriptor, "cudnnBackendDestroyDescriptor");
        load(c.BackendExecute, "cudnnBackendExecute");
        load(c.BackendFinalize, "cudnnBackendFinalize");
        load(c.BackendGetAttribute, "cudnnBackendGetAttribute");
        load(c.BackendSetAttribute, "cudnnBackendSetAttribute");
        load(c.Create, "cudnnCreate");
        load(c.GetErrorString, "cudnnGetErrorString");
        load(c.GetLastErrorString, "cudnnGetLastErrorString");
        load(c.GetVersion, "cudnnGetVersion");
        load(c.SetStream, "cudnnSetStream");
        return c;
    }();
    return c;
}

// The loaded library; an Error saying why where it cannot be loaded.
const Cudnn& cudnn() {
    const Cudnn& c = cudnn_library();
    if (!c.missing.empty())
        throw Error(
            fmt::format("cuDNN: {} (cuDNN 9 is needed for KILN_CUDA_ATTENTION=cudnn)", c.missing));
    return c;
}

// Why cuDNN refused a call: its status and its last error message.
std::string cudnn_failure(cudnnStatus_t status) {
    char detail[1024] = {0};
    cudnn().GetLastErrorString(detail, sizeof(detail));
    return fmt::format("{}{}{}", cudnn().GetErrorString(status), *detail ? ": " : "", detail);
}

#define KILN_CUDNN(call)                                                    \
    do {                                                                    \
        cudnnStatus_t status_ = (call);                                     \
        if (status_ != CUDNN_STATUS_SUCCESS)                                \
            ::kiln::library_failed("cuDNN", #call, cudnn_failure(status_)); \
    } while (0)

// One backend descriptor, destroyed with its last owner.
class Desc {
public:
    Desc() = default;
    explicit Desc(cudnnBackendDescriptorType_t type) {
        cudnnBackendDescriptor_t raw = nullptr;
        KILN_CUDNN(cudnn().BackendCreateDescriptor(type, &raw));
        p_ = std::shared_ptr<void>(raw, [](void* d) { cudnn().BackendDestroyDescriptor(d); });
    }
    cudnnBackendDescriptor_t get() const { return p_.get(); }

    template <typename T>
    Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const T* values,
              int64_t count) {
        KILN_CUDNN(cudnn().BackendSetAttribute(get(), name, type, count, values));
        return *this;
    }
    template <typename T>
    Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, T value) {
        return set(name, type, &value, 1);
    }
    Desc& set(cudnnBackendAttributeName_t name, const Desc& d) {
        cudnnBackendDescriptor_t raw = d.get();
        return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw, 1);
    }
    // Finalizes; a refusal is an Error naming `what`.
    Desc& finalize(const char* what) {
        const cudnnStatus_t st = cudnn().BackendFinalize(get());
        if (st != CUDNN_STATUS_SUCCESS)
            library_failed("cuDNN", what, cudnn_failure(st));
        return *this;
    }
    // Finalizes; whether cuDNN accepted it, and why not in `why`.
    bool try_finalize(const char* what, std::string& why) {
        const cudnnStatus_t st = cudnn().BackendFinalize(get());
        if (st == CUDNN_STATUS_SUCCESS)
            return true;
        why = fmt::format("{}: {}", what, cudnn_failure(st));
        return false;
    }

private:
    std::shared_ptr<void> p_;
};

using Dims = std::vector<int64_t>;

struct Tensor {
    Desc desc;
    int64_t uid = 0;
};

// The tensors the caller's pointers fill (the rest are virtual, or scalars passed by value).
enum Uid : int64_t {
    kQ = 1,
    kK,
    kV,
    kO,
    kStats,
    kDO,
    kDQ,
    kDK,
    kDV,
    kRowdot,  // backward: sum_d dO O per row, f32 (B, H, T)
    kDQSum,   // backward: dQ's f32 accumulator (B, H, T, D)
    kFirstInternal = 100,
};

// A graph under construction: its operations, each finalized as it is added, and the values of
// its by-value scalars.
class Graph {
public:
    Graph() = default;
    Graph(const Graph&) = delete;  // values() points into its own scalars
    Graph& operator=(const Graph&) = delete;
    Tensor tensor(const Dims& dims, const Dims& strides, cudnnDataType_t type, int64_t uid) {
        return make(dims, strides, type, uid, false, false);
    }
    // A tensor no memory holds (f32 unless said).
    Tensor virt(const Dims& dims, const Dims& strides, cudnnDataType_t type = CUDNN_DATA_FLOAT) {
        return make(dims, strides, type, next_uid_++, true, false);
    }
    Tensor scalar(float value) {
        scalars_.push_back(value);
        values_.emplace_back(next_uid_, &scalars_.back());
        return make({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_FLOAT, next_uid_++, false, true);
    }

    // y = mode(x[, b[, t]]); `axis` for GEN_INDEX.
    void pointwise(cudnnPointwiseMode_t mode, const Tensor& x, const Tensor* b, const Tensor* t,
                   const Tensor& y, cudnnDataType_t math = CUDNN_DATA_FLOAT, int64_t axis = -1) {
        Desc pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
        pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, mode)
            .set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, math);
        if (axis >= 0)
            pw.set(CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, axis);
        pw.finalize("pointwise descriptor");
        Desc op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
        op.set(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw)
            .set(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x.desc);
        if (b)
            op.set(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b->desc);
        if (t)
            op.set(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t->desc);
        op.set(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y.desc);
        add(op, "pointwise operation");
    }
    void binary(cudnnPointwiseMode_t mode, const Tensor& x, const Tensor& b, const Tensor& y) {
        pointwise(mode, x, &b, nullptr, y);
    }
    void unary(cudnnPointwiseMode_t mode, const Tensor& x, const Tensor& y) {
        pointwise(mode, x, nullptr, nullptr, y);
    }
    // c = a b over the last two dims, batched over the first two (f32 sums).
    void matmul(const Tensor& a, const Tensor& b, const Tensor& c) {
        Desc mm(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
        mm.set(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT)
            .finalize("matmul descriptor");
        Desc op(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
        op.set(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a.desc)
            .set(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b.desc)
            .set(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c.desc)
            .set(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm);
        add(op, "matmul operation");
    }
    // y = x reduced over the dims where y has 1 (or fewer heads: over each group).
    void reduction(cudnnReduceTensorOp_t mode, const Tensor& x, const Tensor& y) {
        Desc red(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
        red.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, mode)
            .set(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT)
            .finalize("reduction descriptor");
        Desc op(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
        op.set(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x.desc)
            .set(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y.desc)
            .set(CUDNN_ATTR_OPERATION_REDUCTION_DESC, red);
        add(op, "reduction operation");
    }
    // y = x seen with y's dims and strides (a transpose, for the products).
    void reshape(const Tensor& x, const Tensor& y) {
        Desc op(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
        op.set(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x.desc)
            .set(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y.desc);
        add(op, "reshape operation");
    }

    int operations() const { return int(ops_.size()); }
    const std::deque<std::pair<int64_t, float*>>& values() const { return values_; }

    // The operation graph on `handle`, and the first engine configuration of cuDNN's heuristic
    // that makes a plan; false (and `why`) where none does.
    bool plan(cudnnHandle_t handle, Desc& plan, int64_t& workspace, std::string& why) {
        Desc& graph = kept_.emplace_back(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
        std::vector<cudnnBackendDescriptor_t> raw;
        for (const Desc& op : ops_)
            raw.push_back(op.get());
        graph.set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, raw.data(),
                  int64_t(raw.size()));
        graph.set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, handle);
        if (!graph.try_finalize("operation graph", why))
            return false;
        Desc& heur = kept_.emplace_back(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
        heur.set(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph)
            .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, CUDNN_HEUR_MODE_A);
        if (!heur.try_finalize("engine heuristic", why))
            return false;
        int64_t count = 0;
        KILN_CUDNN(cudnn().BackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                               CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr));
        std::vector<Desc> configs;
        std::vector<cudnnBackendDescriptor_t> raw_configs;
        for (int64_t i = 0; i < count; i++) {
            configs.push_back(kept_.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
            raw_configs.push_back(configs.back().get());
        }
        int64_t got = 0;
        if (count > 0)
            KILN_CUDNN(cudnn().BackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                   CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                                                   raw_configs.data()));
        why = "cuDNN's heuristic offers no engine for the graph";
        for (int64_t i = 0; i < got; i++) {
            Desc candidate(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
            candidate.set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, handle)
                .set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, configs[size_t(i)]);
            if (!candidate.try_finalize("execution plan", why))
                continue;
            int64_t bytes = 0, n = 0;
            KILN_CUDNN(cudnn().BackendGetAttribute(candidate.get(),
                                                   CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                   CUDNN_TYPE_INT64, 1, &n, &bytes));
            plan = candidate;
            workspace = bytes;
            return true;
        }
        return false;
    }

private:
    Tensor make(const Dims& dims, const Dims& strides, cudnnDataType_t type, int64_t uid,
                bool is_virtual, bool by_value) {
        Tensor t{Desc(CUDNN_BACKEND_TENSOR_DESCRIPTOR), uid};
        const int64_t alignment = 16;
        t.desc.set(CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, type)
            .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, dims.data(), int64_t(dims.size()))
            .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides.data(),
                 int64_t(strides.size()))
            .set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, uid)
            .set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, alignment)
            .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, is_virtual);
        if (by_value)
            t.desc.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, true);
        t.desc.finalize("tensor descriptor");
        kept_.push_back(t.desc);
        return t;
    }
    void add(Desc& op, const char* what) {
        op.finalize(what);
        ops_.push_back(op);
    }

    std::vector<Desc> ops_;
    // Every descriptor the operations and the plan refer to, kept for the graph's life (cuDNN
    // does not say that it copies what a descriptor points to).
    std::deque<Desc> kept_;
    std::deque<float> scalars_;
    std::deque<std::pair<int64_t, float*>> values_;
    int64_t next_uid_ = kFirstInternal;
};

// -inf for masked scores; cuDNN before 9.10 wants the lowest finite float instead.
float masked_value() {
    return cudnn().GetVersion() < 91000 ? std::numeric_limits<float>::lowest()
                                        : -std::numeric_limits<float>::infinity();
}

// The shapes both graphs share.
struct Shapes {
    int64_t B, H, Hkv, T, D, ld;
    Dims scores() const { return {B, H, T, T}; }
    Dims scores_strides() const { return {H * T * T, T * T, T, 1}; }
    Dims transposed_scores_strides() const { return {H * T * T, T * T, 1, T}; }
    Dims rows() const { return {B, H, T, 1}; }
    Dims rows_strides() const { return {H * T, T, 1, 1}; }
    Dims heads(int64_t n) const { return {B, n, T, D}; }
    Dims packed_strides() const { return {T * ld, D, ld, 1}; }  // in qkv (M, ldqkv)
    Dims packed_transposed() const { return {T * ld, D, 1, ld}; }
    Dims out_strides() const { return {T * H * D, D, H * D, 1}; }  // in (M, H*D)
    Dims dense_strides() const { return {H * T * D, T * D, D, 1}; }
    explicit Shapes(const Attention& a) : B(a.B), H(a.H), Hkv(a.Hkv), T(a.T), D(a.D), ld(a.ldqkv) {}
};

// scores with the causal mask: kept where the row (query) index >= the column (key) index,
// else the masked value.
Tensor causal(Graph& g, const Shapes& s, const Tensor& scores) {
    const Tensor row = g.virt(s.scores(), s.scores_strides(), CUDNN_DATA_INT32);
    const Tensor col = g.virt(s.scores(), s.scores_strides(), CUDNN_DATA_INT32);
    // Integer indices computed as integers, the form cuDNN's fused attention engines recognise.
    g.pointwise(CUDNN_POINTWISE_GEN_INDEX, scores, nullptr, nullptr, row, CUDNN_DATA_INT32, 2);
    g.pointwise(CUDNN_POINTWISE_GEN_INDEX, scores, nullptr, nullptr, col, CUDNN_DATA_INT32, 3);
    const Tensor keep = g.virt(s.scores(), s.scores_strides(), CUDNN_DATA_BOOLEAN);
    g.pointwise(CUDNN_POINTWISE_CMP_GE, row, &col, nullptr, keep, CUDNN_DATA_BOOLEAN);
    const Tensor masked = g.virt(s.scores(), s.scores_strides());
    const Tensor fill = g.scalar(masked_value());
    g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, scores, &fill, &keep, masked);
    return masked;
}

void forward_graph(Graph& g, const Shapes& s) {
    const Tensor q = g.tensor(s.heads(s.H), s.packed_strides(), CUDNN_DATA_BFLOAT16, kQ);
    const Tensor kt =
        g.tensor({s.B, s.Hkv, s.D, s.T}, s.packed_transposed(), CUDNN_DATA_BFLOAT16, kK);
    const Tensor v = g.tensor(s.heads(s.Hkv), s.packed_strides(), CUDNN_DATA_BFLOAT16, kV);
    const Tensor o = g.tensor(s.heads(s.H), s.out_strides(), CUDNN_DATA_BFLOAT16, kO);
    const Tensor stats = g.tensor(s.rows(), s.rows_strides(), CUDNN_DATA_FLOAT, kStats);

    const Tensor qk = g.virt(s.scores(), s.scores_strides());
    g.matmul(q, kt, qk);
    const Tensor scaled = g.virt(s.scores(), s.scores_strides());
    const Tensor scale = g.scalar(1.0f / std::sqrt(float(s.D)));
    g.binary(CUDNN_POINTWISE_MUL, qk, scale, scaled);
    const Tensor masked = causal(g, s, scaled);

    const Tensor max = g.virt(s.rows(), s.rows_strides());
    g.reduction(CUDNN_REDUCE_TENSOR_MAX, masked, max);
    const Tensor shifted = g.virt(s.scores(), s.scores_strides());
    g.binary(CUDNN_POINTWISE_SUB, masked, max, shifted);
    const Tensor e = g.virt(s.scores(), s.scores_strides());
    g.unary(CUDNN_POINTWISE_EXP, shifted, e);
    const Tensor sum = g.virt(s.rows(), s.rows_strides());
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, sum);
    const Tensor log_sum = g.virt(s.rows(), s.rows_strides());
    g.unary(CUDNN_POINTWISE_LOG, sum, log_sum);
    g.binary(CUDNN_POINTWISE_ADD, max, log_sum, stats);
    const Tensor p = g.virt(s.scores(), s.scores_strides(), CUDNN_DATA_BFLOAT16);
    g.binary(CUDNN_POINTWISE_DIV, e, sum, p);
    g.matmul(p, v, o);
}

// dst = the product of `a` and `b` per query head, summed over each group of query heads into
// `dst`'s kv heads where there are fewer.
void per_group(Graph& g, const Shapes& s, const Tensor& a, const Tensor& b, const Tensor& dst) {
    if (s.H == s.Hkv) {
        g.matmul(a, b, dst);
        return;
    }
    const Tensor full = g.virt(s.heads(s.H), s.dense_strides(), CUDNN_DATA_BFLOAT16);
    g.matmul(a, b, full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, full, dst);
}

void backward_graph(Graph& g, const Shapes& s) {
    const Tensor q = g.tensor(s.heads(s.H), s.packed_strides(), CUDNN_DATA_BFLOAT16, kQ);
    const Tensor kt =
        g.tensor({s.B, s.Hkv, s.D, s.T}, s.packed_transposed(), CUDNN_DATA_BFLOAT16, kK);
    const Tensor vt =
        g.tensor({s.B, s.Hkv, s.D, s.T}, s.packed_transposed(), CUDNN_DATA_BFLOAT16, kV);
    const Tensor o = g.tensor(s.heads(s.H), s.out_strides(), CUDNN_DATA_BFLOAT16, kO);
    const Tensor dout = g.tensor(s.heads(s.H), s.out_strides(), CUDNN_DATA_BFLOAT16, kDO);
    const Tensor stats = g.tensor(s.rows(), s.rows_strides(), CUDNN_DATA_FLOAT, kStats);
    const Tensor dq = g.tensor(s.heads(s.H), s.packed_strides(), CUDNN_DATA_BFLOAT16, kDQ);
    const Tensor dk = g.tensor(s.heads(s.Hkv), s.packed_strides(), CUDNN_DATA_BFLOAT16, kDK);
    const Tensor dv = g.tensor(s.heads(s.Hkv), s.packed_strides(), CUDNN_DATA_BFLOAT16, kDV);

    // rowdot = sum_d dO O, per row.
    const Tensor dout_o = g.virt(s.heads(s.H), s.out_strides());
    g.binary(CUDNN_POINTWISE_MUL, dout, o, dout_o);
    const Tensor dot = g.virt(s.rows(), s.rows_strides());
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dout_o, dot);
    const Tensor rowdot = g.tensor(s.rows(), s.rows_strides(), CUDNN_DATA_FLOAT, kRowdot);
    const Tensor one = g.scalar(1.0f);
    g.binary(CUDNN_POINTWISE_MUL, dot, one, rowdot);

    // P, again: exp(S / sqrt(D) - stats), masked.
    const Tensor qk = g.virt(s.scores(), s.scores_strides());
    g.matmul(q, kt, qk);
    const Tensor scale = g.scalar(1.0f / std::sqrt(float(s.D)));
    const Tensor scaled = g.virt(s.scores(), s.scores_strides());
    g.binary(CUDNN_POINTWISE_MUL, qk, scale, scaled);
    const Tensor shifted = g.virt(s.scores(), s.scores_strides());
    g.binary(CUDNN_POINTWISE_SUB, scaled, stats, shifted);
    const Tensor masked = causal(g, s, shifted);
    const Tensor p = g.virt(s.scores(), s.scores_strides());
    g.unary(CUDNN_POINTWISE_EXP, masked, p);

    // dV = P^T dO.
    const Tensor pt = g.virt(s.scores(), s.transposed_scores_strides(), CUDNN_DATA_BFLOAT16);
    g.reshape(p, pt);
    per_group(g, s, pt, dout, dv);

    // dS = P (dO V^T - rowdot) / sqrt(D).
    const Tensor dp = g.virt(s.scores(), s.scores_strides());
    g.matmul(dout, vt, dp);
    const Tensor centred = g.virt(s.scores(), s.scores_strides());
    g.binary(CUDNN_POINTWISE_SUB, dp, rowdot, centred);
    const Tensor weighted = g.virt(s.scores(), s.scores_strides());
    g.binary(CUDNN_POINTWISE_MUL, centred, p, weighted);
    const Tensor ds = g.virt(s.scores(), s.scores_strides());
    g.binary(CUDNN_POINTWISE_MUL, weighted, scale, ds);

    // dK = dS^T Q.
    const Tensor dst = g.virt(s.scores(), s.transposed_scores_strides(), CUDNN_DATA_BFLOAT16);
    g.reshape(ds, dst);
    per_group(g, s, dst, q, dk);

    // dQ = dS K, summed in f32, then stored in bf16.
    const Tensor k = g.virt(s.heads(s.Hkv), s.packed_strides());
    g.reshape(kt, k);
    const Tensor dq_sum = g.tensor(s.heads(s.H), s.dense_strides(), CUDNN_DATA_FLOAT, kDQSum);
    g.matmul(ds, k, dq_sum);
    g.unary(CUDNN_POINTWISE_IDENTITY, dq_sum, dq);
}

cudnnHandle_t handle() {
    static const cudnnHandle_t h = [] {
        cudnnHandle_t raw = nullptr;
        KILN_CUDNN(cudnn().Create(&raw));
        return raw;
    }();
    return h;
}

// Runs `plan` on the backend's stream with the tensors' pointers and the graph's scalars.
void execute(const Desc& plan, const Graph& g, std::vector<std::pair<int64_t, void*>> tensors,
             void* workspace) {
    for (const auto& [uid, value] : g.values())
        tensors.emplace_back(uid, value);
    std::vector<int64_t> uids;
    std::vector<void*> pointers;
    for (const auto& [uid, ptr] : tensors)
        uids.push_back(uid), pointers.push_back(ptr);
    Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids.data(),
             int64_t(uids.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, pointers.data(),
             int64_t(pointers.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, workspace)
        .finalize("variant pack");
    KILN_CUDNN(cudnn().SetStream(handle(), stream()));
    KILN_CUDNN(cudnn().BackendExecute(handle(), plan.get(), pack.get()));
}

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

Key key_of(const Attention& a) {
    return {a.B, a.T, a.H, a.Hkv, a.D, a.ldqkv};
}

}  // namespace

struct CudnnAttention {
    Attention shape;
    Graph forward, backward;
    Desc forward_plan, backward_plan;
    // Device memory: the backward's rowdot (B, H, T) and dQ accumulator (B, H, T, D) in f32,
    // then the larger plan's workspace.
    std::shared_ptr<void> memory;
    float *rowdot = nullptr, *dq_sum = nullptr;
    void* workspace = nullptr;
};

std::string cudnn_unavailable() {
    return cudnn_library().missing;
}

std::string cudnn_attention_refusal(const Attention& a) {
    if (const std::string missing = cudnn_unavailable(); !missing.empty())
        return fmt::format("cuDNN cannot be loaded ({})", missing);
    const size_t v = cudnn().GetVersion();
    if (v == 91000 || v == 91001)
        return fmt::format("cuDNN {}'s bf16 fused attention has known faults (9.10.0, 9.10.1)", v);
    // Versions up to 9.15.0 want an explicit padding mask where the keys do not fill whole
    // 128-key tiles (NaN gradients from the padded keys otherwise), which these graphs omit.
    if (v <= 91500 && a.T % 128 != 0)
        return fmt::format(
            "cuDNN {} before 9.15.1 is not asked for sequences of {} (not a "
            "multiple of 128)",
            v, a.T);
    return {};
}

const CudnnAttention* cudnn_attention(const Attention& a) {
    static std::mutex mutex;
    static std::map<Key, std::unique_ptr<CudnnAttention>> built;
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = built.find(key_of(a));
    if (it != built.end())
        return it->second.get();
    const std::string shape = fmt::format("B={} T={} H={} Hkv={} D={}", a.B, a.T, a.H, a.Hkv, a.D);
    auto refuse = [&](const std::string& reason) -> const CudnnAttention* {
        log::warn("kernels", "{}; attention runs kiln's own kernels", reason);
        built.emplace(key_of(a), nullptr);
        return nullptr;
    };
    if (const std::string why = cudnn_attention_refusal(a); !why.empty())
        return refuse(why);
    auto c = std::make_unique<CudnnAttention>();
    c->shape = a;
    const Shapes s(a);
    int64_t forward_bytes = 0, backward_bytes = 0;
    std::string why;
    try {  // a descriptor this cuDNN does not take refuses the shape, as no plan does
        forward_graph(c->forward, s);
        backward_graph(c->backward, s);
        if (!c->forward.plan(handle(), c->forward_plan, forward_bytes, why) ||
            !c->backward.plan(handle(), c->backward_plan, backward_bytes, why))
            return refuse(fmt::format("cuDNN offers no fused attention for {} ({})", shape, why));
    } catch (const Error& e) {
        return refuse(
            fmt::format("cuDNN cannot build fused attention for {} ({})", shape, e.what()));
    }
    const size_t rowdot_bytes = size_t(a.B * a.H * a.T) * 4;
    const size_t dq_bytes = size_t(a.B * a.H * a.T * a.D) * 4;
    const size_t ws_bytes = size_t(std::max(forward_bytes, backward_bytes));
    auto round = [](size_t n) { return (n + 255) / 256 * 256; };
    const size_t bytes = round(rowdot_bytes) + round(dq_bytes) + ws_bytes;
    void* raw = nullptr;
    if (const cudaError_t e = cudaMalloc(&raw, bytes); e != cudaSuccess) {
        (void)cudaGetLastError();  // the failed allocation leaves nothing behind
        return refuse(fmt::format("no room for cuDNN's attention memory for {} ({} MiB: {})", shape,
                                  bytes >> 20, cudaGetErrorString(e)));
    }
    c->memory = std::shared_ptr<void>(raw, [](void* p) { cudaFree(p); });
    c->rowdot = static_cast<float*>(raw);
    c->dq_sum = reinterpret_cast<float*>(static_cast<char*>(raw) + round(rowdot_bytes));
    c->workspace = static_cast<char*>(raw) + round(rowdot_bytes) + round(dq_bytes);
    log::info("kernels", "cuDNN fused attention for {}: {} MiB of its own memory", shape,
              bytes >> 20);
    return built.emplace(key_of(a), std::move(c)).first->second.get();
}

void cudnn_attention_forward(const CudnnAttention& c, const uint16_t* qkv16, uint16_t* o16,
                             float* stats) {
    const Attention& a = c.shape;
    auto* qkv = const_cast<uint16_t*>(qkv16);
    execute(c.forward_plan, c.forward,
            {{kQ, qkv},
             {kK, qkv + a.H * a.D},
             {kV, qkv + (a.H + a.Hkv) * a.D},
             {kO, o16},
             {kStats, stats}},
            c.workspace);
}

void cudnn_attention_backward(const CudnnAttention& c, const uint16_t* qkv16, const uint16_t* o16,
                              const float* stats, const uint16_t* dout16, uint16_t* dqkv16) {
    const Attention& a = c.shape;
    auto* qkv = const_cast<uint16_t*>(qkv16);
    const int64_t k_at = a.H * a.D, v_at = (a.H + a.Hkv) * a.D;
    if (cudnn().GetVersion() < 90600)  // earlier versions sum into dQ's accumulator as it stands
        KILN_CUDA(cudaMemsetAsync(c.dq_sum, 0, size_t(a.B * a.H * a.T * a.D) * 4, stream()));
    execute(c.backward_plan, c.backward,
            {{kQ, qkv},
             {kK, qkv + k_at},
             {kV, qkv + v_at},
             {kO, const_cast<uint16_t*>(o16)},
             {kDO, const_cast<uint16_t*>(dout16)},
             {kStats, const_cast<float*>(stats)},
             {kDQ, dqkv16},
             {kDK, dqkv16 + k_at},
             {kDV, dqkv16 + v_at},
             {kRowdot, c.rowdot},
             {kDQSum, c.dq_sum}},
            c.workspace);
}

CudnnAttentionOps describe_cudnn_attention(const Attention& a) {
    const Shapes s(a);
    Graph forward, backward;
    forward_graph(forward, s);
    backward_graph(backward, s);
    return {forward.operations(), backward.operations()};
}

}  // namespace kiln::kernels::cuda

#else  // built without cuDNN's header: its attention is refused, and the own kernels run

namespace kiln::kernels::cuda {

struct CudnnAttention {};

std::string cudnn_unavailable() {
    return "this build has no cuDNN (configured with KILN_CUDNN=OFF, or where no cudnn.h was "
           "found)";
}

std::string cudnn_attention_refusal(const Attention&) {
    return fmt::format("cuDNN cannot be used ({})", cudnn_unavailable());
}

const CudnnAttention* cudnn_attention(const Attention& a) {
    static const bool said = [&] {
        log::warn("kernels", "{}; attention runs kiln's own kernels", cudnn_attention_refusal(a));
        return true;
    }();
    (void)said;
    return nullptr;
}

void cudnn_attention_forward(const CudnnAttention&, const uint16_t*, uint16_t*, float*) {
    throw Error(cudnn_attention_refusal({}));
}

void cudnn_attention_backward(const CudnnAttention&, const uint16_t*, const uint16_t*, const float*,
                              const uint16_t*, uint16_t*) {
    throw Error(cudnn_attention_refusal({}));
}

CudnnAttentionOps describe_cudnn_attention(const Attention&) {
    throw Error(cudnn_attention_refusal({}));
}

}  // namespace kiln::kernels::cuda

#endif
