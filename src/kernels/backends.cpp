#include "kernels/backends.h"

#include "core/error.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cuda/sizes.h"
#include "kernels/reference/reference.h"

#ifdef KILN_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

namespace kiln::kernels {

int cuda_devices() {
#ifdef KILN_HAVE_CUDA
    return cuda::device_count();
#else
    return 0;
#endif
}

bool cuda_available() {
    return cuda_devices() > 0;
}

std::string no_cuda_reason() {
#ifdef KILN_HAVE_CUDA
    return cuda::no_device_reason();
#else
    return "this kiln was built without CUDA (no nvcc at build time)";
#endif
}

namespace {
// Why `key`=cuda cannot run here, when it cannot.
void require_cuda(const std::string& key = "train.backend") {
#ifndef KILN_HAVE_CUDA
    throw error("{}=cuda: this kiln was built without CUDA (no nvcc at build time); use cpu", key);
#endif
    if (!cuda_available())
        throw error("{}=cuda: no CUDA device is visible to this process ({}); use cpu", key,
                    no_cuda_reason());
}
}  // namespace

void use_cuda_device(int local_rank) {
    require_cuda();
    const int n = cuda_devices();
    if (local_rank >= n) {
        throw error(
            "train.backend=cuda: this rank is rank {} on its host (LOCAL_RANK), but {} GPU(s) "
            "are visible to it; start at most {} ranks per host",
            local_rank, n, n);
    }
#ifdef KILN_HAVE_CUDA
    cuda::set_device(local_rank);
#endif
}

const Kernels& select_kernels(const std::string& backend, Precision precision,
                              const std::string& key) {
    if (backend == "cpu")
        return cpu_kernels(precision);
    if (backend == "reference")
        return reference_kernels(precision);
    if (backend == "cuda") {
        require_cuda(key);
#ifdef KILN_HAVE_CUDA
        return cuda_kernels(precision);
#endif
    }
    throw error("{}={} is not one of cpu, reference, cuda", key, backend);
}

const Kernels& sizing_kernels(const std::string& backend, Precision precision) {
    if (backend != "cuda")
        return select_kernels(backend, precision);
    return cuda_sizing_kernels(precision);  // the same sizes with or without a CUDA build
}

int64_t cuda_device_memory(int device) {
#ifdef KILN_HAVE_CUDA
    if (device < cuda_devices())
        return cuda::device_memory_bytes(device);
#endif
    (void)device;
    return 0;
}

const char* precision_name(Precision p) {
    return p == Precision::bf16 ? "bf16" : "fp32";
}

PrecisionChoice resolve_precision(const std::string& backend, const std::string& requested,
                                  const std::string& key) {
    if (requested != "auto" && requested != "bf16" && requested != "fp32")
        throw error("{}={} is not one of auto, bf16, fp32", key, requested);
    if (backend == "cuda") {
        // Every GPU kiln targets multiplies bf16 on its tensor cores.
        Precision p = requested == "fp32" ? Precision::fp32 : Precision::bf16;
        return {
            p, fmt::format("{} products (train.precision={}, CUDA)", precision_name(p), requested)};
    }
    // The reference backend emulates bf16 in software, so it can honour either; under auto it
    // follows the CPU backend's choice, which it is the oracle of.
    const cpu::CpuInfo& c = cpu::cpu_info();
    const std::string machine =
        fmt::format("{} with {}, oneDNN dispatches {}", c.model, c.features, c.isa);
    if (requested == "fp32")
        return {Precision::fp32, fmt::format("fp32 products (train.precision=fp32; {})", machine)};
    if (requested == "bf16") {
        if (backend != "reference" && !c.bf16_products) {
            throw error(
                "{}=bf16: this CPU ({}) has no bf16 matrix products (oneDNN dispatches {}; bf16 "
                "needs avx512_core, natively avx512_bf16 or AMX); use {}=auto or fp32",
                key, c.model, c.isa, key);
        }
        return {Precision::bf16,
                fmt::format(
                    "bf16 products (train.precision=bf16; {}{})", machine,
                    c.bf16_native || backend == "reference" ? "" : "; emulated, slower than fp32")};
    }
    if (c.bf16_native)
        return {Precision::bf16, fmt::format("bf16 products (auto: native bf16 on {})", machine)};
    return {Precision::fp32,
            fmt::format("fp32 products (auto: no native bf16 on {}; it needs avx512_bf16 or AMX)",
                        machine)};
}

}  // namespace kiln::kernels
