#pragma once
// The CPU backend: matrix products through oneDNN (bf16 on AMX where the CPU has it), the other
// ops as vectorized, OpenMP-threaded loops.
#include <string>

#include "kernels/table.h"

namespace kiln::kernels {

const Kernels& cpu_kernels(Precision precision);

namespace cpu {
// What this CPU offers the backend's products, probed once per process.
struct CpuInfo {
    std::string model;     // /proc/cpuinfo's model name, e.g. "AMD EPYC 7B13"
    std::string features;  // the best of its flags for products: AMX-BF16, AVX512-BF16, ...
    std::string isa;       // what oneDNN dispatches to (ONEDNN_MAX_CPU_ISA caps it), e.g. "avx2"
    bool bf16_products = false;  // oneDNN builds bf16 products (natively or emulated)
    bool bf16_native = false;    // ... with bf16 instructions (avx512_core_bf16, AMX)
};
const CpuInfo& cpu_info();

// Packs a (rows, cols) f32 matrix with row stride ld into dense bf16.
void pack_bf16(uint16_t* dst, const float* src, int64_t rows, int64_t cols, int64_t ld);
}  // namespace cpu

}  // namespace kiln::kernels
