#pragma once
// Arena: one aligned allocation per kind of tensor (params, grads, activations, ...), carved
// into named regions. Regions are declared first, then the memory is allocated once, from host
// memory or from the memory a kernel backend gives (a device's: kernels/table.h).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace kiln {

// Where an arena's bytes live. alloc returns zero-filled memory aligned to `align`, or throws
// Error naming `what`; release frees what alloc returned.
struct Memory {
    const char* name;  // "host", "cuda", ...
    size_t align;      // bytes; every region of an arena starts at a multiple of it
    void* (*alloc)(size_t bytes, const char* what);
    void (*release)(void* p);
};
// Host memory: 64-byte aligned; from 2 MiB on, 2 MiB-aligned and offered to the kernel for
// transparent huge pages.
extern const Memory host_memory;

class Arena {
public:
    explicit Arena(std::string name, const Memory& memory = host_memory)
        : name_(std::move(name)), memory_(&memory), base_(nullptr, memory.release) {}

    // Declares a region of `count` elements; returns its byte offset. Only before allocate().
    size_t add(const std::string& region, int64_t count, DType dtype);
    void allocate();  // one allocation for all regions, zero-filled
    const Memory& memory() const { return *memory_; }

    template <typename T>
    T* get(size_t offset) const {
        return reinterpret_cast<T*>(static_cast<char*>(base_.get()) + offset);
    }
    void* base() const { return base_.get(); }
    size_t bytes() const { return bytes_; }
    const std::string& name() const { return name_; }

private:
    std::string name_;
    const Memory* memory_;
    size_t bytes_ = 0;
    std::unique_ptr<void, void (*)(void*)> base_;
};

}  // namespace kiln
