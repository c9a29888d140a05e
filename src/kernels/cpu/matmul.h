#pragma once
// Batched matrix products on the CPU through oneDNN (AMX for bf16 on CPUs that have it).
// Internal to the cpu backend: gemm and attention are built on it.
#include <cstdint>

#include "core/dtype.h"
#include "kernels/ops.h"

namespace kiln::kernels::cpu {

// A logical 4-D operand (batch0, batch1, rows, cols) with element strides; 2-D products use
// batch dims of 1.
struct MatOperand {
    const void* ptr = nullptr;
    DType type = DType::f32;
    int64_t dims[4] = {1, 1, 0, 0};
    int64_t strides[4] = {0, 0, 0, 1};
};

// c (b0, b1, M, N) = alpha * a (b0, b1, M, K) · b (b0|1, b1|1, K, N) (+ c when accumulate).
// c is f32 with the given strides. A batch dim of 1 in b broadcasts. Primitives are cached by
// shape, strides and types. Aborts on a descriptor oneDNN rejects (a programmer error).
void matmul(const MatOperand& a, const MatOperand& b, float* c, const int64_t c_strides[4],
            float alpha, bool accumulate);

// Autotuning (the Kernels table entries of the same names). A product's candidates are
// oneDNN's implementations of its descriptor (the reference one aside) times two thread
// splits: all of the pool's threads, or one. Those that agree with the default on the first
// pass's operands and are not plainly slower are then timed in place, one per pass, twice each;
// one other than the default is chosen only when it is 3% faster.
// A choice reads "<implementation> threads=<n>".
std::string platform();
void tune(int part, int parts);
bool tune_next();
Plan tuned();
void use(const Plan& plan);

}  // namespace kiln::kernels::cpu
