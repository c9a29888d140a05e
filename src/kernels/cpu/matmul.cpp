#include "kernels/cpu/matmul.h"

#include <omp.h>

#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>

#include "core/error.h"

namespace kiln::kernels::cpu {
namespace {

dnnl::engine& engine() {
    static dnnl::engine e(dnnl::engine::kind::cpu, 0);
    return e;
}

dnnl::stream& stream() {
    static dnnl::stream s(engine());
    return s;
}

dnnl::memory::data_type dnnl_type(DType t) {
    KILN_CHECK(t == DType::f32 || t == DType::bf16, "matmul operand of type {}", dtype_name(t));
    return t == DType::bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
}

dnnl::memory::desc desc(const int64_t dims[4], const int64_t strides[4], DType t) {
    return dnnl::memory::desc(dnnl::memory::dims(dims, dims + 4), dnnl_type(t),
                              dnnl::memory::dims(strides, strides + 4));
}

// Everything that selects a primitive: dims and strides of a, b, c, the types, the epilogue.
using Key = std::array<int64_t, 28>;

struct Cached {
    dnnl::matmul primitive;
    dnnl::memory::desc a, b, c;
};

}  // namespace

void matmul(const MatOperand& a, const MatOperand& b, float* c, const int64_t c_strides[4],
            float alpha, bool accumulate) {
    const int64_t c_dims[4] = {a.dims[0], a.dims[1], a.dims[2], b.dims[3]};
    KILN_CHECK(a.dims[3] == b.dims[2], "matmul inner dims {} != {}", a.dims[3], b.dims[2]);
    Key key{};
    for (int i = 0; i < 4; i++) {
        key[i] = a.dims[i];
        key[4 + i] = a.strides[i];
        key[8 + i] = b.dims[i];
        key[12 + i] = b.strides[i];
        key[16 + i] = c_strides[i];
    }
    key[20] = static_cast<int64_t>(a.type);
    key[21] = static_cast<int64_t>(b.type);
    key[22] = accumulate;
    uint32_t alpha_bits;
    std::memcpy(&alpha_bits, &alpha, 4);
    key[23] = alpha_bits;

    // oneDNN 2.6's AMX bf16 matmul returns wrong values, intermittently or always, when fewer
    // than ~48 rows are split across threads (seen with N in 49..63; tests/kernels pins it).
    // Products that short gain nothing from threads anyway: they are planned (oneDNN fixes the
    // split when the primitive is made) and run on one thread.
    const bool serial = a.dims[2] < 64;
    const int threads = omp_get_max_threads();
    if (serial)
        omp_set_num_threads(1);
    key[24] = serial ? 1 : threads;

    static std::mutex mutex;
    static std::map<Key, Cached> cache;
    const Cached* entry;
    {
        std::lock_guard<std::mutex> lock(mutex);
        auto it = cache.find(key);
        if (it == cache.end()) {
            Cached fresh;
            fresh.a = desc(a.dims, a.strides, a.type);
            fresh.b = desc(b.dims, b.strides, b.type);
            fresh.c = desc(c_dims, c_strides, DType::f32);
            dnnl::primitive_attr attr;
            if (alpha != 1.0f) {
                attr.set_output_scales(0, {alpha});
            }
            if (accumulate) {
                dnnl::post_ops ops;
                ops.append_sum(1.0f);
                attr.set_post_ops(ops);
            }
            try {
                auto pd = dnnl::matmul::primitive_desc(
                    dnnl::matmul::desc(fresh.a, fresh.b, fresh.c), attr, engine());
                fresh.primitive = dnnl::matmul(pd);
            } catch (const dnnl::error& e) {
                KILN_CHECK(false, "oneDNN rejected a matmul ({}x{}x{}): {}", a.dims[2], b.dims[3],
                           a.dims[3], e.what());
            }
            it = cache.emplace(key, std::move(fresh)).first;
        }
        entry = &it->second;
    }
    dnnl::memory ma(entry->a, engine(), const_cast<void*>(a.ptr));
    dnnl::memory mb(entry->b, engine(), const_cast<void*>(b.ptr));
    dnnl::memory mc(entry->c, engine(), c);
    entry->primitive.execute(stream(),
                             {{DNNL_ARG_SRC, ma}, {DNNL_ARG_WEIGHTS, mb}, {DNNL_ARG_DST, mc}});
    stream().wait();
    if (serial)
        omp_set_num_threads(threads);
}

}  // namespace kiln::kernels::cpu
