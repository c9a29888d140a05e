// gemm for the CPU backend: a 2-D view onto cpu::matmul, with f32 operands rounded to bf16 in
// the workspace when the precision is bf16.
#include <cstring>

#include "core/error.h"
#include "core/threads.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/matmul.h"

namespace kiln::kernels::cpu {

void pack_bf16(uint16_t* dst, const float* src, int64_t rows, int64_t cols, int64_t ld) {
    parallel_range(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; r++) {
                           const float* s = src + r * ld;
                           uint16_t* d = dst + r * cols;
                           for (int64_t c = 0; c < cols; c++)
                               d[c] = f32_to_bf16(s[c]);
                       }
                   });
}

namespace {

// Describes a stored (rows, cols) matrix, seen transposed or not, as a 2-D MatOperand.
MatOperand view(const void* ptr, DType type, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    MatOperand m;
    m.ptr = ptr;
    m.type = type;
    m.dims[2] = trans ? cols : rows;
    m.dims[3] = trans ? rows : cols;
    m.strides[2] = trans ? 1 : ld;
    m.strides[3] = trans ? ld : 1;
    m.strides[0] = m.strides[1] = m.dims[2] * m.dims[3];
    return m;
}

}  // namespace

template <Precision P>
void gemm(const Gemm& g, Workspace ws) {
    // Stored shapes: A is (M, K) or (K, M); B is (K, N) or (N, K).
    int64_t a_rows = g.trans_a ? g.K : g.M, a_cols = g.trans_a ? g.M : g.K;
    int64_t b_rows = g.trans_b ? g.N : g.K, b_cols = g.trans_b ? g.K : g.N;
    const void* a = g.a;
    const void* b = g.b;
    DType at = g.a_type, bt = g.b_type;
    int64_t lda = g.lda, ldb = g.ldb;
    if constexpr (P == Precision::bf16) {
        auto* scratch = static_cast<uint16_t*>(ws.ptr);
        if (at == DType::f32) {
            KILN_CHECK(size_t(a_rows * a_cols) * 2 <= ws.bytes, "gemm workspace too small");
            pack_bf16(scratch, static_cast<const float*>(a), a_rows, a_cols, lda);
            a = scratch;
            at = DType::bf16;
            lda = a_cols;
            scratch += (a_rows * a_cols + 31) / 32 * 32;
        }
        if (bt == DType::f32) {
            KILN_CHECK(
                size_t(scratch - static_cast<uint16_t*>(ws.ptr) + b_rows * b_cols) * 2 <= ws.bytes,
                "gemm workspace too small");
            pack_bf16(scratch, static_cast<const float*>(b), b_rows, b_cols, ldb);
            b = scratch;
            bt = DType::bf16;
            ldb = b_cols;
        }
    }
    KILN_CHECK(g.c_type == DType::f32, "the CPU products write f32 (SwiGLU's inputs are f32 here)");
    float* c = static_cast<float*>(g.c);
    // oneDNN adds to the output itself: what is added goes there first.
    if (g.accumulate && g.c_in && g.c_in != c) {
        if (g.ldc == g.N) {
            std::memcpy(c, g.c_in, size_t(g.M * g.N) * sizeof(float));
        } else {
            for (int64_t r = 0; r < g.M; r++)
                std::memcpy(c + r * g.ldc, g.c_in + r * g.ldc, size_t(g.N) * sizeof(float));
        }
    }
    int64_t c_strides[4] = {g.M * g.ldc, g.M * g.ldc, g.ldc, 1};
    matmul(view(a, at, a_rows, a_cols, lda, g.trans_a), view(b, bt, b_rows, b_cols, ldb, g.trans_b),
           c, c_strides, g.alpha, g.accumulate);
}

template void gemm<Precision::fp32>(const Gemm&, Workspace);
template void gemm<Precision::bf16>(const Gemm&, Workspace);

}  // namespace kiln::kernels::cpu
