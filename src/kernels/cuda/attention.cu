// Causal attention on CUDA, the simple rung (attention_math.h): one block per query row for the
// softmax and its backward, elementwise kernels for the products with v, k and q. Queries and
// keys are rotated in a copy in the workspace, and their gradients rotated back there.
#include "kernels/cuda/attention_math.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/launch.h"

namespace kiln::kernels::cuda {
namespace {

size_t round_up(size_t n) {
    return (n + 255) / 256 * 256;
}

// Workspace: the rotated qkv (M, ldqkv), the f32 gradient (M, ldqkv), ds (B, H, T, T).
struct Scratch {
    float* rotated;
    float* grad;
    float* ds;
    Scratch(Workspace ws, const Attention& a) {
        const size_t qkv = round_up(size_t(a.B * a.T * a.ldqkv) * 4);
        char* base = static_cast<char*>(ws.ptr);
        KILN_CHECK(ws.bytes >= attention_workspace_bytes(a), "attention workspace of {} bytes",
                   ws.bytes);
        rotated = reinterpret_cast<float*>(base);
        grad = reinterpret_cast<float*>(base + qkv);
        ds = reinterpret_cast<float*>(base + 2 * qkv);
    }
};

// The softmax row's scores live in shared memory: T floats, beside the block reduction's slots;
// past 48 KiB in all a kernel must ask for more (up to 227 KiB on Hopper: T up to ~58K).
template <typename Kernel>
size_t row_shared_bytes(Kernel kernel, const Attention& a) {
    const size_t bytes = size_t(a.T) * 4;
    KILN_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(bytes)));
    return bytes;
}

// qkv with queries and keys rotated (a copy in the workspace) when `a` has rope tables.
const float* rotated(const float* qkv, const Attention& a, float* copy) {
    if (!a.rope_cos)
        return qkv;
    const int64_t M = a.B * a.T;
    KILN_CUDA(
        cudaMemcpyAsync(copy, qkv, size_t(M * a.ldqkv) * 4, cudaMemcpyDeviceToDevice, stream()));
    rope(copy, a.ldqkv, M, a.T, a.H + a.Hkv, a.D, a.rope_cos, a.rope_sin, false);
    return copy;
}

template <typename P>
__global__ void probs_kernel(P* probs, const float* qkv, Attention a) {
    extern __shared__ float s[];
    const QueryRow r(a, blockIdx.x);
    const float mx =
        block_reduce(attention_scores(s, qkv, a, r, threadIdx.x, blockDim.x), -INFINITY, Max{});
    const float sum = block_reduce(attention_exp(s, r.t, mx, threadIdx.x, blockDim.x), 0.0f, Sum{});
    attention_store_probs(probs + int64_t(blockIdx.x) * a.T, s, a.T, r.t, sum, threadIdx.x,
                          blockDim.x);
}

template <typename P>
__global__ void output_kernel(float* out, const P* probs, const float* qkv, Attention a,
                              int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        attention_output_at(out, probs, qkv, a, i);
}

template <typename P>
__global__ void ds_kernel(float* ds, const P* probs, const float* dout, const float* qkv,
                          Attention a) {
    extern __shared__ float s[];
    const QueryRow r(a, blockIdx.x);
    const P* row = probs + int64_t(blockIdx.x) * a.T;
    const float rowdot =
        block_reduce(attention_dp(s, row, dout, qkv, a, r, threadIdx.x, blockDim.x), 0.0f, Sum{});
    attention_ds(ds + int64_t(blockIdx.x) * a.T, s, row, r.t, rowdot, attention_scale(a),
                 threadIdx.x, blockDim.x);
}

__global__ void dq_kernel(float* grad, const float* ds, const float* qkv, Attention a, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        attention_dq_at(grad, ds, qkv, a, i);
}

template <typename P>
__global__ void dkv_kernel(float* grad, const float* ds, const P* probs, const float* dout,
                           const float* qkv, Attention a, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        attention_dkv_at(grad, ds, probs, dout, qkv, a, i);
}

template <typename Out>
__global__ void convert_kernel(Out* dst, const float* src, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        store(dst + i, src[i]);
}

template <typename P>
void forward(float* out, P* probs, const float* qkv, const Attention& a) {
    const unsigned rows = static_cast<unsigned>(a.B * a.H * a.T);
    probs_kernel<P>
        <<<rows, kRowThreads, row_shared_bytes(probs_kernel<P>, a), stream()>>>(probs, qkv, a);
    KILN_CUDA(cudaGetLastError());
    const int64_t n = a.B * a.T * a.H * a.D;
    output_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(out, probs, qkv, a, n);
    finish_launch();
}

template <typename P>
void backward(float* grad, float* ds, const float* dout, const float* qkv, const P* probs,
              const Attention& a) {
    const unsigned rows = static_cast<unsigned>(a.B * a.H * a.T);
    ds_kernel<P><<<rows, kRowThreads, row_shared_bytes(ds_kernel<P>, a), stream()>>>(ds, probs,
                                                                                     dout, qkv, a);
    KILN_CUDA(cudaGetLastError());
    const int64_t nq = a.B * a.T * a.H * a.D, nkv = a.B * a.T * a.Hkv * a.D;
    dq_kernel<<<element_blocks(nq), kElementThreads, 0, stream()>>>(grad, ds, qkv, a, nq);
    dkv_kernel<<<element_blocks(nkv), kElementThreads, 0, stream()>>>(grad, ds, probs, dout, qkv, a,
                                                                      nkv);
    finish_launch();
}

}  // namespace

size_t attention_saved_bytes(const Attention& a, Precision precision) {
    return size_t(a.B * a.H * a.T * a.T) * dtype_size(compute_dtype(precision));
}

size_t attention_workspace_bytes(const Attention& a) {
    return 2 * round_up(size_t(a.B * a.T * a.ldqkv) * 4) + size_t(a.B * a.H * a.T * a.T) * 4;
}

void attention_forward(float* out, void* saved, const float* qkv, const Attention& a,
                       Precision precision, Workspace ws) {
    if (a.B * a.T == 0)
        return;
    const Scratch scratch(ws, a);
    const float* x = rotated(qkv, a, scratch.rotated);
    if (precision == Precision::bf16) {
        forward(out, static_cast<uint16_t*>(saved), x, a);
    } else {
        forward(out, static_cast<float*>(saved), x, a);
    }
}

void attention_backward(void* dqkv, DType dqkv_type, const float* dout, const float* qkv,
                        const void* saved, const Attention& a, Precision precision, Workspace ws) {
    if (a.B * a.T == 0)
        return;
    const Scratch scratch(ws, a);
    const float* x = rotated(qkv, a, scratch.rotated);
    // An f32 gradient is written in place; a bf16 one goes through the f32 scratch.
    float* grad = dqkv_type == DType::f32 ? static_cast<float*>(dqkv) : scratch.grad;
    if (precision == Precision::bf16) {
        backward(grad, scratch.ds, dout, x, static_cast<const uint16_t*>(saved), a);
    } else {
        backward(grad, scratch.ds, dout, x, static_cast<const float*>(saved), a);
    }
    const int64_t M = a.B * a.T;
    if (a.rope_cos)  // back through the rotation: its inverse, on the gradient
        rope(grad, a.ldqkv, M, a.T, a.H + a.Hkv, a.D, a.rope_cos, a.rope_sin, true);
    if (dqkv_type == DType::bf16) {
        const int64_t n = M * a.ldqkv;
        convert_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
            static_cast<uint16_t*>(dqkv), grad, n);
        finish_launch();
    }
}

}  // namespace kiln::kernels::cuda
