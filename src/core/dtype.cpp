#include "core/dtype.h"

#include "core/threads.h"

namespace kiln {

std::string_view dtype_name(DType t) {
    switch (t) {
        case DType::f32:
            return "f32";
        case DType::bf16:
            return "bf16";
        case DType::i32:
            return "i32";
        case DType::u16:
            return "u16";
        case DType::u32:
            return "u32";
    }
    return "?";
}

void convert_f32_to_bf16(uint16_t* dst, const float* src, int64_t n) {
    parallel_range(n, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            dst[i] = f32_to_bf16(src[i]);
        }
    });
}

void convert_bf16_to_f32(float* dst, const uint16_t* src, int64_t n) {
    parallel_range(n, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; i++) {
            dst[i] = bf16_to_f32(src[i]);
        }
    });
}

}  // namespace kiln
