#include "kernels/cuda/sizes.h"

#include <algorithm>

#include "kernels/cpu/cpu.h"
#include "kernels/cuda/attention_flash.h"

namespace kiln::kernels::cuda {

size_t gemm_workspace_bytes(int64_t max_operand) {
    return 2 * round_up(size_t(max_operand) * 4) + kLtWorkspace;
}

size_t AttentionScratch::total() const {
    size_t at = products;
    for (size_t p : parts)
        at += p;
    return at;
}

AttentionScratch attention_scratch(const Attention& a, Precision precision) {
    const int64_t M = a.B * a.T, rows = a.B * a.H * a.T;
    const bool bf16 = precision == Precision::bf16, fused = flash_attention(a, precision);
    const int64_t squares = fused ? 0 : rows * a.T;
    AttentionScratch s;
    // The rotated f32 copy of qkv: in bf16 the rotation goes straight into the bf16 copy.
    s.parts = {bf16 ? 0 : round_up(size_t(M * a.ldqkv) * 4),
               round_up(size_t(M * a.ldqkv) * 4),
               round_up(size_t(squares) * 4),
               bf16 ? round_up(size_t(M * a.ldqkv) * 2) : 0,
               bf16 ? round_up(size_t(M * a.H * a.D) * 2) : 0,
               bf16 ? round_up(size_t(squares) * 2) : 0,
               fused ? round_up(size_t(rows) * 4) : 0};
    s.products = fused ? 0 : gemm_workspace_bytes(std::max(a.T * a.T, a.T * a.ldqkv));
    return s;
}

size_t attention_saved_bytes(const Attention& a, Precision precision) {
    if (flash_attention(a, precision))
        return size_t(a.B * a.H * a.T) * 4;
    return size_t(a.B * a.H * a.T * a.T) * dtype_size(compute_dtype(precision));
}

size_t attention_workspace_bytes(const Attention& a, Precision precision) {
    return attention_scratch(a, precision).total();
}

size_t workspace_bytes(int64_t max_operand, const Attention& a, Precision precision) {
    return std::max(gemm_workspace_bytes(max_operand), attention_workspace_bytes(a, precision));
}

namespace {

template <Precision P>
size_t workspace_in(int64_t max_operand, const Attention& a) {
    return workspace_bytes(max_operand, a, P);
}

template <Precision P>
size_t saved_in(const Attention& a) {
    return attention_saved_bytes(a, P);
}

template <Precision P>
Kernels sizing_table() {
    Kernels k = cpu_kernels(P);
    k.name = P == Precision::bf16 ? "cuda-bf16 sizes" : "cuda-fp32 sizes";
    k.op_inputs = op_inputs(P);
    k.workspace_bytes = workspace_in<P>;
    k.attention_saved_bytes = saved_in<P>;
    return k;
}

}  // namespace
}  // namespace kiln::kernels::cuda

namespace kiln::kernels {

const Kernels& cuda_sizing_kernels(Precision precision) {
    static const Kernels bf16 = cuda::sizing_table<Precision::bf16>();
    static const Kernels fp32 = cuda::sizing_table<Precision::fp32>();
    return precision == Precision::bf16 ? bf16 : fp32;
}

}  // namespace kiln::kernels
