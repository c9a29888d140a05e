#pragma once
// bf16 products exist only where oneDNN dispatches avx512_core or better (natively with
// avx512_bf16 or AMX): a test of them skips elsewhere and says why; its fp32 twin runs anywhere.
#include <gtest/gtest.h>

#include <ostream>

#include "kernels/cpu/cpu.h"

namespace kiln::kernels {
// How gtest names a Precision parameter.
inline void PrintTo(Precision p, std::ostream* os) {
    *os << (p == Precision::bf16 ? "bf16" : "fp32");
}
}  // namespace kiln::kernels

namespace kiln::testing {

inline std::string precision_param_name(const ::testing::TestParamInfo<kernels::Precision>& info) {
    return info.param == kernels::Precision::bf16 ? "bf16" : "fp32";
}

}  // namespace kiln::testing

// Skips the calling test when `prec` is bf16 and this CPU has no bf16 products.
#define KILN_REQUIRE_PRODUCTS(prec)                                                \
    if ((prec) == ::kiln::kernels::Precision::bf16 &&                              \
        !::kiln::kernels::cpu::cpu_info().bf16_products)                           \
    GTEST_SKIP() << "this CPU (" << ::kiln::kernels::cpu::cpu_info().model         \
                 << ", oneDNN dispatches " << ::kiln::kernels::cpu::cpu_info().isa \
                 << ") has no bf16 matrix products"
