// The model and the optimizer on memory the host cannot touch, as on a device: a kernel table
// that is the CPU table, except that its memory is mapped without access and opened only while
// one of its ops runs. A host loop over the model's tensors anywhere but in the table faults, so
// these tests prove that the model, its pipeline stages and AdamW reach their memory only
// through the table (kernels/table.h), which is what lets a CUDA table run them. The results
// must be the CPU table's, bit for bit.
//
// The table records as a device records a graph (Kernels::record): while a recording is open
// each op is kept with its arguments instead of run, and a replay runs what was kept without
// the caller's code. An op that reads or writes host memory, or hands a value back to the host,
// fails the recording. So a micro-batch replayed from its recording proves that its work is the
// table's ops alone, the same ones every time.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <random>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "fixture.h"
#include "kernels/cpu/cpu.h"
#include "kernels/products.h"
#include "kernels/replays.h"
#include "model/llama.h"
#include "model/replayed_steps.h"
#include "optim/adamw.h"

namespace kiln::model {
namespace {

using kernels::Kernels;
using kernels::Precision;

// Every mapping the guarded memory has handed out, and how many ops are running on it.
struct Guard {
    std::mutex mutex;
    std::vector<std::pair<void*, size_t>> maps;
    int open = 0;

    void protect(int prot) {
        for (auto [p, n] : maps)
            KILN_CHECK(::mprotect(p, n, prot) == 0, "mprotect");
    }
};
Guard& guard() {
    static Guard g;
    return g;
}

struct Opened {  // the memory is readable and writable while one of these lives
    Opened() {
        std::lock_guard<std::mutex> lock(guard().mutex);
        if (guard().open++ == 0)
            guard().protect(PROT_READ | PROT_WRITE);
    }
    ~Opened() {
        std::lock_guard<std::mutex> lock(guard().mutex);
        if (--guard().open == 0)
            guard().protect(PROT_NONE);
    }
};

size_t page_round(size_t bytes) {
    const size_t page = 4096;
    return (std::max<size_t>(bytes, 1) + page - 1) / page * page;
}

void* guarded_alloc(size_t bytes, const char* what) {
    std::lock_guard<std::mutex> lock(guard().mutex);
    const size_t n = page_round(bytes);
    const int prot = guard().open > 0 ? PROT_READ | PROT_WRITE : PROT_NONE;
    void* p = ::mmap(nullptr, n, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);  // zero-filled
    KILN_CHECK(p != MAP_FAILED, "mapping {} bytes for {}", n, what);
    guard().maps.emplace_back(p, n);
    return p;
}

void guarded_release(void* p) {
    std::lock_guard<std::mutex> lock(guard().mutex);
    auto& maps = guard().maps;
    auto it = std::find_if(maps.begin(), maps.end(), [&](const auto& m) { return m.first == p; });
    KILN_CHECK(it != maps.end(), "releasing memory that was not allocated here");
    ::munmap(it->first, it->second);
    maps.erase(it);
}

const Memory guarded_memory = {"guarded", 64, guarded_alloc, guarded_release};

template <Precision P>
const Kernels& inner() {
    return kernels::cpu_kernels(P);
}

bool guarded_pointer(const void* p) {
    std::lock_guard<std::mutex> lock(guard().mutex);
    for (auto [base, n] : guard().maps) {
        if (p >= base && p < static_cast<const char*>(base) + n)
            return true;
    }
    return false;
}

struct Tape {  // a recording: the ops, each with its arguments
    std::vector<std::function<void()>> ops;
};
Tape* recording = nullptr;  // the open recording, if any

void* record(const std::function<void()>& work) {
    KILN_CHECK(!recording, "recordings do not nest");
    auto tape = std::make_unique<Tape>();
    recording = tape.get();
    try {
        work();
    } catch (...) {
        recording = nullptr;
        throw;
    }
    recording = nullptr;
    return tape.release();
}
void replay(void* tape) {
    for (const auto& op : static_cast<Tape*>(tape)->ops)
        op();
}
void release(void* tape) {
    delete static_cast<Tape*>(tape);
}

// Whether an argument's pointers are the table's memory, or null: host memory is the caller's,
// and changes (or is read) at the time of the call, not of the replay.
template <typename T>
bool guarded_argument(const T& x) {
    if constexpr (std::is_pointer_v<T>)
        return !x || guarded_pointer(x);
    else if constexpr (std::is_same_v<T, kernels::Gemm>)
        return guarded_argument(x.a) && guarded_argument(x.b) && guarded_argument(x.c) &&
               guarded_argument(x.c_in);
    else if constexpr (std::is_same_v<T, kernels::Attention>)
        return guarded_argument(x.rope_cos) && guarded_argument(x.rope_sin);
    else if constexpr (std::is_same_v<T, kernels::Workspace>)
        return guarded_argument(x.ptr);
    else
        return true;  // sizes, scalars, dtypes
}

// Each op of the guarded table: the CPU table's, with the memory opened around it; kept for
// later while a recording is open.
template <Precision P, auto Member, typename R, typename... A>
R opened_call(A... a) {
    if (recording) {
        if (!(guarded_argument(a) && ...))
            throw error("an op on host memory was recorded");
        if constexpr (std::is_void_v<R>) {
            recording->ops.push_back([a...] {  // copies of the arguments, as a graph keeps
                Opened o;
                (inner<P>().*Member)(a...);
            });
            return;
        } else {
            throw error("an op that returns a value to the host was recorded");
        }
    }
    Opened o;
    return (inner<P>().*Member)(a...);
}
template <Precision P, auto Member, typename R, typename... A>
constexpr auto opened(R (*Kernels::*)(A...)) {
    return &opened_call<P, Member, R, A...>;
}
#define OPENED(f) opened<P, &Kernels::f>(&Kernels::f)

void guarded_wait() {
    if (recording)
        throw error("a wait was recorded");
}

template <Precision P>
const Kernels guarded_table = {
    P == Precision::bf16 ? "guarded-bf16" : "guarded-fp32",
    P,
    inner<P>().op_inputs,
    inner<P>().workspace_bytes,  // a size: touches no memory
    OPENED(gemm),
    OPENED(embedding_forward),
    OPENED(embedding_backward),
    OPENED(rmsnorm_forward),
    OPENED(rmsnorm_backward),
    inner<P>().attention_saved_bytes,
    OPENED(attention_forward),
    OPENED(attention_backward),
    OPENED(swiglu_forward),
    OPENED(swiglu_backward),
    OPENED(logit_stats),
    OPENED(cross_entropy_backward),
    OPENED(cross_entropy),
    OPENED(adamw),
    OPENED(to_bf16),
    &guarded_memory,
    &host_memory,
    OPENED(copy),
    OPENED(zero),
    OPENED(widen),
    OPENED(add),
    OPENED(slice_ids),
    OPENED(rescale_sumexp),
    OPENED(row_losses),
    OPENED(sum_into),
    OPENED(sum_squares),
    guarded_wait,  // touches no memory
    nullptr,       // nothing to tune
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    record,
    replay,
    release,
};

const Kernels& guarded(Precision p) {
    return p == Precision::bf16 ? guarded_table<Precision::bf16> : guarded_table<Precision::fp32>;
}

// n floats of the backend's memory, copied out to the host.
std::vector<float> host_copy(const Kernels& k, const float* x, int64_t n) {
    std::vector<float> out(static_cast<size_t>(n));
    k.copy(out.data(), x, out.size() * sizeof(float));
    return out;
}

LlamaConfig config() {
    LlamaConfig c;
    c.dim = 32, c.n_layers = 2, c.n_heads = 4, c.n_kv_heads = 2, c.vocab_size = 50;
    c.multiple_of = 16;
    return c;
}

struct Batch {
    std::vector<int32_t> tokens, targets;
};
Batch batch(int64_t B, int64_t T, int64_t V, uint64_t seed) {
    std::mt19937_64 rng(seed);
    Batch b{std::vector<int32_t>(size_t(B * T)), std::vector<int32_t>(size_t(B * T))};
    for (auto& t : b.tokens)
        t = static_cast<int32_t>(rng() % V);
    for (int64_t i = 0; i < B * T; i++)
        b.targets[size_t(i)] = (i % T) + 1 < T ? b.tokens[size_t(i + 1)] : -1;
    return b;
}

// Everything a step leaves behind, copied to the host: the losses of two micro-batches and a
// forward-only pass, the gradients, the updated weights, the gradient norm and full logits.
struct Outcome {
    std::vector<double> losses;
    std::vector<float> grads, params, logits;
    double grad_sq = 0;
};

Outcome train_step(const Kernels& k, Recompute recompute) {
    const LlamaConfig c = config();
    const int64_t B = 2, T = 8;
    Llama m(c, k, B, T, recompute);
    optim::AdamW adamw(m.layout(), {}, 0, m.layout().total(), k);
    m.init_weights(5, 0.1);
    const Batch a = batch(B, T, c.vocab_size, 1), b = batch(B, T, c.vocab_size, 2);
    Outcome out;
    m.forward_backward(a.tokens.data(), a.targets.data(), 0.01f, Grads::overwrite);
    out.losses.push_back(m.take_loss().sum);
    m.forward_backward(b.tokens.data(), b.targets.data(), 0.01f);
    out.losses.push_back(m.take_loss().sum);
    m.forward_backward(a.tokens.data(), a.targets.data(), 0);
    out.losses.push_back(m.take_loss().sum);
    const int64_t n = m.layout().total();
    out.grads = host_copy(k, m.grads(), n);
    out.grad_sq = k.sum_squares(m.grads(), {{0, n}});
    adamw.update(m.params(), m.params_bf16(), m.grads(), 0.5f, 1e-2);
    out.params = host_copy(k, m.params(), n);
    out.logits.resize(size_t(B * T * c.vocab_size));
    m.forward_logits(a.tokens.data(), out.logits.data());
    return out;
}

class DeviceMemory : public ::testing::TestWithParam<Precision> {};
INSTANTIATE_TEST_SUITE_P(Precision, DeviceMemory,
                         ::testing::Values(Precision::fp32, Precision::bf16),
                         kiln::testing::precision_param_name);

TEST_P(DeviceMemory, TheModelReachesItsMemoryOnlyThroughTheTable) {
    KILN_REQUIRE_PRODUCTS(GetParam());
    for (Recompute r : {Recompute::none, Recompute::full}) {
        const Outcome cpu = train_step(kernels::cpu_kernels(GetParam()), r);
        const Outcome dev = train_step(guarded(GetParam()), r);
        EXPECT_EQ(dev.losses, cpu.losses);
        EXPECT_EQ(dev.grads, cpu.grads);
        EXPECT_EQ(dev.grad_sq, cpu.grad_sq);
        EXPECT_EQ(dev.params, cpu.params);
        EXPECT_EQ(dev.logits, cpu.logits);
    }
    EXPECT_TRUE(guard().maps.empty()) << "every arena is released";
}

// Two pipeline stages in one process, handing the residual stream and its gradient from one
// model's memory to the other's as the stage exchange does, against the whole model.
TEST_P(DeviceMemory, PipelineStagesReachTheirMemoryOnlyThroughTheTable) {
    KILN_REQUIRE_PRODUCTS(GetParam());
    const Kernels& k = guarded(GetParam());
    const LlamaConfig c = config();
    const int64_t B = 2, T = 8;
    const Batch a = batch(B, T, c.vocab_size, 3);
    Llama whole(c, k, B, T, Recompute::selective);
    whole.init_weights(7, 0.1);
    whole.forward_backward(a.tokens.data(), a.targets.data(), 0.01f, Grads::overwrite);
    const double loss = whole.take_loss().sum;
    Llama first(c, k, B, T, Recompute::selective, 0, nullptr, {false, 2, 0, 1});
    Llama last(c, k, B, T, Recompute::selective, 0, nullptr, {false, 2, 1, 1});
    first.init_weights(7, 0.1);
    last.init_weights(7, 0.1);
    first.forward(0, a.tokens.data(), nullptr);
    last.forward(0, nullptr, first.output(0));
    last.loss(a.targets.data(), 0.01f, Grads::overwrite);
    EXPECT_EQ(last.take_loss().sum, loss);
    last.backward(0, nullptr, Grads::overwrite);
    first.backward(0, last.input_grad(), Grads::overwrite);
    const std::vector<float> g = host_copy(k, whole.grads(), whole.layout().total());
    for (Llama* stage : {&first, &last}) {
        const std::vector<float> mine = host_copy(k, stage->grads(), stage->layout().total());
        for (const auto& p : stage->layout().params()) {
            const ParamInfo* w = whole.layout().find(p.name);
            ASSERT_NE(w, nullptr) << p.name;
            EXPECT_TRUE(std::equal(mine.begin() + p.offset, mine.begin() + p.offset + p.numel,
                                   g.begin() + w->offset))
                << p.name;
        }
    }
}

// Micro-batches replayed from their recordings (kernels::Replays, as the trainer runs them under
// train.graphs) against the CPU table's run as called: the same losses, gradients and weights,
// bit for bit. What a micro-batch reads from the host (stage_batch) is put in place before each
// replay.
TEST_P(DeviceMemory, MicroBatchesReplayFromTheirRecordings) {
    KILN_REQUIRE_PRODUCTS(GetParam());
    for (Recompute r : {Recompute::none, Recompute::full}) {
        const auto eager = kiln::testing::replayed_steps(kernels::cpu_kernels(GetParam()), r, true);
        const auto replayed = kiln::testing::replayed_steps(guarded(GetParam()), r, true);
        EXPECT_EQ(replayed.recorded, 2);
        EXPECT_EQ(replayed.losses, eager.losses);
        EXPECT_EQ(replayed.grads, eager.grads);
        EXPECT_EQ(replayed.params, eager.params);
    }
    EXPECT_TRUE(guard().maps.empty()) << "every arena is released";
}

// What cannot be recorded says so, and leaves nothing recorded: a micro-batch that reads its
// batch from the host, and the read of its loss.
TEST_P(DeviceMemory, HostReadsAndWaitsCannotBeRecorded) {
    KILN_REQUIRE_PRODUCTS(GetParam());
    const Kernels& k = guarded(GetParam());
    const LlamaConfig c = config();
    Llama m(c, k, 2, 8, Recompute::none);
    m.init_weights(3, 0.1);
    const Batch b = batch(2, 8, c.vocab_size, 1);
    EXPECT_EQ(
        kiln::testing::message_of([&] {
            release(k.record([&] { m.forward_backward(b.tokens.data(), b.targets.data(), 0); }));
        }),
        "an op on host memory was recorded");
    m.stage_batch(b.tokens.data(), b.targets.data());
    EXPECT_EQ(kiln::testing::message_of([&] {
                  release(k.record([&] {
                      m.forward_backward_staged(0, Grads::overwrite);
                      m.take_loss();
                  }));
              }),
              "an op on host memory was recorded");
    EXPECT_EQ(kiln::testing::message_of([&] { release(k.record(k.wait)); }), "a wait was recorded");

    // Through Replays: under train.graphs=true the failed recording is the error; under auto it
    // is logged, and the work runs as called from then on, nothing of it lost.
    m.take_loss();
    auto unstaged = [&] { m.forward_backward(b.tokens.data(), b.targets.data(), 0); };
    kernels::Replays strict(k, true, true), lenient(k, true, false);
    strict.run(0, unstaged);  // the first run is as called
    EXPECT_NE(kiln::testing::message_of([&] {
                  strict.run(0, unstaged);
              }).find("an op on host memory was recorded"),
              std::string::npos);
    m.take_loss();
    unstaged();
    const LossSum once = m.take_loss();
    for (int i = 0; i < 3; i++)
        lenient.run(0, unstaged);
    EXPECT_FALSE(lenient.on());
    EXPECT_EQ(lenient.recorded(), 0);
    const LossSum thrice = m.take_loss();
    EXPECT_EQ(thrice.tokens, 3 * once.tokens);
    EXPECT_DOUBLE_EQ(thrice.sum, 3 * once.sum);
}

}  // namespace
}  // namespace kiln::model
