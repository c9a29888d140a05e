#include "export/gguf.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "core/dtype.h"
#include "core/error.h"

namespace kiln::exporter {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kVersion = 3;

int64_t scalar_bytes(GgufType t) {
    switch (t) {
        case GgufType::u8:
        case GgufType::i8:
        case GgufType::boolean:
            return 1;
        case GgufType::u16:
        case GgufType::i16:
            return 2;
        case GgufType::u32:
        case GgufType::i32:
        case GgufType::f32:
            return 4;
        case GgufType::u64:
        case GgufType::i64:
        case GgufType::f64:
            return 8;
        case GgufType::string:
        case GgufType::array:
            return 0;
    }
    return 0;
}

bool known_type(uint32_t t) {
    return t <= uint32_t(GgufType::f64);
}

bool is_unsigned(GgufType t) {
    return t == GgufType::u8 || t == GgufType::u16 || t == GgufType::u32 || t == GgufType::u64 ||
           t == GgufType::boolean;
}
bool is_signed(GgufType t) {
    return t == GgufType::i8 || t == GgufType::i16 || t == GgufType::i32 || t == GgufType::i64;
}

// Appends the little-endian bytes of values to a byte string (the header is built in memory).
struct Bytes {
    std::string b;
    template <typename T>
    void put(T v) {
        b.append(reinterpret_cast<const char*>(&v), sizeof v);
    }
    void str(const std::string& s) {
        put<uint64_t>(s.size());
        b += s;
    }
    void value(const GgufValue& v) {
        switch (v.type) {
            case GgufType::u8:
            case GgufType::boolean:
                return put<uint8_t>(uint8_t(v.u));
            case GgufType::i8:
                return put<int8_t>(int8_t(v.i));
            case GgufType::u16:
                return put<uint16_t>(uint16_t(v.u));
            case GgufType::i16:
                return put<int16_t>(int16_t(v.i));
            case GgufType::u32:
                return put<uint32_t>(uint32_t(v.u));
            case GgufType::i32:
                return put<int32_t>(int32_t(v.i));
            case GgufType::f32:
                return put<float>(float(v.f));
            case GgufType::u64:
                return put<uint64_t>(v.u);
            case GgufType::i64:
                return put<int64_t>(v.i);
            case GgufType::f64:
                return put<double>(v.f);
            case GgufType::string:
                return str(v.s);
            case GgufType::array:
                put<uint32_t>(uint32_t(v.item_type));
                put<uint64_t>(v.items.size());
                for (const auto& item : v.items)
                    value(item);
                return;
        }
    }
};

// Reads the header's fields in order; every read is bounds-checked against the file.
class Cursor {
public:
    Cursor(const fs::MappedFile& f) : f_(f) {}
    uint64_t at() const { return at_; }
    template <typename T>
    T get(const char* what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, f_.data() + at_, sizeof v);
        at_ += sizeof v;
        return v;
    }
    std::string str(const char* what) {
        uint64_t n = get<uint64_t>(what);
        need(n, what);
        std::string s(reinterpret_cast<const char*>(f_.data() + at_), n);
        at_ += n;
        return s;
    }
    GgufValue value(GgufType t, const std::string& key, int depth) {
        GgufValue v;
        v.type = t;
        const char* what = key.c_str();
        switch (t) {
            case GgufType::u8:
                v.u = get<uint8_t>(what);
                break;
            case GgufType::boolean:
                v.u = get<uint8_t>(what);
                if (v.u > 1)
                    throw error("{}: key {} holds the boolean byte {}, neither 0 nor 1", f_.path(),
                                key, v.u);
                break;
            case GgufType::i8:
                v.i = get<int8_t>(what);
                break;
            case GgufType::u16:
                v.u = get<uint16_t>(what);
                break;
            case GgufType::i16:
                v.i = get<int16_t>(what);
                break;
            case GgufType::u32:
                v.u = get<uint32_t>(what);
                break;
            case GgufType::i32:
                v.i = get<int32_t>(what);
                break;
            case GgufType::f32:
                v.f = get<float>(what);
                break;
            case GgufType::u64:
                v.u = get<uint64_t>(what);
                break;
            case GgufType::i64:
                v.i = get<int64_t>(what);
                break;
            case GgufType::f64:
                v.f = get<double>(what);
                break;
            case GgufType::string:
                v.s = str(what);
                break;
            case GgufType::array: {
                if (depth > 8)
                    throw error("{}: key {} nests arrays more than 8 deep", f_.path(), key);
                uint32_t it = get<uint32_t>(what);
                if (!known_type(it))
                    throw error("{}: key {} is an array of unknown type {}", f_.path(), key, it);
                v.item_type = GgufType(it);
                uint64_t n = get<uint64_t>(what);
                // Each item takes at least one byte (a string eight): a count the rest of the
                // file cannot hold is refused before anything is allocated for it.
                const uint64_t least = std::max<int64_t>(1, scalar_bytes(v.item_type));
                if (n > (f_.size() - at_) / least)
                    throw error("{}: key {} claims {} items, more than the file holds", f_.path(),
                                key, n);
                v.items.reserve(n);
                for (uint64_t k = 0; k < n; k++)
                    v.items.push_back(value(v.item_type, key, depth + 1));
                break;
            }
        }
        return v;
    }

private:
    void need(uint64_t n, const char* what) {
        if (n > f_.size() - at_)
            throw error("{} ends inside the header (reading {} at byte {}): the file is truncated",
                        f_.path(), what, at_);
    }
    const fs::MappedFile& f_;
    uint64_t at_ = 0;
};

uint64_t align_up(uint64_t n, uint64_t a) {
    return (n + a - 1) / a * a;
}

}  // namespace

std::string_view ggml_type_name(GgmlType t) {
    switch (t) {
        case GgmlType::f32:
            return "f32";
        case GgmlType::f16:
            return "f16";
        case GgmlType::q8_0:
            return "q8_0";
        case GgmlType::bf16:
            return "bf16";
    }
    return "?";
}

std::optional<GgmlType> ggml_type_from_name(std::string_view name) {
    for (GgmlType t : {GgmlType::f32, GgmlType::f16, GgmlType::q8_0, GgmlType::bf16}) {
        if (ggml_type_name(t) == name)
            return t;
    }
    return std::nullopt;
}

int64_t ggml_block_size(GgmlType t) {
    return t == GgmlType::q8_0 ? kQ8Block : 1;
}

int64_t ggml_bytes(GgmlType t, int64_t n) {
    switch (t) {
        case GgmlType::f32:
            return 4 * n;
        case GgmlType::f16:
        case GgmlType::bf16:
            return 2 * n;
        case GgmlType::q8_0:
            KILN_CHECK(n % kQ8Block == 0, "q8_0 holds whole blocks of 32, not {} values", n);
            return n / kQ8Block * kQ8BlockBytes;
    }
    return 0;
}

uint16_t f32_to_f16(float f) {
    _Float16 h = static_cast<_Float16>(f);  // the compiler's conversion rounds to nearest even
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
}

float f16_to_f32(uint16_t u) {
    _Float16 h;
    std::memcpy(&h, &u, 2);
    return static_cast<float>(h);
}

void encode_values(GgmlType t, const float* x, int64_t n, uint8_t* out) {
    switch (t) {
        case GgmlType::f32:
            std::memcpy(out, x, size_t(n) * 4);
            return;
        case GgmlType::f16:
            for (int64_t i = 0; i < n; i++) {
                uint16_t h = f32_to_f16(x[i]);
                std::memcpy(out + 2 * i, &h, 2);
            }
            return;
        case GgmlType::bf16:
            for (int64_t i = 0; i < n; i++) {
                uint16_t h = f32_to_bf16(x[i]);
                std::memcpy(out + 2 * i, &h, 2);
            }
            return;
        case GgmlType::q8_0:
            KILN_CHECK(n % kQ8Block == 0, "q8_0 holds whole blocks of 32, not {} values", n);
            for (int64_t b = 0; b < n / kQ8Block; b++) {
                const float* v = x + b * kQ8Block;
                uint8_t* block = out + b * kQ8BlockBytes;
                float amax = 0;
                for (int64_t k = 0; k < kQ8Block; k++)
                    amax = std::max(amax, std::fabs(v[k]));
                const float d = amax / 127.0f;
                const float inverse = d != 0 ? 1.0f / d : 0.0f;
                const uint16_t dh = f32_to_f16(d);
                std::memcpy(block, &dh, 2);
                for (int64_t k = 0; k < kQ8Block; k++)
                    block[2 + k] = uint8_t(int8_t(std::lround(v[k] * inverse)));
            }
            return;
    }
}

void decode_values(GgmlType t, const uint8_t* in, int64_t n, float* x) {
    switch (t) {
        case GgmlType::f32:
            std::memcpy(x, in, size_t(n) * 4);
            return;
        case GgmlType::f16:
        case GgmlType::bf16:
            for (int64_t i = 0; i < n; i++) {
                uint16_t h;
                std::memcpy(&h, in + 2 * i, 2);
                x[i] = t == GgmlType::f16 ? f16_to_f32(h) : bf16_to_f32(h);
            }
            return;
        case GgmlType::q8_0:
            for (int64_t b = 0; b < n / kQ8Block; b++) {
                const uint8_t* block = in + b * kQ8BlockBytes;
                uint16_t dh;
                std::memcpy(&dh, block, 2);
                const float d = f16_to_f32(dh);
                for (int64_t k = 0; k < kQ8Block; k++)
                    x[b * kQ8Block + k] = float(int8_t(block[2 + k])) * d;
            }
            return;
    }
}

GgufValue GgufValue::uint32(uint32_t v) {
    GgufValue x;
    x.type = GgufType::u32;
    x.u = v;
    return x;
}
GgufValue GgufValue::uint64(uint64_t v) {
    GgufValue x;
    x.type = GgufType::u64;
    x.u = v;
    return x;
}
GgufValue GgufValue::float32(float v) {
    GgufValue x;
    x.type = GgufType::f32;
    x.f = v;
    return x;
}
GgufValue GgufValue::boolean(bool v) {
    GgufValue x;
    x.type = GgufType::boolean;
    x.u = v;
    return x;
}
GgufValue GgufValue::string(std::string v) {
    GgufValue x;
    x.type = GgufType::string;
    x.s = std::move(v);
    return x;
}
GgufValue GgufValue::array(GgufType item_type, std::vector<GgufValue> items) {
    GgufValue x;
    x.type = GgufType::array;
    x.item_type = item_type;
    for (const auto& item : items)
        KILN_CHECK(item.type == item_type, "an array's items are all of its item type");
    x.items = std::move(items);
    return x;
}

std::string GgufValue::to_string(size_t max_items) const {
    if (type == GgufType::array) {
        static const char* names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                      "bool", "string", "array", "u64", "i64", "f64"};
        std::string out = fmt::format("{}[{}] [", names[uint32_t(item_type)], items.size());
        for (size_t k = 0; k < items.size() && k < max_items; k++)
            out += (k ? ", " : "") + items[k].to_string(max_items);
        return out + (items.size() > max_items ? ", ...]" : "]");
    }
    if (type == GgufType::string) {
        std::string out = "\"";
        for (unsigned char c : s) {
            if (c == '"' || c == '\\')
                out += fmt::format("\\{}", char(c));
            else if (c < 0x20 || c == 0x7f)
                out += fmt::format("\\x{:02x}", c);
            else
                out += char(c);
        }
        return out + "\"";
    }
    if (type == GgufType::boolean)
        return u ? "true" : "false";
    if (type == GgufType::f32 || type == GgufType::f64)
        return fmt::format("{}", type == GgufType::f32 ? double(float(f)) : f);
    return is_signed(type) ? std::to_string(i) : std::to_string(u);
}

int64_t GgufTensor::numel() const {
    int64_t n = 1;
    for (int64_t d : dims)
        n *= d;
    return n;
}

GgufWriter::GgufWriter(uint32_t alignment) : alignment_(alignment) {
    KILN_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, "alignment {}", alignment);
    set("general.alignment", GgufValue::uint32(alignment));
}

GgufWriter::~GgufWriter() = default;

void GgufWriter::set(const std::string& key, GgufValue value) {
    KILN_CHECK(!out_, "metadata comes before open()");
    for (auto& [k, v] : metadata_) {
        if (k == key) {
            v = std::move(value);
            return;
        }
    }
    metadata_.emplace_back(key, std::move(value));
}

void GgufWriter::add_tensor(const std::string& name, std::vector<int64_t> dims, GgmlType type) {
    KILN_CHECK(!out_, "tensors are declared before open()");
    GgufTensor t{name, std::move(dims), type, data_bytes_, 0};
    KILN_CHECK(!t.dims.empty() && t.dims.size() <= 4, "{}: 1 to 4 dims", name);
    KILN_CHECK(t.dims[0] % ggml_block_size(type) == 0, "{}: rows of {} are not whole {} blocks",
               name, t.dims[0], ggml_type_name(type));
    t.bytes = uint64_t(ggml_bytes(type, t.numel()));
    data_bytes_ = align_up(data_bytes_ + t.bytes, alignment_);
    tensors_.push_back(std::move(t));
}

void GgufWriter::open(const std::string& path) {
    Bytes h;
    h.put<uint32_t>(kMagic);
    h.put<uint32_t>(kVersion);
    h.put<uint64_t>(tensors_.size());
    h.put<uint64_t>(metadata_.size());
    for (const auto& [key, value] : metadata_) {
        h.str(key);
        h.put<uint32_t>(uint32_t(value.type));
        h.value(value);
    }
    for (const auto& t : tensors_) {
        h.str(t.name);
        h.put<uint32_t>(uint32_t(t.dims.size()));
        for (int64_t d : t.dims)
            h.put<uint64_t>(uint64_t(d));
        h.put<uint32_t>(uint32_t(t.type));
        h.put<uint64_t>(t.offset);
    }
    h.b.resize(align_up(h.b.size(), alignment_), '\0');
    out_ = std::make_unique<fs::AtomicWriter>(path, h.b.size() + data_bytes_);
    out_->write(h.b.data(), h.b.size());
    written_ = h.b.size();
}

void GgufWriter::write_tensor(const std::string& name, const uint8_t* bytes, uint64_t size) {
    KILN_CHECK(out_ && next_ < tensors_.size(), "write_tensor({}) after open(), once per tensor",
               name);
    const GgufTensor& t = tensors_[next_++];
    KILN_CHECK(t.name == name && t.bytes == size,
               "{} ({} bytes) written where {} ({} bytes) is due", name, size, t.name, t.bytes);
    out_->write(bytes, size);
    static const char zeros[64] = {};
    uint64_t pad = align_up(size, alignment_) - size;
    while (pad > 0) {
        uint64_t n = std::min<uint64_t>(pad, sizeof zeros);
        out_->write(zeros, n);
        pad -= n;
    }
    written_ += align_up(size, alignment_);
}

uint64_t GgufWriter::commit() {
    KILN_CHECK(out_ && next_ == tensors_.size(), "commit() after every tensor's bytes");
    out_->commit();
    out_.reset();
    return written_;
}

GgufFile::GgufFile(const std::string& path) : file_(path) {
    Cursor c(file_);
    // The bytes there are compared with the magic's first ones, so that a file cut inside its
    // fixed start is called truncated (by the cursor, naming what it was reading), not foreign.
    if (file_.size() == 0)
        throw error("{} is empty, not a GGUF file", path);
    if (std::memcmp(file_.data(), "GGUF", std::min<size_t>(4, file_.size())) != 0)
        throw error("{} is not a GGUF file (no GGUF magic)", path);
    c.get<uint32_t>("the magic");
    version_ = c.get<uint32_t>("the version");
    if (version_ != kVersion)
        throw error("{} is GGUF version {}; kiln reads version 3", path, version_);
    const uint64_t n_tensors = c.get<uint64_t>("the tensor count");
    const uint64_t n_kv = c.get<uint64_t>("the metadata count");
    // A key takes at least 12 bytes and a tensor entry at least 24.
    if (n_kv > file_.size() / 12 || n_tensors > file_.size() / 24)
        throw error("{} claims {} keys and {} tensors, more than its {} bytes hold", path, n_kv,
                    n_tensors, file_.size());
    std::set<std::string> keys;
    for (uint64_t k = 0; k < n_kv; k++) {
        std::string key = c.str("a key");
        uint32_t type = c.get<uint32_t>(key.c_str());
        if (!known_type(type))
            throw error("{}: key {} has unknown value type {}", path, key, type);
        if (!keys.insert(key).second)
            throw error("{}: key {} appears twice", path, key);
        metadata_.emplace_back(key, c.value(GgufType(type), key, 0));
    }
    if (const GgufValue* a = find("general.alignment")) {
        if (a->type != GgufType::u32 || a->u == 0 || (a->u & (a->u - 1)) != 0)
            throw error("{}: general.alignment {} is not a power of two (u32)", path,
                        a->to_string());
        alignment_ = a->u;
    }
    std::set<std::string> names;
    for (uint64_t k = 0; k < n_tensors; k++) {
        GgufTensor t;
        t.name = c.str("a tensor name");
        if (!names.insert(t.name).second)
            throw error("{}: tensor {} appears twice", path, t.name);
        uint32_t n_dims = c.get<uint32_t>(t.name.c_str());
        if (n_dims < 1 || n_dims > 4)
            throw error("{}: tensor {} has {} dims (1 to 4 allowed)", path, t.name, n_dims);
        int64_t numel = 1;
        for (uint32_t d = 0; d < n_dims; d++) {
            uint64_t dim = c.get<uint64_t>(t.name.c_str());
            if (dim == 0 || dim > (uint64_t(1) << 40) ||
                uint64_t(numel) * dim > (uint64_t(1) << 40))
                throw error("{}: tensor {} has a dim of {}", path, t.name, dim);
            t.dims.push_back(int64_t(dim));
            numel *= int64_t(dim);
        }
        uint32_t type = c.get<uint32_t>(t.name.c_str());
        if (type != uint32_t(GgmlType::f32) && type != uint32_t(GgmlType::f16) &&
            type != uint32_t(GgmlType::q8_0) && type != uint32_t(GgmlType::bf16))
            throw error("{}: tensor {} has ggml type {}, which kiln does not read", path, t.name,
                        type);
        t.type = GgmlType(type);
        if (t.dims[0] % ggml_block_size(t.type) != 0)
            throw error("{}: tensor {} has rows of {} values, not whole {} blocks", path, t.name,
                        t.dims[0], ggml_type_name(t.type));
        t.offset = c.get<uint64_t>(t.name.c_str());
        if (t.offset % alignment_ != 0)
            throw error("{}: tensor {} starts at {}, not a multiple of the alignment {}", path,
                        t.name, t.offset, alignment_);
        t.bytes = uint64_t(ggml_bytes(t.type, numel));
        tensors_.push_back(std::move(t));
    }
    data_offset_ = align_up(c.at(), alignment_);
    const uint64_t data_size = file_.size() < data_offset_ ? 0 : file_.size() - data_offset_;
    std::vector<const GgufTensor*> by_offset;
    for (const auto& t : tensors_) {
        if (t.offset > data_size || t.bytes > data_size - t.offset)
            throw error("{}: tensor {} ({} bytes at {}) runs past the end of the file", path,
                        t.name, t.bytes, t.offset);
        by_offset.push_back(&t);
    }
    std::sort(by_offset.begin(), by_offset.end(),
              [](const GgufTensor* a, const GgufTensor* b) { return a->offset < b->offset; });
    for (size_t k = 1; k < by_offset.size(); k++) {
        if (by_offset[k - 1]->offset + by_offset[k - 1]->bytes > by_offset[k]->offset)
            throw error("{}: tensors {} and {} overlap", path, by_offset[k - 1]->name,
                        by_offset[k]->name);
    }
}

const GgufValue* GgufFile::find(const std::string& key) const {
    for (const auto& [k, v] : metadata_) {
        if (k == key)
            return &v;
    }
    return nullptr;
}

uint64_t GgufFile::get_uint(const std::string& key) const {
    const GgufValue* v = find(key);
    if (!v || !is_unsigned(v->type) || v->type == GgufType::boolean)
        throw error("{}: key {} is missing or not an unsigned integer", path(), key);
    return v->u;
}

double GgufFile::get_float(const std::string& key) const {
    const GgufValue* v = find(key);
    if (!v || (v->type != GgufType::f32 && v->type != GgufType::f64))
        throw error("{}: key {} is missing or not a float", path(), key);
    return v->f;
}

const std::string& GgufFile::get_string(const std::string& key) const {
    const GgufValue* v = find(key);
    if (!v || v->type != GgufType::string)
        throw error("{}: key {} is missing or not a string", path(), key);
    return v->s;
}

const GgufValue& GgufFile::get_array(const std::string& key, GgufType item_type) const {
    const GgufValue* v = find(key);
    if (!v || v->type != GgufType::array || v->item_type != item_type)
        throw error("{}: key {} is missing or not an array of the expected type", path(), key);
    return *v;
}

const GgufTensor* GgufFile::tensor(const std::string& name) const {
    for (const auto& t : tensors_) {
        if (t.name == name)
            return &t;
    }
    return nullptr;
}

std::vector<float> GgufFile::values(const std::string& name) const {
    const GgufTensor* t = tensor(name);
    if (!t)
        throw error("{} has no tensor {}", path(), name);
    std::vector<float> x(size_t(t->numel()));
    decode_values(t->type, data(*t), t->numel(), x.data());
    return x;
}

}  // namespace kiln::exporter
