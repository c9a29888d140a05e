#pragma once
// The CPU backend: matrix products through oneDNN (bf16 on AMX where the CPU has it), the other
// ops as vectorized, OpenMP-threaded loops.
#include "kernels/table.h"

namespace kiln::kernels {

const Kernels& cpu_kernels(Precision precision);

namespace cpu {
// Packs a (rows, cols) f32 matrix with row stride ld into dense bf16.
void pack_bf16(uint16_t* dst, const float* src, int64_t rows, int64_t cols, int64_t ld);
}  // namespace cpu

}  // namespace kiln::kernels
