#pragma once
// Causal attention through cuDNN's fused attention (its SDPA graphs), the alternative to
// attention_flash.h's kernels that KILN_CUDA_ATTENTION=cudnn selects for bf16 (see
// cudnn_attention.cpp for the graphs). Host code: it builds cuDNN's operation graphs and runs
// their plans on the backend's stream.
#include <cstdint>
#include <string>

#include "kernels/ops.h"

namespace kiln::kernels::cuda {

// Whether KILN_CUDA_ATTENTION=cudnn asks for cuDNN's attention (read once; "kiln", unset or
// empty keep the own kernels; another value is an error naming the variable).
bool cudnn_attention_requested();

// Why cuDNN 9 cannot be loaded here (it is loaded at first use), or empty where it can.
std::string cudnn_unavailable();

// The shapes cuDNN's graphs are asked for: bf16 products, a head size in steps of 8 up to 128,
// more than one position (cuDNN's backward takes no single one).
inline bool cudnn_attention_shape(const Attention& a) {
    return a.D % 8 == 0 && a.D <= 128 && a.Hkv > 0 && a.H % a.Hkv == 0 && a.T > 1;
}

// Why this machine's cuDNN is not asked for `a` (it cannot be loaded, or its version has a known
// fault there), or empty.
std::string cudnn_attention_refusal(const Attention& a);

// One attention shape's two plans (forward and backward) and the device memory they run in,
// built on first use and kept for the process.
struct CudnnAttention;

// The shape's plans; null where cuDNN is refused (cudnn_attention_refusal) or offers no plan for
// either graph on this GPU, said once per shape with the reason, and the caller runs its own
// kernels instead.
const CudnnAttention* cudnn_attention(const Attention& a);

// Over the bf16 packed qkv (M, ldqkv), its queries and keys rotated: o16 (M, H*D) bf16 and each
// row's log-sum-exp of its scaled scores, stats (B, H, T) f32.
void cudnn_attention_forward(const CudnnAttention& c, const uint16_t* qkv16, uint16_t* o16,
                             float* stats);
// The gradients of the queries, keys and values into dqkv16 (M, ldqkv) bf16, from the forward's
// o16 and stats and the output's gradient dout16 (M, H*D) bf16.
void cudnn_attention_backward(const CudnnAttention& c, const uint16_t* qkv16, const uint16_t* o16,
                              const float* stats, const uint16_t* dout16, uint16_t* dqkv16);

// Builds both graphs' tensors and operations for `a` and finalizes each with cuDNN, which needs
// no GPU: the checks cuDNN makes of every descriptor before it looks for a plan. Returns the
// number of operations (forward, backward); a descriptor cuDNN refuses is an Error naming it.
struct CudnnAttentionOps {
    int forward = 0, backward = 0;
};
CudnnAttentionOps describe_cudnn_attention(const Attention& a);

}  // namespace kiln::kernels::cuda
