#include "core/arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace kiln {

namespace {

void* host_alloc(size_t bytes, const char* what) {
    // Large buffers are 2 MiB-aligned and offered to the kernel for transparent huge pages
    // (Debian's default mode is "madvise"): their first touch faults 512 times less often, and
    // the kernels that stream them miss the TLB less.
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t align = bytes >= kHuge ? kHuge : 64;
    size_t rounded = (std::max<size_t>(bytes, 1) + align - 1) / align * align;
    void* p = std::aligned_alloc(align, rounded);
    if (p == nullptr) {
        throw error("out of memory allocating {:.1f} MiB for {}", rounded / 1048576.0, what);
    }
    if (align == kHuge)
        ::madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure changes nothing
    std::memset(p, 0, rounded);
    return p;
}

void host_release(void* p) {
    std::free(p);
}

}  // namespace

const Memory host_memory = {"host", 64, host_alloc, host_release};

size_t Arena::add(const std::string& region, int64_t count, DType dtype) {
    KILN_CHECK(!base_, "arena {}: region {} added after allocation", name_, region);
    KILN_CHECK(count >= 0, "arena {}: region {} has negative size", name_, region);
    size_t offset = bytes_;
    const size_t align = memory_->align;
    bytes_ += (static_cast<size_t>(count) * dtype_size(dtype) + align - 1) / align * align;
    return offset;
}

void Arena::allocate() {
    base_.reset(memory_->alloc(bytes_, name_.c_str()));
}

}  // namespace kiln
