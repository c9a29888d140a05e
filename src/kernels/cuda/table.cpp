// Fills the CUDA backend's kernel table (see kernels/table.h) from the ops of cuda.h, which run
// in order on one stream; autotuning picks among cuBLASLt's algorithms (gemm.cu).
#include <algorithm>
#include <string>

#include "kernels/cuda/cuda.h"

namespace kiln::kernels::cuda {
namespace {

// The products this backend issues, as a revision: a plan tuned for other products would leave
// these untuned, so a plan cache entry holds for one revision. Raise it with any change to the
// products gemm or attention issue (2: bf16 attention fused, without products).
constexpr int kProductsRevision = 2;

// The GPU, its driver and the libraries: what a measured peak and a tuned plan hold for.
std::string platform() {
    return device_platform() + "; products r" + std::to_string(kProductsRevision);
}

template <Precision P>
size_t workspace_in(int64_t max_operand, const Attention& a) {
    return workspace_bytes(max_operand, a, P);
}

template <Precision P>
void gemm_in(const Gemm& g, Workspace ws) {
    gemm(g, P, ws);
}

template <Precision P>
size_t saved_bytes_in(const Attention& a) {
    return attention_saved_bytes(a, P);
}

template <Precision P>
void attention_forward_in(void* out, void* saved, const void* qkv, DType in_type,
                          const Attention& a, Workspace ws) {
    attention_forward(out, saved, qkv, in_type, a, P, ws);
}

template <Precision P>
void attention_backward_in(void* dqkv, DType dqkv_type, const void* dout, const void* out,
                           const void* qkv, DType in_type, const void* saved, const Attention& a,
                           Workspace ws) {
    attention_backward(dqkv, dqkv_type, dout, out, qkv, in_type, saved, a, P, ws);
}

template <Precision P>
const Kernels table = {
    P == Precision::bf16 ? "cuda-bf16" : "cuda-fp32",
    P,
    op_inputs(P),
    workspace_in<P>,
    gemm_in<P>,
    embedding_forward,
    embedding_backward,
    rmsnorm_forward,
    rmsnorm_backward,
    saved_bytes_in<P>,
    attention_forward_in<P>,
    attention_backward_in<P>,
    swiglu_forward,
    swiglu_backward,
    logit_stats,
    cross_entropy_backward,
    cross_entropy,
    adamw,
    to_bf16,
    &device_memory,
    &pinned_memory,
    copy,
    zero,
    widen,
    add,
    slice_ids,
    rescale_sumexp,
    row_losses,
    sum_into,
    sum_squares,
    wait,
    platform,
    tune,
    tune_next,
    tuned,
    use,
    record,
    replay,
    release,
};

}  // namespace

const Kernels& unprofiled_kernels(Precision precision) {
    return precision == Precision::bf16 ? table<Precision::bf16> : table<Precision::fp32>;
}

}  // namespace kiln::kernels::cuda

namespace kiln::kernels {

const Kernels& cuda_kernels(Precision precision) {
    if (const char* path = cuda::profile_path())
        return cuda::profiled_kernels(precision, path);
    return cuda::unprofiled_kernels(precision);
}

}  // namespace kiln::kernels
