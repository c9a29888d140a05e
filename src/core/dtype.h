#pragma once
// Element types of tensors and the bf16 <-> fp32 conversions (round to nearest even).
// The scalar conversions are written so that GCC vectorizes loops over them.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace kiln {

enum class DType : uint8_t { f32, bf16, i32, u16, u32 };

constexpr size_t dtype_size(DType t) {
    switch (t) {
        case DType::f32:
        case DType::i32:
        case DType::u32:
            return 4;
        case DType::bf16:
        case DType::u16:
            return 2;
    }
    return 0;
}

std::string_view dtype_name(DType t);  // "f32", "bf16", ...

// Round-to-nearest-even; NaN stays a (quiet) NaN, infinities stay infinite.
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    // A select, not a branch, so loops over this vectorize.
    return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// dst[i] = bf16(src[i]) for i < n; threaded.
void convert_f32_to_bf16(uint16_t* dst, const float* src, int64_t n);
// dst[i] = f32(src[i]) for i < n; threaded.
void convert_bf16_to_f32(float* dst, const uint16_t* src, int64_t n);

}  // namespace kiln
