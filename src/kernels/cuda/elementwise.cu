// The CUDA backend's elementwise ops: grid-stride loops over kernel_math.h's per-element
// functions (embedding, SwiGLU, rotary embedding, AdamW, bf16 rounding, and the small ops around
// the products).
#include <type_traits>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/launch.h"

namespace kiln::kernels::cuda {
namespace {

template <typename W>
__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const W* wte, int64_t C,
                                         int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        embedding_forward_at(out, tokens, wte, C, i);
}

__global__ void embedding_backward_kernel(float* dwte, const float* dout, const int32_t* tokens,
                                          int64_t M, int64_t C) {
    for (int64_t i = first_index(); i < C * kEmbeddingGroups; i += stride())
        embedding_backward_column(dwte, dout, tokens, M, C, i % C, int(i / C), kEmbeddingGroups);
}

template <typename Out, typename In>
__global__ void swiglu_forward_kernel(Out* h, const In* gu, int64_t F, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        swiglu_forward_at(h, gu, F, i);
}

template <typename Out, typename In>
__global__ void swiglu_backward_kernel(Out* dgu, const In* dh, const In* gu, int64_t F, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        swiglu_backward_at(dgu, dh, gu, F, i);
}

__global__ void rope_kernel(float* x, int64_t ld, int64_t T, int64_t n_heads, int64_t D,
                            const float* cos_table, const float* sin_table, float sign, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        rope_at(x, ld, T, n_heads, D, cos_table, sin_table, sign, i);
}

__global__ void adamw_kernel(float* p, uint16_t* p_bf16, float* m, float* v, const float* g,
                             int64_t n, AdamWScalars k) {
    for (int64_t i = first_index(); i < n; i += stride())
        adamw_at(p, p_bf16, m, v, g, k, i);
}

__global__ void to_bf16_kernel(uint16_t* dst, const float* src, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        dst[i] = bf16_round(src[i]);
}

__global__ void widen_kernel(float* dst, const uint16_t* src, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        dst[i] = bf16_widen(src[i]);
}

__global__ void add_kernel(float* y, const float* a, const float* b, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        y[i] = a[i] + b[i];
}

__global__ void slice_ids_kernel(int32_t* local, float* weight, const int32_t* ids, int64_t begin,
                                 int64_t count, float value, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        slice_id_at(local, weight, ids, begin, count, value, i);
}

__global__ void rescale_sumexp_kernel(float* sumexp, const float* local_max, const float* max,
                                      int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        rescale_sumexp_at(sumexp, local_max, max, i);
}

__global__ void row_losses_kernel(float* losses, const float* max, const float* sumexp,
                                  const float* target_logit, const int32_t* targets, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        row_loss_at(losses, max, sumexp, target_logit, targets, i);
}

}  // namespace

void widen(float* dst, const uint16_t* src, int64_t n) {
    if (n == 0)
        return;
    widen_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(dst, src, n);
    finish_launch();
}

void add(float* y, const float* a, const float* b, int64_t n) {
    if (n == 0)
        return;
    add_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(y, a, b, n);
    finish_launch();
}

void slice_ids(int32_t* local, float* weight, const int32_t* ids, int64_t n, int64_t begin,
               int64_t count, float value) {
    if (n == 0)
        return;
    slice_ids_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(local, weight, ids, begin,
                                                                          count, value, n);
    finish_launch();
}

void rescale_sumexp(float* sumexp, const float* local_max, const float* max, int64_t M) {
    if (M == 0)
        return;
    rescale_sumexp_kernel<<<element_blocks(M), kElementThreads, 0, stream()>>>(sumexp, local_max,
                                                                               max, M);
    finish_launch();
}

void row_losses(float* losses, const float* max, const float* sumexp, const float* target_logit,
                const int32_t* targets, int64_t M) {
    if (M == 0)
        return;
    row_losses_kernel<<<element_blocks(M), kElementThreads, 0, stream()>>>(
        losses, max, sumexp, target_logit, targets, M);
    finish_launch();
}

void embedding_forward(float* out, const int32_t* tokens, const void* wte, DType wte_type,
                       int64_t M, int64_t C) {
    const int64_t n = M * C;
    if (wte_type == DType::bf16) {
        embedding_forward_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
            out, tokens, static_cast<const uint16_t*>(wte), C, n);
    } else {
        embedding_forward_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
            out, tokens, static_cast<const float*>(wte), C, n);
    }
    finish_launch();
}

void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t M,
                        int64_t C) {
    embedding_backward_kernel<<<element_blocks(C * kEmbeddingGroups), kElementThreads, 0,
                                stream()>>>(dwte, dout, tokens, M, C);
    finish_launch();
}

void swiglu_forward(void* h, DType h_type, const void* gu, DType in_type, int64_t M, int64_t F) {
    const int64_t n = M * F;
    typed(h, h_type, [&](auto* out) {
        typed(gu, in_type, [&](auto* in) {
            swiglu_forward_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(out, in, F,
                                                                                       n);
        });
    });
    finish_launch();
}

void swiglu_backward(void* dgu, DType dgu_type, const void* dh, const void* gu, DType in_type,
                     int64_t M, int64_t F) {
    const int64_t n = M * F;
    typed(dgu, dgu_type, [&](auto* out) {
        typed(gu, in_type, [&](auto* in) {
            using In = std::remove_pointer_t<decltype(in)>;
            swiglu_backward_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
                out, static_cast<const In*>(dh), static_cast<const In*>(in), F, n);
        });
    });
    finish_launch();
}

void rope(float* x, int64_t ld, int64_t M, int64_t T, int64_t n_heads, int64_t D,
          const float* rope_cos, const float* rope_sin, bool inverse) {
    const int64_t n = M * n_heads * (D / 2);
    rope_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(
        x, ld, T, n_heads, D, rope_cos, rope_sin, inverse ? -1.0f : 1.0f, n);
    finish_launch();
}

void adamw(float* p, uint16_t* p_bf16, float* m, float* v, const float* g, int64_t n,
           const AdamWStep& s) {
    adamw_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(p, p_bf16, m, v, g, n,
                                                                      adamw_scalars(s));
    finish_launch();
}

void to_bf16(uint16_t* dst, const float* src, int64_t n) {
    to_bf16_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(dst, src, n);
    finish_launch();
}

}  // namespace kiln::kernels::cuda
