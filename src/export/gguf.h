#pragma once
// GGUF version 3, the one-file model format of ggml and llama.cpp (ggml's docs/gguf.md): a
// header, typed metadata key-values, a tensor table (name, dims, ggml type, offset), then the
// tensor data, every tensor aligned. GgufWriter streams a file tensor by tensor into place
// atomically; GgufFile maps one and checks it whole (bounds, alignment, sizes, types). The
// element encodings kiln writes (f32, f16, bf16, q8_0) are here too. Layout: docs/formats.md.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/fs.h"

namespace kiln::exporter {

// Metadata value types, numbered as the file stores them.
enum class GgufType : uint32_t {
    u8 = 0,
    i8 = 1,
    u16 = 2,
    i16 = 3,
    u32 = 4,
    i32 = 5,
    f32 = 6,
    boolean = 7,
    string = 8,
    array = 9,
    u64 = 10,
    i64 = 11,
    f64 = 12
};

// Tensor element types kiln writes and reads, numbered as ggml numbers them.
enum class GgmlType : uint32_t { f32 = 0, f16 = 1, q8_0 = 8, bf16 = 30 };

// q8_0: blocks of 32 values, each 34 bytes: an fp16 scale d = max|x| / 127, then 32 int8
// q = round(x / d); a value reads back as q * d.
constexpr int64_t kQ8Block = 32;
constexpr int64_t kQ8BlockBytes = 34;

std::string_view ggml_type_name(GgmlType t);  // "f32", "f16", "q8_0", "bf16"
std::optional<GgmlType> ggml_type_from_name(std::string_view name);
int64_t ggml_block_size(GgmlType t);        // 32 for q8_0, else 1
int64_t ggml_bytes(GgmlType t, int64_t n);  // n: a multiple of the block size

// out (ggml_bytes(t, n) bytes) = x (n values) in t's encoding; x = the values `in` holds.
void encode_values(GgmlType t, const float* x, int64_t n, uint8_t* out);
void decode_values(GgmlType t, const uint8_t* in, int64_t n, float* x);
uint16_t f32_to_f16(float f);  // round to nearest even
float f16_to_f32(uint16_t h);

// One metadata value: a scalar (the field its type uses) or an array of `items`.
struct GgufValue {
    GgufType type = GgufType::u32;
    GgufType item_type = GgufType::u32;  // arrays
    uint64_t u = 0;                      // u8..u64, boolean
    int64_t i = 0;                       // i8..i64
    double f = 0;                        // f32, f64
    std::string s;                       // string
    std::vector<GgufValue> items;        // array

    static GgufValue uint32(uint32_t v);
    static GgufValue uint64(uint64_t v);
    static GgufValue float32(float v);
    static GgufValue boolean(bool v);
    static GgufValue string(std::string v);
    static GgufValue array(GgufType item_type, std::vector<GgufValue> items);
    std::string to_string(size_t max_items = 8) const;  // for --inspect
};

struct GgufTensor {
    std::string name;
    std::vector<int64_t> dims;  // ggml order: dims[0] is the contiguous one (a row's length)
    GgmlType type = GgmlType::f32;
    uint64_t offset = 0;  // from the start of the data section; a multiple of the alignment
    uint64_t bytes = 0;
    int64_t numel() const;
};

// Writes a GGUF file: declare every key and tensor, open(), then write each tensor's bytes in
// the declared order, then commit(). The file is PATH.tmp until commit() renames it into place;
// a writer destroyed before that removes it.
class GgufWriter {
public:
    explicit GgufWriter(uint32_t alignment = 32);
    ~GgufWriter();
    void set(const std::string& key, GgufValue value);  // keys keep their first position
    void add_tensor(const std::string& name, std::vector<int64_t> dims, GgmlType type);
    void open(const std::string& path);
    void write_tensor(const std::string& name, const uint8_t* bytes, uint64_t size);
    uint64_t commit();  // returns the file's size

private:
    uint32_t alignment_;
    std::vector<std::pair<std::string, GgufValue>> metadata_;
    std::vector<GgufTensor> tensors_;
    uint64_t data_bytes_ = 0;
    size_t next_ = 0;  // the tensor write_tensor expects
    uint64_t written_ = 0;
    std::unique_ptr<fs::AtomicWriter> out_;
};

// A GGUF file mapped and checked: magic, version 3, every string, value and array inside the
// file, known value and tensor types, unique names, dims whose product fits, each tensor's
// offset aligned, its size the one its type and dims give, inside the file and not overlapping
// another. Throws Error naming the file and what is wrong.
class GgufFile {
public:
    explicit GgufFile(const std::string& path);
    const std::string& path() const { return file_.path(); }
    uint32_t version() const { return version_; }
    uint64_t alignment() const { return alignment_; }
    uint64_t data_offset() const { return data_offset_; }
    uint64_t size() const { return file_.size(); }
    const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
    const GgufValue* find(const std::string& key) const;
    // The value of `key` as that type; throws Error naming the file and key otherwise.
    uint64_t get_uint(const std::string& key) const;
    double get_float(const std::string& key) const;
    const std::string& get_string(const std::string& key) const;
    const GgufValue& get_array(const std::string& key, GgufType item_type) const;
    const std::vector<GgufTensor>& tensors() const { return tensors_; }
    const GgufTensor* tensor(const std::string& name) const;
    const uint8_t* data(const GgufTensor& t) const {
        return file_.data() + data_offset_ + t.offset;
    }
    std::vector<float> values(const std::string& name) const;  // decoded; throws when absent

private:
    fs::MappedFile file_;
    uint32_t version_ = 0;
    uint64_t alignment_ = 32, data_offset_ = 0;
    std::vector<std::pair<std::string, GgufValue>> metadata_;
    std::vector<GgufTensor> tensors_;
};

}  // namespace kiln::exporter
