#pragma once
// How cuda/gemm.cu hands a row-major Gemm (ops.h) to cuBLASLt, which is column-major: a
// row-major (r, c) matrix with row stride ld is the same memory as a column-major (c, r) one with
// leading dimension ld, so row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, with
// B's memory first and A's second. Plain C++, so that tests/kernels/test_kernel_math.cpp checks
// the mapping with a column-major product on the host.
#include <cstdint>

#include "kernels/ops.h"

namespace kiln::kernels::cuda {

// A column-major matrix: rows x cols, leading dimension ld, read transposed or not.
struct ColumnMajor {
    int64_t rows, cols, ld;
    bool trans;
};

// D (m, n) = alpha op(first) (m, k) op(second) (k, n) + beta C, all column-major.
struct ColumnMajorProduct {
    int64_t m, n, k;
    ColumnMajor first;   // B's memory
    ColumnMajor second;  // A's memory
    ColumnMajor out;     // C's memory, (N, M)
};

// lda, ldb: the row strides of A and B as they reach cuBLASLt (after any dtype conversion).
inline ColumnMajorProduct column_major(const Gemm& g, int64_t lda, int64_t ldb) {
    // Stored row-major shapes: A (M, K) or (K, M) when trans_a; B (K, N) or (N, K) when trans_b.
    const int64_t a_rows = g.trans_a ? g.K : g.M, a_cols = g.trans_a ? g.M : g.K;
    const int64_t b_rows = g.trans_b ? g.N : g.K, b_cols = g.trans_b ? g.K : g.N;
    // B's memory read column-major is B^T as stored: (N, K) = op(B)^T as it is unless B is stored
    // (N, K), when it must be transposed; the same for A and op(A)^T (K, M).
    return {g.N,
            g.M,
            g.K,
            {b_cols, b_rows, ldb, g.trans_b},
            {a_cols, a_rows, lda, g.trans_a},
            {g.N, g.M, g.ldc, false}};
}

}  // namespace kiln::kernels::cuda
