#pragma once
// Picks a kernel table by backend name: "cpu" (fast), "reference" (the double-precision
// oracle), "cuda" when built with CUDA and a device is visible.
#include <string>

#include "kernels/table.h"

namespace kiln::kernels {

// Throws Error naming `key` (where `backend` came from) when it cannot run here.
const Kernels& select_kernels(const std::string& backend, Precision precision,
                              const std::string& key = "train.backend");
// A table whose sizes (workspace, saved attention) are `backend`'s, for plans made where its
// device may be absent: for cuda, kernels/cuda/sizes.h's, the same with or without a CUDA build.
const Kernels& sizing_kernels(const std::string& backend, Precision precision);

// The precision of a backend's products on this machine, and why.
struct PrecisionChoice {
    Precision precision = Precision::fp32;
    std::string why;  // one line naming the choice and the hardware fact that decided it
};
// `requested` is train.precision: "auto" (bf16 where the backend has native bf16 products,
// else fp32), "bf16" or "fp32". bf16 asked of a CPU without bf16 products throws an Error
// naming `key` (where the value came from) and the missing feature. The CPU is probed once per
// process.
PrecisionChoice resolve_precision(const std::string& backend, const std::string& requested,
                                  const std::string& key = "train.precision");
const char* precision_name(Precision p);  // "fp32" | "bf16"
bool cuda_available();                    // built with CUDA and a device is present
int cuda_devices();                       // how many (0 without CUDA)
std::string no_cuda_reason();             // why there are none, when there are none
// Makes GPU `local_rank` (this host's rank, LOCAL_RANK) the current device of this process, for
// the CUDA table's memory and streams and for NCCL. Throws Error when there is no such GPU.
void use_cuda_device(int local_rank);
int64_t cuda_device_memory(int device);  // bytes of GPU `device`; 0 without it

}  // namespace kiln::kernels
