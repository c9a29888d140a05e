#include "kernels/cpu/matmul.h"

#include <omp.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <optional>
#include <vector>

#include "core/error.h"
#include "core/fs.h"
#include "core/progress.h"
#include "kernels/cpu/cpu.h"

namespace kiln::kernels::cpu {
namespace {

dnnl::engine& engine() {
    static dnnl::engine e(dnnl::engine::kind::cpu, 0);
    return e;
}

dnnl::stream& stream() {
    static dnnl::stream s(engine());
    return s;
}

dnnl::memory::data_type dnnl_type(DType t) {
    KILN_CHECK(t == DType::f32 || t == DType::bf16, "matmul operand of type {}", dtype_name(t));
    return t == DType::bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
}

dnnl::memory::desc desc(const int64_t dims[4], const int64_t strides[4], DType t) {
    return dnnl::memory::desc(dnnl::memory::dims(dims, dims + 4), dnnl_type(t),
                              dnnl::memory::dims(strides, strides + 4));
}

// Everything that selects a primitive: dims and strides of a, b, c, the types, the epilogue.
using Key = std::array<int64_t, 28>;

struct Cached {
    dnnl::matmul primitive;
    dnnl::memory::desc a, b, c;
    int threads = 1;  // the pool's threads it runs on
};

// One product as oneDNN sees it, and what the plan calls it.
struct Product {
    dnnl::memory::desc a, b, c;
    // Outlives every descriptor made from it: oneDNN's implementation iterator reads it.
    std::optional<dnnl::matmul::desc> op;
    dnnl::primitive_attr attr;
    std::string name;
};

// A product shape being tuned: its candidates, timed where the training step runs them (with
// the caches as the step leaves them), one candidate per pass.
struct Trial {
    std::string name;
    std::vector<Cached> candidates;  // [0]: the default
    std::vector<std::string> choices;
    std::vector<double> fastest;  // per candidate: its least time in one pass
    double this_pass = 0;         // time of this pass's candidate so far
};

// Each candidate runs in this many passes; another than the default must be this much faster.
constexpr int kRounds = 2;
constexpr double kMargin = 0.03;

struct State {
    std::mutex mutex;
    std::map<Key, Cached> cache;
    bool tuning = false;
    int part = 0, parts = 1;
    int pass = 0;  // 0: the pass that finds the shapes
    std::map<Key, Trial> trials;
    Plan plan;   // choices to run
    Plan tuned;  // choices made since tune()
};

State& state() {
    static State s;
    return s;
}

using Clock = std::chrono::steady_clock;

std::string join(const int64_t v[4]) {
    return fmt::format("{},{},{},{}", v[0], v[1], v[2], v[3]);
}

std::string product_name(const MatOperand& a, const MatOperand& b, const int64_t c_strides[4],
                         float alpha, bool accumulate) {
    return fmt::format("{}x{}x{}x{}x{} a {}[{}] b {}[{}]x{}x{} c[{}] alpha {} {}", a.dims[0],
                       a.dims[1], a.dims[2], b.dims[3], a.dims[3], dtype_name(a.type),
                       join(a.strides), dtype_name(b.type), join(b.strides), b.dims[0], b.dims[1],
                       join(c_strides), alpha, accumulate ? "+=" : "=");
}

std::string choice_name(const dnnl::matmul::primitive_desc& pd, int threads) {
    return fmt::format("{} threads={}", pd.impl_info_str(), threads);
}

// Primitive descriptors are made with the pool at the thread count they will run on (oneDNN
// fixes the split then).
dnnl::matmul::primitive_desc describe(const Product& p, int threads) {
    omp_set_num_threads(threads);
    try {
        return dnnl::matmul::primitive_desc(*p.op, p.attr, engine());
    } catch (const dnnl::error& e) {
        KILN_CHECK(false, "oneDNN rejected a matmul ({}): {}", p.name, e.what());
    }
    return {};
}

Cached make(const Product& p, const dnnl::matmul::primitive_desc& pd, int threads) {
    return Cached{dnnl::matmul(pd), p.a, p.b, p.c, threads};
}

// The plan's choice for p, when this library offers it.
std::optional<Cached> planned(const Product& p, const std::string& choice, int max_threads) {
    size_t at = choice.rfind(" threads=");
    if (at == std::string::npos)
        return std::nullopt;
    const std::string impl = choice.substr(0, at);
    const int threads = std::atoi(choice.c_str() + at + 9);
    if (threads < 1 || threads > max_threads)
        return std::nullopt;
    auto pd = describe(p, threads);
    do {
        if (impl == pd.impl_info_str())
            return make(p, pd, threads);
    } while (pd.next_impl());
    return std::nullopt;
}

void run(const Cached& m, const MatOperand& a, const MatOperand& b, float* c) {
    omp_set_num_threads(m.threads);
    dnnl::memory ma(m.a, engine(), const_cast<void*>(a.ptr));
    dnnl::memory mb(m.b, engine(), const_cast<void*>(b.ptr));
    dnnl::memory mc(m.c, engine(), c);
    m.primitive.execute(stream(), {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
    stream().wait();
}

// Offsets of a spread of at most `most` of the logical elements of c (dims, strides).
std::vector<int64_t> sample_offsets(const int64_t dims[4], const int64_t strides[4], int64_t most) {
    const int64_t total = dims[0] * dims[1] * dims[2] * dims[3];
    const int64_t step = std::max<int64_t>(1, total / most);
    std::vector<int64_t> out;
    for (int64_t i = 0; i < total; i += step) {
        int64_t rest = i, off = 0;
        for (int d = 3; d >= 0; d--) {
            off += (rest % dims[d]) * strides[d];
            rest /= dims[d];
        }
        out.push_back(off);
    }
    return out;
}

// c's logical elements (dims, strides) = 0, leaving what lies between them.
void zero(float* c, const int64_t dims[4], const int64_t strides[4]) {
    for (int64_t i = 0; i < dims[0]; i++)
        for (int64_t j = 0; j < dims[1]; j++)
            for (int64_t m = 0; m < dims[2]; m++) {
                float* row = c + i * strides[0] + j * strides[1] + m * strides[2];
                for (int64_t n = 0; n < dims[3]; n++)
                    row[n * strides[3]] = 0;
            }
}

// The candidates of p that agree with the default (the first) on the real operands and are not
// plainly slower than it, run once or twice each. c ends holding the product (without what an
// accumulating product would have added it to).
Trial discover(const Product& p, const MatOperand& a, const MatOperand& b, float* c,
               const int64_t c_dims[4], const int64_t c_strides[4], bool accumulate,
               int max_threads, bool serial) {
    const std::vector<int64_t> sample = sample_offsets(c_dims, c_strides, 1024);
    auto once = [&](const Cached& m) {
        if (accumulate)
            zero(c, c_dims, c_strides);
        auto t0 = Clock::now();
        run(m, a, b, c);
        return seconds_since(t0);
    };
    Trial t;
    t.name = p.name;
    std::vector<float> expect;
    float scale = 0;
    double default_cold = 0, default_warm = 0;
    std::vector<int> splits = {serial ? 1 : max_threads};
    if (splits[0] > 1)
        splits.push_back(1);
    for (int threads : splits) {
        auto pd = describe(p, threads);
        do {
            if (std::string(pd.impl_info_str()).rfind("ref", 0) == 0)
                continue;  // the reference implementation: correct, and far too slow
            Cached m = make(p, pd, threads);
            const double cold = once(m);
            if (expect.empty()) {
                for (int64_t o : sample) {
                    expect.push_back(c[o]);
                    scale = std::max(scale, std::fabs(c[o]));
                }
                default_cold = cold;
            } else {
                bool agrees = true;
                for (size_t i = 0; i < sample.size() && agrees; i++)
                    agrees = std::fabs(c[sample[i]] - expect[i]) <= 1e-3f * scale + 1e-6f;
                if (!agrees || cold > 3 * default_cold)
                    continue;  // never trust a candidate that computes other numbers
            }
            const double warm = once(m);
            if (t.candidates.empty())
                default_warm = warm;
            else if (warm > 1.5 * default_warm)
                continue;  // not worth a pass
            t.candidates.push_back(std::move(m));
            t.choices.push_back(choice_name(pd, threads));
        } while (pd.next_impl());
    }
    KILN_CHECK(!t.candidates.empty(), "oneDNN offers no implementation of a matmul ({})", p.name);
    t.fastest.assign(t.candidates.size(), INFINITY);
    once(t.candidates[0]);
    return t;
}

}  // namespace

void matmul(const MatOperand& a, const MatOperand& b, float* c, const int64_t c_strides[4],
            float alpha, bool accumulate) {
    const int64_t c_dims[4] = {a.dims[0], a.dims[1], a.dims[2], b.dims[3]};
    KILN_CHECK(a.dims[3] == b.dims[2], "matmul inner dims {} != {}", a.dims[3], b.dims[2]);
    Key key{};
    for (int i = 0; i < 4; i++) {
        key[i] = a.dims[i];
        key[4 + i] = a.strides[i];
        key[8 + i] = b.dims[i];
        key[12 + i] = b.strides[i];
        key[16 + i] = c_strides[i];
    }
    key[20] = static_cast<int64_t>(a.type);
    key[21] = static_cast<int64_t>(b.type);
    key[22] = accumulate;
    uint32_t alpha_bits;
    std::memcpy(&alpha_bits, &alpha, 4);
    key[23] = alpha_bits;

    // oneDNN 2.6's AMX bf16 matmul returns wrong values, intermittently or always, when fewer
    // than ~48 rows are split across threads (seen with N in 49..63; tests/kernels pins it).
    // Products that short gain nothing from threads anyway: they run on one thread.
    const bool serial = a.dims[2] < 64;
    const int threads = omp_get_max_threads();
    key[24] = threads;
    // A product may run on fewer threads than the pool (its plan's choice); the pool is given
    // back as it was, whichever way this returns.
    struct RestorePool {
        int threads;
        ~RestorePool() { omp_set_num_threads(threads); }
    } restore{threads};

    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    if (auto trial = st.trials.find(key); trial != st.trials.end()) {
        Trial& t = trial->second;
        // The finding pass runs the default for the shape's later occurrences (untimed).
        const size_t i = st.pass == 0 ? 0 : size_t(st.pass - 1) % t.candidates.size();
        auto t0 = Clock::now();
        run(t.candidates[i], a, b, c);
        t.this_pass += seconds_since(t0);
        return;
    }
    auto it = st.cache.find(key);
    if (it != st.cache.end()) {
        run(it->second, a, b, c);
        return;
    }
    Product p;
    p.name = product_name(a, b, c_strides, alpha, accumulate);
    p.a = desc(a.dims, a.strides, a.type);
    p.b = desc(b.dims, b.strides, b.type);
    p.c = desc(c_dims, c_strides, DType::f32);
    if (alpha != 1.0f)
        p.attr.set_output_scales(0, {alpha});
    if (accumulate) {
        dnnl::post_ops ops;
        ops.append_sum(1.0f);
        p.attr.set_post_ops(ops);
    }
    try {
        p.op.emplace(p.a, p.b, p.c);
    } catch (const dnnl::error& e) {
        KILN_CHECK(false, "oneDNN rejected a matmul ({}): {}", p.name, e.what());
    }
    std::optional<Cached> chosen;
    if (st.tuning && st.pass == 0 &&
        int(fs::xxh64(p.name.data(), p.name.size()) % uint64_t(st.parts)) == st.part) {
        st.trials.emplace(key,
                          discover(p, a, b, c, c_dims, c_strides, accumulate, threads, serial));
        return;
    }
    if (auto planned_choice = st.plan.find(p.name); planned_choice != st.plan.end())
        chosen = planned(p, planned_choice->second, serial ? 1 : threads);
    if (!chosen) {
        const int split = serial ? 1 : threads;
        chosen = make(p, describe(p, split), split);
    }
    it = st.cache.emplace(key, std::move(*chosen)).first;
    run(it->second, a, b, c);
}

// The products this backend runs, as a revision: a plan tuned for other products (another
// shape, stride or dtype of some product) would leave those untuned, so a plan cache entry
// holds for one revision. Raise it with any change to the products gemm or attention issue.
constexpr int kProductsRevision = 4;

namespace {

std::string isa_name(dnnl::cpu_isa isa) {
    switch (isa) {
        case dnnl::cpu_isa::sse41:
            return "sse41";
        case dnnl::cpu_isa::avx:
            return "avx";
        case dnnl::cpu_isa::avx2:
            return "avx2";
        case dnnl::cpu_isa::avx2_vnni:
            return "avx2_vnni";
        case dnnl::cpu_isa::avx512_core:
            return "avx512_core";
        case dnnl::cpu_isa::avx512_core_vnni:
            return "avx512_core_vnni";
        case dnnl::cpu_isa::avx512_core_bf16:
            return "avx512_core_bf16";
        case dnnl::cpu_isa::avx512_core_amx:
            return "avx512_core_amx";
        default:
            return fmt::format("isa 0x{:x}", unsigned(isa));
    }
}

CpuInfo probe() {
    CpuInfo info;
    info.model = "unknown CPU";
    std::string flags;
    if (std::FILE* f = std::fopen("/proc/cpuinfo", "r")) {
        char line[4096];
        while (std::fgets(line, sizeof line, f)) {
            std::string l = line;
            auto value = [&] {
                size_t colon = l.find(": ");
                std::string v = colon == std::string::npos ? "" : l.substr(colon + 2);
                while (!v.empty() && (v.back() == '\n' || v.back() == ' '))
                    v.pop_back();
                return v;
            };
            if (l.rfind("model name", 0) == 0 && info.model == "unknown CPU")
                info.model = value();
            else if (l.rfind("flags", 0) == 0 && flags.empty())
                flags = fmt::format(" {} ", value());
        }
        std::fclose(f);
    }
    info.features = flags.find(" amx_bf16 ") != std::string::npos      ? "AMX-BF16"
                    : flags.find(" avx512_bf16 ") != std::string::npos ? "AVX512-BF16"
                    : flags.find(" avx512f ") != std::string::npos     ? "AVX-512"
                    : flags.find(" avx2 ") != std::string::npos        ? "AVX2"
                                                                       : "no AVX2";
    // What oneDNN dispatches to, after ONEDNN_MAX_CPU_ISA: bf16 instructions from
    // avx512_core_bf16 on (AMX included); below that, avx512_core emulates bf16 products and
    // older ISAs have none.
    const dnnl::cpu_isa isa = dnnl::get_effective_cpu_isa();
    info.isa = isa_name(isa);
    const auto bits = static_cast<unsigned>(isa);
    const auto bf16_bits = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);
    info.bf16_native = (bits & bf16_bits) == bf16_bits;
    // Whether oneDNN builds a bf16 product at all: a small one, as the backend would ask.
    using dt = dnnl::memory::data_type;
    using tag = dnnl::memory::format_tag;
    try {
        dnnl::memory::desc a({16, 16}, dt::bf16, tag::ab), b({16, 16}, dt::bf16, tag::ab),
            c({16, 16}, dt::f32, tag::ab);
        dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), engine());
        info.bf16_products = true;
    } catch (const dnnl::error&) {
        info.bf16_products = false;
    }
    info.bf16_native = info.bf16_native && info.bf16_products;
    return info;
}

}  // namespace

const CpuInfo& cpu_info() {
    static const CpuInfo info = probe();
    return info;
}

std::string platform() {
    const CpuInfo& cpu = cpu_info();
    const dnnl_version_t* v = dnnl_version();
    return fmt::format("{} ({}), {} threads; oneDNN {}.{}.{} ({}, {}); products r{}", cpu.model,
                       cpu.features, omp_get_max_threads(), v->major, v->minor, v->patch, v->hash,
                       cpu.isa, kProductsRevision);
}

void tune(int part, int parts) {
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    st.tuning = true;
    st.part = part;
    st.parts = std::max(1, parts);
    st.pass = 0;
    st.trials.clear();
    st.tuned.clear();
}

bool tune_next() {
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    if (!st.tuning)
        return false;
    size_t most = 1;
    for (auto& [key, t] : st.trials) {
        most = std::max(most, t.candidates.size());
        if (st.pass > 0) {
            double& f = t.fastest[size_t(st.pass - 1) % t.candidates.size()];
            f = std::min(f, t.this_pass);
        }
        t.this_pass = 0;
    }
    if (most > 1 && ++st.pass <= kRounds * int(most))
        return true;
    for (auto& [key, t] : st.trials) {
        const size_t best = fastest_candidate(t.fastest, kMargin);
        st.tuned[t.name] = t.choices[best];
        st.cache.insert_or_assign(key, std::move(t.candidates[best]));
    }
    st.trials.clear();
    st.tuning = false;
    return false;
}

Plan tuned() {
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    return st.tuned;
}

void use(const Plan& plan) {
    State& st = state();
    std::lock_guard<std::mutex> lock(st.mutex);
    st.tuning = false;
    st.trials.clear();
    st.plan = plan;
    st.cache.clear();
}

}  // namespace kiln::kernels::cpu
