#pragma once
// Picks a kernel table by backend name: "cpu" (fast), "reference" (the double-precision
// oracle), "cuda" when built with CUDA.
#include <string>

#include "kernels/table.h"

namespace kiln::kernels {

const Kernels& select_kernels(const std::string& backend, Precision precision);  // throws Error
bool cuda_available();  // built with CUDA and a device is present
int cuda_devices();     // how many (0 without CUDA)

}  // namespace kiln::kernels
