#pragma once
// The safetensors file format (used by Hugging Face): an 8-byte little-endian header length N,
// N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
// then the tensor bytes. kiln writes checkpoints and exports in it. Details: docs/formats.md.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/fs.h"

namespace kiln {

struct TensorInfo {
    std::string name;
    DType dtype = DType::f32;
    std::vector<int64_t> shape;
    size_t offset = 0;  // from the start of the data section
    size_t bytes = 0;
    int64_t numel() const;
};

// Collects tensors (by pointer: the data must stay alive until write) and writes the file
// atomically (temp + fsync + rename).
class SafetensorsWriter {
public:
    void add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data);
    void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
    uint64_t write(const std::string& path) const;  // returns the file's XXH64

private:
    std::vector<std::pair<TensorInfo, const void*>> tensors_;
    std::map<std::string, std::string> metadata_;
    size_t data_bytes_ = 0;
};

// A memory-mapped safetensors file whose header has been validated (offsets in bounds, sizes
// matching shapes, no overlaps, known dtypes); errors name the file.
class SafetensorsFile {
public:
    explicit SafetensorsFile(const std::string& path);
    const std::vector<TensorInfo>& tensors() const { return tensors_; }
    const TensorInfo* find(const std::string& name) const;
    // The tensor's bytes; throws Error naming the file when it is missing or of another
    // dtype/shape than expected.
    const void* data(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const;
    std::optional<std::string> metadata(const std::string& key) const;
    const std::string& path() const { return file_.path(); }

private:
    fs::MappedFile file_;
    size_t data_start_ = 0;
    std::vector<TensorInfo> tensors_;
    std::map<std::string, std::string> metadata_;
};

std::string shape_string(const std::vector<int64_t>& shape);  // "(3, 4)"

}  // namespace kiln
