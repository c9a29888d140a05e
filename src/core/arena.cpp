#include "core/arena.h"

#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace kiln {

void AlignedDeleter::operator()(void* p) const {
    std::free(p);
}

AlignedBuffer aligned_alloc_zeroed(size_t bytes, const char* what) {
    size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (p == nullptr) {
        throw error("out of memory allocating {:.1f} MiB for {}", rounded / 1048576.0, what);
    }
    std::memset(p, 0, rounded);
    return AlignedBuffer(p);
}

size_t Arena::add(const std::string& region, int64_t count, DType dtype) {
    KILN_CHECK(!base_, "arena {}: region {} added after allocation", name_, region);
    KILN_CHECK(count >= 0, "arena {}: region {} has negative size", name_, region);
    size_t offset = bytes_;
    bytes_ += (static_cast<size_t>(count) * dtype_size(dtype) + 63) / 64 * 64;
    return offset;
}

void Arena::allocate() {
    base_ = aligned_alloc_zeroed(bytes_, name_.c_str());
}

}  // namespace kiln
