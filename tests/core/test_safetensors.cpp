#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "core/error.h"
#include "core/safetensors.h"
#include "fixture.h"

namespace kiln {
namespace {

TEST(Safetensors, RoundTrip) {
    kiln::testing::TempDir dir;
    std::vector<float> a = {1, 2, 3, 4, 5, 6};
    std::vector<uint16_t> b = {f32_to_bf16(1.5f), f32_to_bf16(-2.0f)};
    SafetensorsWriter w;
    w.add("a", DType::f32, {2, 3}, a.data());
    w.add("b", DType::bf16, {2}, b.data());
    w.set_metadata("format", "pt");
    w.write(dir / "x.safetensors");
    SafetensorsFile f(dir / "x.safetensors");
    ASSERT_EQ(f.tensors().size(), 2u);
    const float* got = static_cast<const float*>(f.data("a", DType::f32, {2, 3}));
    EXPECT_EQ(std::vector<float>(got, got + 6), a);
    EXPECT_EQ(*f.metadata("format"), "pt");
    EXPECT_THROW(f.data("a", DType::f32, {3, 2}), Error);
    EXPECT_THROW(f.data("c", DType::f32, {1}), Error);
}

void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
    std::ofstream out(path, std::ios::binary);
    uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header << std::string(data_bytes, '\0');
}

TEST(Safetensors, RejectsLyingHeaders) {
    kiln::testing::TempDir dir;
    const char* bad[] = {
        R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}})",     // size mismatch
        R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,1600]}})",  // past the end
        R"({"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})",     // unknown dtype
        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
        R"([1,2,3])",
        R"({"a":)",
    };
    for (const char* h : bad) {
        write_raw(dir / "bad.safetensors", h, 16);
        EXPECT_THROW(SafetensorsFile(dir / "bad.safetensors"), Error) << h;
    }
    std::ofstream(dir / "short.safetensors") << "abc";
    EXPECT_THROW(SafetensorsFile(dir / "short.safetensors"), Error);
}

}  // namespace
}  // namespace kiln
