#pragma once
// Arena: one aligned allocation per kind of tensor (params, grads, activations, ...), carved
// into named regions. Regions are declared first, then the memory is allocated once.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace kiln {

struct AlignedDeleter {
    void operator()(void* p) const;
};
using AlignedBuffer = std::unique_ptr<void, AlignedDeleter>;
// Zero-filled, 64-byte aligned; from 2 MiB on, 2 MiB-aligned and offered to the kernel for
// transparent huge pages. Throws Error naming `what` when the memory is not there.
AlignedBuffer aligned_alloc_zeroed(size_t bytes, const char* what);

class Arena {
public:
    explicit Arena(std::string name) : name_(std::move(name)) {}

    // Declares a region of `count` elements; returns its byte offset. Only before allocate().
    size_t add(const std::string& region, int64_t count, DType dtype);
    void allocate();  // one allocation for all regions, zero-filled

    template <typename T>
    T* get(size_t offset) const {
        return reinterpret_cast<T*>(static_cast<char*>(base_.get()) + offset);
    }
    void* base() const { return base_.get(); }
    size_t bytes() const { return bytes_; }
    const std::string& name() const { return name_; }

private:
    std::string name_;
    size_t bytes_ = 0;
    AlignedBuffer base_;
};

}  // namespace kiln
