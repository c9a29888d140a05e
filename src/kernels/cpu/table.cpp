// Fills the CPU backend's kernel table (see kernels/table.h).
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/matmul.h"
#include "kernels/host.h"

namespace kiln::kernels::cpu {

template <Precision P>
void gemm(const Gemm& g, Workspace ws);
template <Precision P>
size_t attention_workspace(const Attention& a);
template <Precision P>
size_t attention_saved_bytes(const Attention& a);
template <Precision P>
void attention_forward(void*, void*, const void*, DType, const Attention&, Workspace);
template <Precision P>
void attention_backward(void*, DType, const void*, const void*, const void*, DType, const void*,
                        const Attention&, Workspace);
void embedding_forward(float*, const int32_t*, const void*, DType, int64_t, int64_t);
void embedding_backward(float*, const float*, const int32_t*, int64_t, int64_t);
void rmsnorm_forward(void*, DType, float*, const float*, const float*, int64_t, int64_t, float);
void rmsnorm_backward(float*, uint16_t*, float*, const float*, const float*, const float*,
                      const float*, int64_t, int64_t);
void swiglu_forward(void*, DType, const void*, DType, int64_t, int64_t);
void swiglu_backward(void*, DType, const void*, const void*, DType, int64_t, int64_t);
void logit_stats(const float*, const int32_t*, int64_t, int64_t, float*, float*, float*);
void cross_entropy_backward(const float*, const int32_t*, const float*, const float*, const float*,
                            int64_t, int64_t, void*, DType);
void cross_entropy(const float*, const int32_t*, const float*, int64_t, int64_t, float*, void*,
                   DType);
void adamw(float*, uint16_t*, float*, float*, const float*, int64_t, const AdamWStep&);
void to_bf16(uint16_t*, const float*, int64_t);

namespace {

// gemm rounds at most two f32 operands to bf16; attention packs its own operands.
template <Precision P>
size_t workspace_bytes(int64_t max_operand, const Attention& a) {
    size_t gemm_bytes = P == Precision::bf16 ? 2 * (size_t(max_operand) * 2 + 64) : 0;
    return std::max(gemm_bytes, attention_workspace<P>(a));
}

template <Precision P>
const Kernels table = {
    P == Precision::bf16 ? "cpu-bf16" : "cpu-fp32",
    P,
    DType::f32,
    workspace_bytes<P>,
    gemm<P>,
    embedding_forward,
    embedding_backward,
    rmsnorm_forward,
    rmsnorm_backward,
    attention_saved_bytes<P>,
    attention_forward<P>,
    attention_backward<P>,
    swiglu_forward,
    swiglu_backward,
    logit_stats,
    cross_entropy_backward,
    cross_entropy,
    adamw,
    to_bf16,
    &host_memory,
    &host_memory,
    host::copy,
    host::zero,
    host::widen,
    host::add,
    host::slice_ids,
    host::rescale_sumexp,
    host::row_losses,
    host::sum_into,
    static_cast<double (*)(const float*, const std::vector<Range>&)>(host::sum_squares),
    host::wait,
    platform,
    tune,
    tune_next,
    tuned,
    use,
    nullptr,  // nothing to record: the ops run as they are called
    nullptr,
    nullptr,
};

}  // namespace
}  // namespace kiln::kernels::cpu

namespace kiln::kernels {

const Kernels& cpu_kernels(Precision precision) {
    return precision == Precision::bf16 ? cpu::table<Precision::bf16> : cpu::table<Precision::fp32>;
}

}  // namespace kiln::kernels
