#pragma once
// Fused causal attention for bf16 products (flash attention): the bodies of attention.cu's three
// kernels, written once against an executor, so that test_kernel_math.cpp replays them block by
// block on the host over the same grid and compares them with the reference backend on every CI
// run. Only the executor's tile products (tensor cores on the device) and its barrier differ.
//
// A block owns kTile = 64 rows of one head, queries (forward, dq) or keys (dkdv), and walks the
// tiles of the other side that the causal mask leaves, in the block's shared memory: no T x T
// square exists anywhere, and the saved activation is a row's log-sum-exp (beside the output).
//   forward (b, h, query tile): for each key tile up to the diagonal, s = q k^T (a product); per
//     row the online softmax: the new max m', p = exp(s / sqrt(D) - m') (0 where masked), rounded
//     to bf16 as the product reads it, l = l exp(m - m') + sum p, the output row scaled by
//     exp(m - m'); then o += p v (a product). At the end out = o / l in bf16, lse = m + log l.
//   dq (b, h, query tile): rowdot = sum_d dout out per row (both in bf16, out the forward's);
//     for each key tile up to the diagonal, s = q k^T and dp = dout v^T, per row
//     p = exp(s / sqrt(D) - lse) and ds = p (dp - rowdot) / sqrt(D) in bf16, then dq += ds k.
//     It writes rowdot for dkdv.
//   dkdv (b, kv head, key tile): for each query head of the group and each query tile from the
//     diagonal on, the same p and ds, then dv += p^T dout, and dk += ds^T q with ds in the tile
//     p was in (ds kept in f32 over the scores until then).
// Every gradient row is written once, by the one block that owns it: no atomics, the same bits
// every run. The backward recomputes s and dp in both passes, the price of that determinism.
//
// The executor X of a block:
//   x.each(n, f)     f(i) for i in [0, n), spread over the block's threads; then, the tile
//                    copies it made (copy_chunk) landed, the barrier
//   x.product<ACol, BCol>(c, ldc, a, lda, b, ldb, n, k, accumulate)
//                    c (kTile x n, f32) = a b, or += with accumulate, a (kTile x k) and b (k x n)
//                    bf16 tiles of the block's memory, row-major, or with Col the transposed view
//                    of a row-major tile (element (i, j) at j * ld + i); f32 sums; then the
//                    barrier. n and k are multiples of 16.
#include <cstring>
#include <type_traits>

#include "kernels/cuda/attention_math.h"

#if defined(__CUDACC__)
#define KILN_BLOCK __device__ __forceinline__
#else
#define KILN_BLOCK inline
#endif

namespace kiln::kernels::cuda {

constexpr int kTile = 64;
constexpr int kFlashThreads = 128;  // 4 warps, each a 16-row strip of every product
constexpr int kFlashMaxHead = 128;

// Whether attention in this precision and shape runs fused; otherwise the products rung
// (attention_products.h), which also keeps f32 exact.
inline bool flash_attention(const Attention& a, Precision precision) {
    return precision == Precision::bf16 && a.D % 16 == 0 && a.D <= kFlashMaxHead;
}

enum class FlashPass { forward, dq, dkdv };

// The tiles of one block's shared memory, for head size D. Rows are padded (8 bf16, 4 f32) so
// that rows start on different banks, and every tile starts 128-byte aligned as the tensor
// cores' loads ask.
struct FlashTiles {
    int ldh = 0, ldp = 0, lds = 0,
        ldo = 0;  // strides: (row, D) bf16, (row, key) bf16 and f32, (row, D) f32
    uint16_t *q = nullptr, *k = nullptr, *v = nullptr, *dout = nullptr, *p = nullptr, *ds = nullptr;
    float *s = nullptr, *dp = nullptr, *acc = nullptr, *acc2 = nullptr;
    float *m = nullptr, *l = nullptr, *mnew = nullptr, *alpha = nullptr, *pmax = nullptr,
          *psum = nullptr, *lse = nullptr, *rowdot = nullptr;

    // Lays the pass's tiles out from `base` (nullptr: only counts); returns the bytes.
    KILN_HD size_t place(char* base, int64_t D, FlashPass pass) {
        const bool fwd = pass == FlashPass::forward, dkdv = pass == FlashPass::dkdv;
        // dkdv keeps its two f32 score tiles unpadded and its ds in p's tile (see
        // flash_dkdv_block): 114,176 bytes at D = 64, so two blocks fit an SM of 228 KB (each
        // block reserves 1 KB) where one did at 125,440.
        ldh = int(D) + 8, ldp = kTile + 8, lds = dkdv ? kTile : kTile + 4, ldo = int(D) + 4;
        size_t at = 0;
        auto take = [&](auto*& ptr, size_t elements, bool needed) {
            using T = std::remove_reference_t<decltype(*ptr)>;
            if (!needed)
                return;
            ptr = base ? reinterpret_cast<T*>(base + at) : nullptr;
            at += (elements * sizeof(T) + 127) / 128 * 128;
        };
        take(q, size_t(kTile) * ldh, true);
        take(k, size_t(kTile) * ldh, true);
        take(v, size_t(kTile) * ldh, true);
        take(dout, size_t(kTile) * ldh, !fwd);
        take(p, size_t(kTile) * ldp, fwd || dkdv);
        take(ds, size_t(kTile) * ldp, pass == FlashPass::dq);
        take(s, size_t(kTile) * lds, true);
        take(dp, size_t(kTile) * lds, !fwd);
        take(acc, size_t(kTile) * ldo, true);
        take(acc2, size_t(kTile) * ldo, dkdv);
        take(m, kTile, fwd);
        take(l, kTile, fwd);
        take(mnew, kTile, fwd);
        take(alpha, kTile, fwd);
        take(pmax, 2 * kTile, fwd);
        take(psum, 2 * kTile, fwd);
        take(lse, kTile, !fwd);
        take(rowdot, kTile, !fwd);
        return at;
    }
};

// The block of a grid of B x heads x ceil(T / kTile): sequence b, head h, and the first row of
// its tile, the tiles with the most work (the last queries, the first keys) first.
struct FlashBlock {
    int64_t b, h, row0;
    KILN_HD FlashBlock(const Attention& a, int64_t heads, int64_t block, bool last_first) {
        const int64_t tiles = (a.T + kTile - 1) / kTile, tile = block % tiles;
        b = block / tiles / heads, h = block / tiles % heads;
        row0 = (last_first ? tiles - 1 - tile : tile) * kTile;
    }
};

KILN_HD int tile_rows(const Attention& a, int64_t row0) {
    return int(a.T - row0 < kTile ? a.T - row0 : kTile);
}

// Keys k0 .. k0 + kTile of which query row r of the tile at q0 sees the first `visible` (causal);
// rows past the sequence see none.
KILN_HD int visible_keys(int r, int rows, int64_t q0, int64_t k0) {
    if (r >= rows)
        return 0;
    const int64_t n = q0 + r - k0 + 1;
    return int(n < 0 ? 0 : n > kTile ? kTile : n);
}

// Forward, the online softmax step (see the top), by the whole block: each row's keys are split
// between two threads, thread i taking row i / 2's keys c = i % 2, i % 2 + 2, ... (interleaved,
// so a warp's reads of the scores spread over the banks), in two phases, then a third with the
// output's rescaling:
// 1. pmax[i]: the max of thread i's visible scaled scores (-inf for none).
KILN_HD void flash_pair_max(const FlashTiles& s, int i, int visible, float scale) {
    const float* sr = s.s + i / 2 * s.lds;
    float mx = -INFINITY;
    for (int c = i % 2; c < visible; c += 2)
        mx = fmaxf(mx, sr[c] * scale);
    s.pmax[i] = mx;
}

// 2. The row's new max m' = max(m, both threads' maxima); p = exp(s / sqrt(D) - m') for thread
// i's keys (0 where masked), rounded to bf16 as the product reads them, and psum[i] their sum
// (the weights the product sums, so that they sum to 1 after / l). The pair's first also keeps
// m' and the output's factor exp(m - m') (0 on the first tile, where m = -inf; 1 for a row that
// sees none of the tile).
KILN_HD void flash_pair_exp(const FlashTiles& s, int i, int visible, float scale) {
    const int r = i / 2;
    const float* sr = s.s + r * s.lds;
    uint16_t* pr = s.p + r * s.ldp;
    const float mx = fmaxf(s.m[r], fmaxf(s.pmax[2 * r], s.pmax[2 * r + 1]));
    float sum = 0.0f;
    for (int c = i % 2; c < kTile; c += 2) {
        const uint16_t p = c < visible ? bf16_round(expf(sr[c] * scale - mx)) : uint16_t(0);
        pr[c] = p;
        sum += bf16_widen(p);
    }
    s.psum[i] = sum;
    if (i % 2 == 0) {
        s.mnew[r] = mx;
        s.alpha[r] = visible > 0 ? expf(s.m[r] - mx) : 1.0f;
    }
}

// 3. Element i of the output tile (rows of D) scaled by its row's factor; a row's first element
// also moves the row on: l = l exp(m - m') + the pair's sums, m = m'.
KILN_HD void flash_rescale(const FlashTiles& s, int64_t D, int i) {
    const int r = int(i / D), d = int(i % D);
    s.acc[r * s.ldo + d] *= s.alpha[r];
    if (d == 0) {
        s.l[r] = s.l[r] * s.alpha[r] + s.psum[2 * r] + s.psum[2 * r + 1];
        s.m[r] = s.mnew[r];
    }
}

// Backward, element (r, c) of the scores and dp tiles: p and ds = p (dp - rowdot) / sqrt(D).
KILN_HD float flash_p_at(const FlashTiles& s, int r, int c, int visible, float scale) {
    return c < visible ? expf(s.s[r * s.lds + c] * scale - s.lse[r]) : 0.0f;
}
KILN_HD float flash_ds_of(const FlashTiles& s, float p, int r, int c, float scale) {
    return p * (s.dp[r * s.lds + c] - s.rowdot[r]) * scale;
}
// dq: ds in bf16, as the product reads it.
KILN_HD void flash_ds_at(const FlashTiles& s, int r, int c, int visible, float scale) {
    const float p = flash_p_at(s, r, c, visible, scale);
    s.ds[r * s.ldp + c] = bf16_round(flash_ds_of(s, p, r, c, scale));
}
// dkdv: p in bf16 for dv's product, and ds in f32 over the score it came from, until dv's product
// has read p and ds may take p's tile (flash_ds_into_p).
KILN_HD void flash_p_and_ds_at(const FlashTiles& s, int r, int c, int visible, float scale) {
    const float p = flash_p_at(s, r, c, visible, scale);
    s.p[r * s.ldp + c] = bf16_round(p);
    s.s[r * s.lds + c] = flash_ds_of(s, p, r, c, scale);
}
KILN_HD void flash_ds_into_p(const FlashTiles& s, int r, int c) {
    s.p[r * s.ldp + c] = bf16_round(s.s[r * s.lds + c]);
}

// Tiles load in chunks of 8 bf16 (16 bytes: one vector copy on the device; every row offset in
// qkv, dout and a tile is a multiple of 8 elements, D being one of 16).
constexpr int kChunk = 8;

// From sm_80 the copy is asynchronous (cp.async, global to shared without a register): a
// thread's copies of a phase are all in flight at once, instead of each load waiting for the
// store before it (the compiler cannot move a load above a store that may alias it). The
// device executor's `each` waits for them before its barrier, so a phase's tiles are whole
// after it, as with plain copies.
KILN_HD void copy_chunk(uint16_t* dst, const uint16_t* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const auto to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(src) : "memory");
#elif defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
    std::memcpy(dst, src, kChunk * sizeof(uint16_t));
#endif
}

// Chunk i of a tile's rows: row r = i / (D / 8), elements [d, d + 8). tile_chunk copies it from
// the head vectors of rows m0 + r (offsets at(m) in src), zeros past n rows; zero_chunk clears
// it in an f32 tile.
struct Chunk {
    int r, d;
    KILN_HD Chunk(int64_t D, int i) : r(i / int(D / kChunk)), d(i % int(D / kChunk) * kChunk) {}
};
template <typename At>
KILN_HD void tile_chunk(uint16_t* tile, int ld, const uint16_t* src, int64_t D, int n, int64_t m0,
                        At at, int i) {
    const Chunk c(D, i);
    if (c.r < n) {
        copy_chunk(tile + c.r * ld + c.d, src + at(m0 + c.r) + c.d);
    } else {
        for (int j = 0; j < kChunk; j++)
            tile[c.r * ld + c.d + j] = 0;
    }
}
KILN_HD void zero_chunk(float* tile, int ld, int64_t D, int i) {
    const Chunk c(D, i);
    for (int j = 0; j < kChunk; j++)
        tile[c.r * ld + c.d + j] = 0.0f;
}

// A phase: the key and value tiles, rows m0 .. m0 + kTile (n of them in the sequence) of the kv
// head that query head h reads.
template <typename X>
KILN_BLOCK void load_keys_values(X& x, const FlashTiles& s, const Attention& a,
                                 const uint16_t* qkv16, int n, int64_t m0, int64_t h) {
    x.each(kTile * int(a.D) / kChunk, [&](int i) {
        tile_chunk(
            s.k, s.ldh, qkv16, a.D, n, m0, [&](int64_t m) { return k_at(a, m, h); }, i);
        tile_chunk(
            s.v, s.ldh, qkv16, a.D, n, m0, [&](int64_t m) { return v_at(a, m, h); }, i);
    });
}

// qkv16: the rotated qkv (M, ldqkv) in bf16. out (M, H*D) in bf16, which the backward reads
// too; lse (B, H, T).
template <typename X>
KILN_BLOCK void flash_forward_block(X& x, const FlashTiles& s, const Attention& a,
                                    const uint16_t* qkv16, uint16_t* out, float* lse,
                                    const FlashBlock& at) {
    const int64_t D = a.D, HD = a.H * a.D, q0 = at.row0, m0 = at.b * a.T;
    const int rows = tile_rows(a, q0);
    const float scale = attention_scale(a);
    const int chunks = kTile * int(D) / kChunk;
    x.each(chunks, [&](int i) {
        tile_chunk(
            s.q, s.ldh, qkv16, D, rows, m0 + q0, [&](int64_t m) { return q_at(a, m, at.h); }, i);
        zero_chunk(s.acc, s.ldo, D, i);
        if (i < kTile)
            s.m[i] = -INFINITY, s.l[i] = 0.0f;
    });
    for (int64_t k0 = 0; k0 < q0 + rows; k0 += kTile) {
        const int cols = tile_rows(a, k0);
        load_keys_values(x, s, a, qkv16, cols, m0 + k0, at.h);
        x.template product<false, true>(s.s, s.lds, s.q, s.ldh, s.k, s.ldh, kTile, int(D), false);
        x.each(2 * kTile,
               [&](int i) { flash_pair_max(s, i, visible_keys(i / 2, rows, q0, k0), scale); });
        x.each(2 * kTile,
               [&](int i) { flash_pair_exp(s, i, visible_keys(i / 2, rows, q0, k0), scale); });
        x.each(kTile * int(D), [&](int i) { flash_rescale(s, D, i); });
        x.template product<false, false>(s.acc, s.ldo, s.p, s.ldp, s.v, s.ldh, int(D), kTile, true);
    }
    x.each(kTile * int(D), [&](int i) {
        const int r = int(i / D), d = int(i % D);
        if (r >= rows)
            return;
        const int64_t o = (m0 + q0 + r) * HD + at.h * D + d;
        store(out + o, s.acc[r * s.ldo + d] / s.l[r]);
        if (d == 0)
            lse[(at.b * a.H + at.h) * a.T + q0 + r] = s.m[r] + logf(s.l[r]);
    });
}

// Row r of the block's gradient tile t (f32, row stride ld), the gradient of the row of qkv at
// `at` (row m, its head at column at): into grad (f32 or bf16), rotated back when `a` has rope
// tables (`rotate`: a query or key head), as rotated_at rotates a whole gradient back.
template <typename Grad>
KILN_HD void flash_gradient_row(Grad* grad, int64_t at, const float* t, const Attention& a,
                                int64_t m, bool rotate, int d) {
    const bool turn = rotate && a.rope_cos;
    const int64_t table_row = turn ? (m % a.T) * (a.D / 2) : 0;
    rotated_at(grad + at, t, d, turn ? 1 : 0, int(a.D), turn ? a.rope_cos + table_row : nullptr,
               turn ? a.rope_sin + table_row : nullptr, -1.0f);
}

// The query rows' gradient into grad (M, ldqkv; f32 or bf16), rotated back; rowdot (B, H, T)
// written for dkdv. dout16 is dout (M, H*D) in bf16, which with the forward's output out16 also
// gives rowdot.
template <typename X, typename Grad>
KILN_BLOCK void flash_dq_block(X& x, const FlashTiles& s, const Attention& a, const uint16_t* qkv16,
                               const uint16_t* dout16, const uint16_t* out16, const float* lse,
                               float* rowdot, Grad* grad, const FlashBlock& at) {
    const int64_t D = a.D, HD = a.H * a.D, q0 = at.row0, m0 = at.b * a.T;
    const int64_t row_at = (at.b * a.H + at.h) * a.T + q0;
    const int rows = tile_rows(a, q0);
    const float scale = attention_scale(a);
    auto out_at = [&](int64_t m) { return m * HD + at.h * D; };
    const int chunks = kTile * int(D) / kChunk;
    x.each(chunks, [&](int i) {
        tile_chunk(
            s.q, s.ldh, qkv16, D, rows, m0 + q0, [&](int64_t m) { return q_at(a, m, at.h); }, i);
        tile_chunk(s.dout, s.ldh, dout16, D, rows, m0 + q0, out_at, i);
        zero_chunk(s.acc, s.ldo, D, i);
    });
    x.each(kTile, [&](int r) {
        float dot = 0.0f;
        if (r < rows) {
            const int64_t o = out_at(m0 + q0 + r);
            for (int64_t d = 0; d < D; d++)
                dot += load(dout16 + o + d) * load(out16 + o + d);
            rowdot[row_at + r] = dot;
        }
        s.rowdot[r] = dot;
        s.lse[r] = r < rows ? lse[row_at + r] : 0.0f;
    });
    for (int64_t k0 = 0; k0 < q0 + rows; k0 += kTile) {
        const int cols = tile_rows(a, k0);
        load_keys_values(x, s, a, qkv16, cols, m0 + k0, at.h);
        x.template product<false, true>(s.s, s.lds, s.q, s.ldh, s.k, s.ldh, kTile, int(D), false);
        x.template product<false, true>(s.dp, s.lds, s.dout, s.ldh, s.v, s.ldh, kTile, int(D),
                                        false);
        x.each(kTile * kTile, [&](int i) {
            flash_ds_at(s, i / kTile, i % kTile, visible_keys(i / kTile, rows, q0, k0), scale);
        });
        x.template product<false, false>(s.acc, s.ldo, s.ds, s.ldp, s.k, s.ldh, int(D), kTile,
                                         true);
    }
    x.each(kTile * int(D), [&](int i) {
        const int r = int(i / D), d = int(i % D);
        const int64_t m = m0 + q0 + r;
        if (r < rows)
            flash_gradient_row(grad, q_at(a, m, at.h), s.acc + r * s.ldo, a, m, true, d);
    });
}

// The key and value rows' gradient of kv head at.h into grad (f32 or bf16), summed over the
// group's query heads in order, the keys' rotated back; lse and rowdot (B, H, T) as the forward
// and dq left them.
template <typename X, typename Grad>
KILN_BLOCK void flash_dkdv_block(X& x, const FlashTiles& s, const Attention& a,
                                 const uint16_t* qkv16, const uint16_t* dout16, const float* lse,
                                 const float* rowdot, Grad* grad, const FlashBlock& at) {
    const int64_t D = a.D, HD = a.H * a.D, k0 = at.row0, m0 = at.b * a.T, G = a.H / a.Hkv;
    const int cols = tile_rows(a, k0);
    const float scale = attention_scale(a);
    const int64_t h0 =
        at.h * G;  // the group's first query head, whose k_at / v_at are the kv head's
    const int chunks = kTile * int(D) / kChunk;
    load_keys_values(x, s, a, qkv16, cols, m0 + k0, h0);
    x.each(chunks, [&](int i) {
        zero_chunk(s.acc, s.ldo, D, i);
        zero_chunk(s.acc2, s.ldo, D, i);
    });
    for (int64_t h = h0; h < h0 + G; h++) {
        for (int64_t q0 = k0; q0 < a.T; q0 += kTile) {
            const int rows = tile_rows(a, q0);
            const int64_t row_at = (at.b * a.H + h) * a.T + q0;
            x.each(chunks, [&](int i) {
                tile_chunk(
                    s.q, s.ldh, qkv16, D, rows, m0 + q0, [&](int64_t m) { return q_at(a, m, h); },
                    i);
                tile_chunk(
                    s.dout, s.ldh, dout16, D, rows, m0 + q0,
                    [&](int64_t m) { return m * HD + h * D; }, i);
                if (i < kTile) {
                    s.lse[i] = i < rows ? lse[row_at + i] : 0.0f;
                    s.rowdot[i] = i < rows ? rowdot[row_at + i] : 0.0f;
                }
            });
            x.template product<false, true>(s.s, s.lds, s.q, s.ldh, s.k, s.ldh, kTile, int(D),
                                            false);
            x.template product<false, true>(s.dp, s.lds, s.dout, s.ldh, s.v, s.ldh, kTile, int(D),
                                            false);
            x.each(kTile * kTile, [&](int i) {
                flash_p_and_ds_at(s, i / kTile, i % kTile, visible_keys(i / kTile, rows, q0, k0),
                                  scale);
            });
            x.template product<true, false>(s.acc2, s.ldo, s.p, s.ldp, s.dout, s.ldh, int(D), kTile,
                                            true);
            x.each(kTile * kTile, [&](int i) { flash_ds_into_p(s, i / kTile, i % kTile); });
            x.template product<true, false>(s.acc, s.ldo, s.p, s.ldp, s.q, s.ldh, int(D), kTile,
                                            true);
        }
    }
    x.each(kTile * int(D), [&](int i) {
        const int r = int(i / D), d = int(i % D);
        const int64_t m = m0 + k0 + r;
        if (r < cols) {
            flash_gradient_row(grad, k_at(a, m, h0), s.acc + r * s.ldo, a, m, true, d);
            flash_gradient_row(grad, v_at(a, m, h0), s.acc2 + r * s.ldo, a, m, false, d);
        }
    });
}

}  // namespace kiln::kernels::cuda
