#include "core/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace kiln {
namespace {

const char* st_dtype(DType t) {
    switch (t) {
        case DType::f32:
            return "F32";
        case DType::bf16:
            return "BF16";
        case DType::i32:
            return "I32";
        case DType::u16:
            return "U16";
        case DType::u32:
            return "U32";
    }
    return "?";
}

std::optional<DType> parse_dtype(const std::string& s) {
    for (DType t : {DType::f32, DType::bf16, DType::i32, DType::u16, DType::u32}) {
        if (s == st_dtype(t))
            return t;
    }
    return std::nullopt;
}

}  // namespace

int64_t TensorInfo::numel() const {
    int64_t n = 1;
    for (int64_t d : shape)
        n *= d;
    return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); i++)
        s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + ")";
}

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            const void* data) {
    TensorInfo t;
    t.name = name;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.offset = data_bytes_;
    t.bytes = size_t(t.numel()) * dtype_size(dtype);
    data_bytes_ += t.bytes;
    tensors_.emplace_back(std::move(t), data);
}

uint64_t SafetensorsWriter::write(const std::string& path) const {
    nlohmann::ordered_json header;
    if (!metadata_.empty()) {
        header["__metadata__"] = metadata_;
    }
    for (const auto& [t, _] : tensors_) {
        header[t.name] = {{"dtype", st_dtype(t.dtype)},
                          {"shape", t.shape},
                          {"data_offsets", {t.offset, t.offset + t.bytes}}};
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    uint64_t n = text.size();
    size_t total = 8 + text.size();
    for (const auto& [t, _] : tensors_)
        total += t.bytes;
    fs::AtomicWriter out(path, total);
    out.write(&n, 8);
    out.write(text.data(), text.size());
    for (const auto& [t, data] : tensors_)
        out.write(data, t.bytes);
    return out.commit();
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
    auto bad = [&](const std::string& why) {
        return error("{} is not a valid safetensors file: {}", path, why);
    };
    if (file_.size() < 8)
        throw bad("shorter than its 8-byte header length");
    uint64_t n;
    std::memcpy(&n, file_.data(), 8);
    if (n > file_.size() - 8 || n > (100u << 20))
        throw bad("header length out of range");
    data_start_ = 8 + n;
    size_t data_bytes = file_.size() - data_start_;
    nlohmann::json header;
    try {
        header = nlohmann::json::parse(file_.data() + 8, file_.data() + 8 + n);
    } catch (const nlohmann::json::exception& e) {
        throw bad(std::string("header is not JSON: ") + e.what());
    }
    if (!header.is_object())
        throw bad("header is not a JSON object");
    try {
        for (auto& [name, v] : header.items()) {
            if (name == "__metadata__") {
                for (auto& [k, s] : v.items())
                    metadata_[k] = s.get<std::string>();
                continue;
            }
            TensorInfo t;
            t.name = name;
            auto dt = parse_dtype(v.at("dtype").get<std::string>());
            if (!dt)
                throw bad("tensor " + name + " has unsupported dtype " + v.at("dtype").dump());
            t.dtype = *dt;
            t.shape = v.at("shape").get<std::vector<int64_t>>();
            auto off = v.at("data_offsets").get<std::vector<uint64_t>>();
            if (off.size() != 2 || off[0] > off[1] || off[1] > data_bytes) {
                throw bad("tensor " + name + " has data_offsets outside the file");
            }
            for (int64_t d : t.shape) {
                if (d < 0)
                    throw bad("tensor " + name + " has a negative dimension");
            }
            t.offset = off[0];
            t.bytes = off[1] - off[0];
            // Checked: a forged shape must not wrap its size into the bytes the file holds.
            uint64_t want = dtype_size(t.dtype);
            for (int64_t d : t.shape) {
                if (__builtin_mul_overflow(want, uint64_t(d), &want))
                    throw bad("tensor " + name + " has a shape " + shape_string(t.shape) +
                              " larger than any file");
            }
            if (t.bytes != want) {
                throw bad("tensor " + name + " has " + std::to_string(t.bytes) +
                          " bytes for shape " + shape_string(t.shape));
            }
            tensors_.push_back(std::move(t));
        }
    } catch (const nlohmann::json::exception& e) {
        throw bad(std::string("malformed header entry: ") + e.what());
    }
    std::vector<const TensorInfo*> sorted;
    for (const auto& t : tensors_)
        sorted.push_back(&t);
    std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
    for (size_t i = 1; i < sorted.size(); i++) {
        if (sorted[i]->offset < sorted[i - 1]->offset + sorted[i - 1]->bytes) {
            throw bad("tensors " + sorted[i - 1]->name + " and " + sorted[i]->name + " overlap");
        }
    }
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
    for (const auto& t : tensors_) {
        if (t.name == name)
            return &t;
    }
    return nullptr;
}

const void* SafetensorsFile::data(const std::string& name, DType dtype,
                                  const std::vector<int64_t>& shape) const {
    const TensorInfo* t = find(name);
    if (t == nullptr)
        throw error("{} has no tensor {}", path(), name);
    if (t->dtype != dtype || t->shape != shape) {
        throw error("{}: tensor {} is {} {}, expected {} {}", path(), name, dtype_name(t->dtype),
                    shape_string(t->shape), dtype_name(dtype), shape_string(shape));
    }
    return file_.data() + data_start_ + t->offset;
}

std::optional<std::string> SafetensorsFile::metadata(const std::string& key) const {
    auto it = metadata_.find(key);
    if (it == metadata_.end())
        return std::nullopt;
    return it->second;
}

}  // namespace kiln
