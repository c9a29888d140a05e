#pragma once
// Random tensors and whole-tensor comparisons, shared by the kernel tests (host and device).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

namespace kiln::testing {

inline std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.0f) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v)
        x = d(rng);
    return v;
}

// ||got - ref|| / ||ref|| over the whole tensor: every entry counts, the small ones too.
inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
    EXPECT_EQ(got.size(), ref.size());
    double err = 0, norm = 0;
    for (size_t i = 0; i < got.size() && i < ref.size(); i++) {
        err += (double(got[i]) - ref[i]) * (double(got[i]) - ref[i]);
        norm += double(ref[i]) * ref[i];
    }
    return norm > 0 ? std::sqrt(err / norm) : std::sqrt(err);
}

// Two bf16 tensors rounded from nearly equal f32 values: at most one unit in the last place
// apart (they differ only where the f32 values straddle a rounding boundary).
inline void expect_bf16_within_one_ulp(const std::vector<uint16_t>& got,
                                       const std::vector<uint16_t>& ref, const char* what) {
    ASSERT_EQ(got.size(), ref.size());
    int bad = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (std::abs(int(got[i]) - int(ref[i])) > 1 && bad++ < 5)
            ADD_FAILURE() << what << "[" << i << "]: " << got[i] << " vs " << ref[i];
    }
    EXPECT_EQ(bad, 0) << what;
}

}  // namespace kiln::testing
