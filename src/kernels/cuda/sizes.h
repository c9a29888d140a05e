#pragma once
// The CUDA backend's memory sizes, plain C++ and built with or without CUDA, so that `kiln
// compile` and `kiln plan` size a GPU run the same on every build: the products' workspace, and
// attention's workspace and saved activation in each rung (attention_flash.h says which runs).
// The .cu files lay their buffers out by these same sizes.
#include <array>
#include <cstddef>
#include <cstdint>

#include "kernels/table.h"

namespace kiln::kernels {
// A table with the CUDA backend's sizes and the CPU's ops, for planning memory where no GPU
// (or no CUDA build) is at hand: only its precision and size entries are for calling.
const Kernels& cuda_sizing_kernels(Precision precision);
}  // namespace kiln::kernels

namespace kiln::kernels::cuda {

constexpr size_t kLtWorkspace = size_t(32) << 20;  // cuBLASLt's scratch per call (Hopper)
constexpr size_t kAlign = 256;                     // of every region the backend carves

inline size_t round_up(size_t n) {
    return (n + kAlign - 1) / kAlign * kAlign;
}

// The dtype of the ops' inputs that products write (Kernels::op_inputs): the compute dtype, so
// that in bf16 the qkv, attention-gradient, gate/up and h-gradient products write bf16.
constexpr DType op_inputs(Precision precision) {
    return compute_dtype(precision);
}

// Room to convert both operands of a product, and cuBLASLt's own.
size_t gemm_workspace_bytes(int64_t max_operand);

// Attention's workspace, in order: in f32 the rotated qkv, and the f32 gradient (M, ldqkv)
// (unfused in bf16, also the forward's f32 output before its rounding);
// unfused, the scores (B, H, T, T) f32; in bf16, bf16 copies of qkv and dout and, unfused, of ds;
// fused, the rows' rowdot (B, H, T) f32; then, unfused, the products' workspace.
struct AttentionScratch {
    static constexpr int kParts = 7;
    std::array<size_t, kParts> parts;
    size_t products;
    size_t total() const;
};
AttentionScratch attention_scratch(const Attention& a, Precision precision);

// What the forward keeps for the backward beside its output: fused, the rows' log-sum-exp
// (B, H, T) f32; else the probabilities (B, H, T, T) in the compute dtype.
size_t attention_saved_bytes(const Attention& a, Precision precision);
size_t attention_workspace_bytes(const Attention& a, Precision precision);

// The model's one workspace, shared by the products and attention.
size_t workspace_bytes(int64_t max_operand, const Attention& a, Precision precision);

}  // namespace kiln::kernels::cuda
