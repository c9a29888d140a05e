// Fuzzes the safetensors reader (SafetensorsFile: header length, JSON header, offsets, shapes),
// which opens checkpoint rank files and exported models. An accepted file must keep the
// promise of its header: every tensor's bytes inside the data section, sized by its shape.
#include <cstring>

#include "core/safetensors.h"
#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
    using namespace kiln;
    static const std::string path = fuzz::scratch_dir() + "/fuzz.safetensors";
    fuzz::write_bytes(path, bytes, size);
    fuzz::accepted([&] {
        SafetensorsFile f(path);
        for (const TensorInfo& t : f.tensors()) {
            const auto* p = static_cast<const uint8_t*>(f.data(t.name, t.dtype, t.shape));
            const uint8_t* end = p + t.bytes;
            uint64_t header = 0;
            std::memcpy(&header, bytes, 8);
            if (8 + header + t.offset + t.bytes > size)
                fuzz::finding("tensor " + t.name + " reaches past the end of the file");
            if (t.bytes != size_t(t.numel()) * dtype_size(t.dtype))
                fuzz::finding("tensor " + t.name + " has bytes that its shape does not give");
            volatile uint8_t sink = 0;
            if (t.bytes > 0)
                sink = p[0] ^ end[-1];
            (void)sink;
        }
        (void)f.metadata("rank");
    });
    return 0;
}
