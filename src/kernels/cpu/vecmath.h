#pragma once
// Scalar math written so GCC vectorizes the loops that call it (no libm calls in hot loops),
// and the stores of outputs that are f32 or bf16.
#include <cstdint>
#include <cstring>

#include "core/dtype.h"

namespace kiln::kernels::cpu {

// exp(x) for x <= 88; relative error ~2e-7. Range reduction x = n ln2 + r, |r| <= ln2/2,
// then a degree-6 polynomial for e^r and 2^n built in the exponent bits.
inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    // Round to nearest by adding and subtracting 1.5 * 2^23 (vectorizes, unlike roundf).
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

inline float sigmoid(float x) {
    return 1.0f / (1.0f + fast_exp(-x));
}

// An output element in f32, or rounded to bf16 where only products read it (saving the f32
// write and a separate conversion pass).
inline void put(float* p, float x) {
    *p = x;
}
inline void put(uint16_t* p, float x) {
    *p = f32_to_bf16(x);
}
// An input element, f32 or bf16 widened.
inline float get(const float* p) {
    return *p;
}
inline float get(const uint16_t* p) {
    return bf16_to_f32(*p);
}

// Calls fn(typed out) with `out` as float* or uint16_t*, so each loop is compiled for both.
template <typename Fn>
void with_type(void* out, DType type, Fn&& fn) {
    if (type == DType::bf16) {
        fn(static_cast<uint16_t*>(out));
    } else {
        fn(static_cast<float*>(out));
    }
}

}  // namespace kiln::kernels::cpu
