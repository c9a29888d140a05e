#pragma once
// The test oracle: every op as plain loops accumulating in double. Slow and obviously right.
#include "kernels/table.h"

namespace kiln::kernels {

// Precision::bf16 rounds f32 gemm operands to bf16 first, as the fast backends do.
const Kernels& reference_kernels(Precision precision);

}  // namespace kiln::kernels
