#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/dtype.h"

namespace kiln {
namespace {

TEST(Bf16, RoundsToNearestEven) {
    EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
    // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties go to even (1.0).
    EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);
    // 1 + 3*2^-8 is halfway between 1.0078125 (odd) and 1.015625 (even): rounds up.
    EXPECT_EQ(f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
    // Just above halfway rounds up.
    EXPECT_EQ(f32_to_bf16(1.0f + 1.0f / 256 + 1.0f / 65536), 0x3f81);
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(-2.5f)), -2.5f);
}

TEST(Bf16, SpecialValues) {
    float inf = std::numeric_limits<float>::infinity();
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(inf)), inf);
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(-inf)), -inf);
    EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
    // The largest float rounds to infinity, as RNE demands.
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::max())), inf);
}

TEST(Bf16, BulkConversionMatchesScalar) {
    std::vector<float> x(100000);
    for (size_t i = 0; i < x.size(); i++)
        x[i] = std::sin(float(i)) * 1000.0f;
    std::vector<uint16_t> h(x.size());
    convert_f32_to_bf16(h.data(), x.data(), int64_t(x.size()));
    std::vector<float> back(x.size());
    convert_bf16_to_f32(back.data(), h.data(), int64_t(x.size()));
    for (size_t i = 0; i < x.size(); i++) {
        ASSERT_EQ(h[i], f32_to_bf16(x[i]));
        ASSERT_LE(std::fabs(back[i] - x[i]), std::fabs(x[i]) / 256);
    }
}

}  // namespace
}  // namespace kiln
