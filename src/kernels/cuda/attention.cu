// Causal attention on CUDA. bf16 with a head size of at most 128 in steps of 16 runs fused
// (attention_flash.h): three kernels whose tiles stay in shared memory, their products on the
// tensor cores through WMMA. Otherwise, and always in f32 (exact products), the products rung:
// every (sequence, head) pair's products through cuBLASLt (attention_products.h), with one block
// per query row for the masked softmax and its backward (attention_math.h) in between. The
// products read bf16 copies of their operands in bf16, made once per call; queries and keys are
// rotated on the way into that copy (in f32, into a copy in the workspace), and their gradients
// rotated back on the way out: by the fused kernels as they write each gradient row, otherwise
// into a bf16 gradient, or in place in an f32 one.
// KILN_CUDA_ATTENTION=cudnn runs the fused shapes through cuDNN's fused attention instead
// (cudnn_attention.h), on the same rotated bf16 copy, into the same bf16 output and log-sum-exp.
#include <cuda_bf16.h>
#include <mma.h>

#include <type_traits>

#include "kernels/cuda/attention_flash.h"
#include "kernels/cuda/attention_products.h"
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cudnn_attention.h"
#include "kernels/cuda/launch.h"

namespace kiln::kernels::cuda {
namespace {

// The workspace carved as attention_scratch (sizes.h) lays it out.
struct Scratch {
    float *rotated, *grad, *scores, *rowdot = nullptr;
    uint16_t *qkv16 = nullptr, *dout16 = nullptr, *ds16 = nullptr;
    Workspace products;

    Scratch(Workspace ws, const Attention& a, Precision p) {
        const AttentionScratch sizes = attention_scratch(a, p);
        KILN_CHECK(ws.bytes >= sizes.total(), "attention workspace of {} bytes, {} needed",
                   ws.bytes, sizes.total());
        char* parts[AttentionScratch::kParts];
        char* at = static_cast<char*>(ws.ptr);
        for (int i = 0; i < AttentionScratch::kParts; i++) {
            parts[i] = sizes.parts[size_t(i)] ? at : nullptr;
            at += sizes.parts[size_t(i)];
        }
        rotated = reinterpret_cast<float*>(parts[0]);
        grad = reinterpret_cast<float*>(parts[1]);
        scores = reinterpret_cast<float*>(parts[2]);
        qkv16 = reinterpret_cast<uint16_t*>(parts[3]);
        dout16 = reinterpret_cast<uint16_t*>(parts[4]);
        ds16 = reinterpret_cast<uint16_t*>(parts[5]);
        rowdot = reinterpret_cast<float*>(parts[6]);
        products = {at, sizes.products};
    }
};

template <typename Out>
__global__ void convert_kernel(Out* dst, const float* src, int64_t n) {
    for (int64_t i = first_index(); i < n; i += stride())
        store(dst + i, src[i]);
}

// dst (n) = src in dst's dtype: src itself in f32, else a bf16 copy into `copy`.
const void* as_operand(const float* src, int64_t n, uint16_t* copy) {
    if (!copy)
        return src;
    convert_kernel<<<element_blocks(n), kElementThreads, 0, stream()>>>(copy, src, n);
    finish_launch();
    return copy;
}

template <typename P>
__global__ void softmax_kernel(P* probs, float* scores, Attention a) {
    const QueryRow r(a, blockIdx.x);
    float* s = scores + int64_t(blockIdx.x) * a.T;
    const float mx =
        block_reduce(attention_row_max(s, r.t, threadIdx.x, blockDim.x), -INFINITY, Max{});
    const float sum = block_reduce(attention_exp(s, r.t, mx, threadIdx.x, blockDim.x), 0.0f, Sum{});
    attention_store_probs(probs + int64_t(blockIdx.x) * a.T, s, a.T, r.t, sum, threadIdx.x,
                          blockDim.x);
}

template <typename P, typename Out>
__global__ void softmax_backward_kernel(Out* ds, const float* dp, const P* probs, Attention a) {
    const QueryRow r(a, blockIdx.x);
    const int64_t row = int64_t(blockIdx.x) * a.T;
    const float rowdot = block_reduce(
        attention_rowdot(dp + row, probs + row, r.t, threadIdx.x, blockDim.x), 0.0f, Sum{});
    attention_ds_row(ds + row, dp + row, probs + row, a.T, r.t, rowdot, attention_scale(a),
                     threadIdx.x, blockDim.x);
}

// attention_products.h's executor on the device; P is the probabilities' dtype.
template <typename P>
struct Device {
    const Attention& a;
    Precision precision;
    Workspace products;

    unsigned rows() const { return static_cast<unsigned>(a.B * a.H * a.T); }
    void gemm(const Gemm& g) { cuda::gemm(g, precision, products); }
    void softmax(void* probs, float* scores) {
        softmax_kernel<P><<<rows(), kRowThreads, 0, stream()>>>(static_cast<P*>(probs), scores, a);
        finish_launch();
    }
    void softmax_backward(void* ds, float* dp, const void* probs) {
        const P* p = static_cast<const P*>(probs);
        if (ds == dp) {
            softmax_backward_kernel<P, float><<<rows(), kRowThreads, 0, stream()>>>(dp, dp, p, a);
        } else {
            softmax_backward_kernel<P, uint16_t>
                <<<rows(), kRowThreads, 0, stream()>>>(static_cast<uint16_t*>(ds), dp, p, a);
        }
        finish_launch();
    }
};

template <typename Out, typename In>
__global__ void rotated_kernel(Out* dst, const In* x, int64_t M, int ld, int64_t T, int n_heads,
                               int D, const float* cos_table, const float* sin_table, float sign) {
    for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {  // a row a block
        const int64_t table_row = n_heads > 0 ? (m % T) * (D / 2) : 0;
        for (int col = threadIdx.x; col < ld; col += blockDim.x)
            rotated_at(dst + m * ld, x + m * ld, col, n_heads, D, cos_table + table_row,
                       sin_table + table_row, sign);
    }
}

// x (M, ldqkv) into dst in one pass, its queries' and keys' heads rotated by `a`'s rope tables
// (sign -1: back, for gradients) when it has them, else only converted.
template <typename Out, typename In>
void rotate_into(Out* dst, const In* x, const Attention& a, float sign) {
    const int64_t M = a.B * a.T;
    const int heads = a.rope_cos ? int(a.H + a.Hkv) : 0;
    const unsigned blocks = unsigned(std::min<int64_t>(std::max<int64_t>(M, 1), 65535));
    rotated_kernel<Out, In><<<blocks, kElementThreads, 0, stream()>>>(
        dst, x, M, int(a.ldqkv), a.T, heads, int(a.D), a.rope_cos, a.rope_sin, sign);
    finish_launch();
}

// What the products read of qkv (of `type`): its bf16 copy in bf16; in f32 qkv itself, or a
// rotated (or widened) copy in the workspace when `a` has rope tables (or qkv is bf16).
const void* qkv_operand(const void* qkv, DType type, const Attention& a, const Scratch& s) {
    if (!s.qkv16 && !a.rope_cos && type == DType::f32)
        return qkv;
    typed(qkv, type, [&](const auto* x) {
        if (s.qkv16)
            rotate_into(s.qkv16, x, a, 1.0f);
        else
            rotate_into(s.rotated, x, a, 1.0f);
    });
    return s.qkv16 ? static_cast<const void*>(s.qkv16) : s.rotated;
}

// attention_flash.h's executor on the device: the block's threads and barrier, and the tile
// products as WMMA bf16 16 x 16 x 16 steps with f32 accumulators, warp w taking rows
// [16 w, 16 w + 16) of every product. A warp holds all its n / 16 output tiles in registers and
// loads each 16 x 16 piece of its rows of `a` once for all of them (not once per output tile);
// each output tile still sums its k steps in order, so the bits are those of one tile at a time.
struct FlashDevice {
    static constexpr int kMaxTiles = std::max(kTile, kFlashMaxHead) / 16;  // n <= kTile or D

    template <typename F>
    __device__ void each(int n, F f) {
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            f(i);
#if __CUDA_ARCH__ >= 800
        asm volatile("cp.async.wait_all;\n" ::: "memory");  // copy_chunk's copies, if any
#endif
        __syncthreads();
    }
    template <bool ACol, bool BCol>
    __device__ void product(float* c, int ldc, const uint16_t* a, int lda, const uint16_t* b,
                            int ldb, int n, int k, bool accumulate) {
        namespace wmma = nvcuda::wmma;
        using ALayout = std::conditional_t<ACol, wmma::col_major, wmma::row_major>;
        using BLayout = std::conditional_t<BCol, wmma::col_major, wmma::row_major>;
        const auto* A = reinterpret_cast<const __nv_bfloat16*>(a);
        const auto* B = reinterpret_cast<const __nv_bfloat16*>(b);
        const int row = 16 * int(threadIdx.x / 32), tiles = n / 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> sum[kMaxTiles];
#pragma unroll
        for (int t = 0; t < kMaxTiles; t++) {
            if (t >= tiles)
                continue;
            if (accumulate)
                wmma::load_matrix_sync(sum[t], c + row * ldc + 16 * t, ldc, wmma::mem_row_major);
            else
                wmma::fill_fragment(sum[t], 0.0f);
        }
        for (int kk = 0; kk < k; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, ALayout> fa;
            wmma::load_matrix_sync(fa, A + (ACol ? kk * lda + row : row * lda + kk), lda);
#pragma unroll
            for (int t = 0; t < kMaxTiles; t++) {
                if (t >= tiles)
                    continue;
                const int j = 16 * t;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, BLayout> fb;
                wmma::load_matrix_sync(fb, B + (BCol ? j * ldb + kk : kk * ldb + j), ldb);
                wmma::mma_sync(sum[t], fa, fb, sum[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < kMaxTiles; t++) {
            if (t < tiles)
                wmma::store_matrix_sync(c + row * ldc + 16 * t, sum[t], ldc, wmma::mem_row_major);
        }
        __syncthreads();
    }
};

static_assert(kFlashThreads == 32 * kTile / 16, "a warp per 16 rows of a tile");

__device__ FlashTiles flash_tiles(const Attention& a, FlashPass pass) {
    extern __shared__ __align__(128) char tiles[];
    FlashTiles s;
    s.place(tiles, a.D, pass);
    return s;
}

__global__ void __launch_bounds__(kFlashThreads)
    flash_forward_kernel(Attention a, const uint16_t* qkv16, uint16_t* out, float* lse) {
    FlashDevice x;
    flash_forward_block(x, flash_tiles(a, FlashPass::forward), a, qkv16, out, lse,
                        FlashBlock(a, a.H, blockIdx.x, true));
}

template <typename G>
__global__ void __launch_bounds__(kFlashThreads)
    flash_dq_kernel(Attention a, const uint16_t* qkv16, const uint16_t* dout16,
                    const uint16_t* out16, const float* lse, float* rowdot, G* grad) {
    FlashDevice x;
    flash_dq_block(x, flash_tiles(a, FlashPass::dq), a, qkv16, dout16, out16, lse, rowdot, grad,
                   FlashBlock(a, a.H, blockIdx.x, true));
}

template <typename G>
__global__ void __launch_bounds__(kFlashThreads)
    flash_dkdv_kernel(Attention a, const uint16_t* qkv16, const uint16_t* dout16, const float* lse,
                      const float* rowdot, G* grad) {
    FlashDevice x;
    flash_dkdv_block(x, flash_tiles(a, FlashPass::dkdv), a, qkv16, dout16, lse, rowdot, grad,
                     FlashBlock(a, a.Hkv, blockIdx.x, false));
}

// Launches `kernel` over heads x B x tiles blocks with the pass's shared memory.
template <typename Kernel, typename... Args>
void launch_flash(Kernel kernel, FlashPass pass, int64_t heads, const Attention& a, Args... args) {
    const size_t shared = FlashTiles().place(nullptr, a.D, pass);
    KILN_CUDA(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)));
    const int64_t blocks = a.B * heads * ((a.T + kTile - 1) / kTile);
    kernel<<<unsigned(blocks), kFlashThreads, shared, stream()>>>(a, args...);
    finish_launch();
}

// cuDNN's plans for `a` where KILN_CUDA_ATTENTION=cudnn asks for them, the shape is one the own
// kernels fuse (the saved activation is their log-sum-exp) and cuDNN offers a plan; else null.
const CudnnAttention* cudnn_for(const Attention& a, Precision precision) {
    if (!flash_attention(a, precision) || !cudnn_attention_shape(a) || !cudnn_attention_requested())
        return nullptr;
    return cudnn_attention(a);
}

}  // namespace

void attention_forward(void* out, void* saved, const void* qkv, DType in_type, const Attention& a,
                       Precision precision, Workspace ws) {
    if (a.B * a.T == 0)
        return;
    const Scratch s(ws, a, precision);
    const DType ct = compute_dtype(precision);
    const void* x = qkv_operand(qkv, in_type, a, s);
    // The fused paths' saved activation is each row's log-sum-exp (sizes.h).
    auto* lse = static_cast<float*>(saved);
    if (const CudnnAttention* c = cudnn_for(a, precision)) {
        cudnn_attention_forward(*c, static_cast<const uint16_t*>(x), static_cast<uint16_t*>(out),
                                lse);
    } else if (flash_attention(a, precision)) {
        launch_flash(flash_forward_kernel, FlashPass::forward, a.H, a,
                     static_cast<const uint16_t*>(x), static_cast<uint16_t*>(out), lse);
    } else if (precision == Precision::bf16) {
        // The products' f32 output in the gradient's scratch (free until the backward), rounded.
        Device<uint16_t> device{a, precision, s.products};
        attention_products_forward(device, s.grad, saved, ct, x, ct, a, s.scores);
        as_operand(s.grad, a.B * a.T * a.H * a.D, static_cast<uint16_t*>(out));
    } else {
        Device<float> device{a, precision, s.products};
        attention_products_forward(device, static_cast<float*>(out), saved, ct, x, ct, a, s.scores);
    }
}

void attention_backward(void* dqkv, DType dqkv_type, const void* dout, const void* out,
                        const void* qkv, DType in_type, const void* saved, const Attention& a,
                        Precision precision, Workspace ws) {
    if (a.B * a.T == 0)
        return;
    const Scratch s(ws, a, precision);
    const DType ct = compute_dtype(precision);
    const int64_t M = a.B * a.T;
    const void* x = qkv_operand(qkv, in_type, a, s);
    // dout as the products read it: in bf16 its bf16 copy unless it is bf16 already; in f32
    // itself (a bf16 dout is widened by the products' own conversion).
    const bool own = !s.dout16 || in_type == DType::bf16;
    const void* dO =
        own ? dout : as_operand(static_cast<const float*>(dout), M * a.H * a.D, s.dout16);
    const DType dO_type = own ? in_type : DType::bf16;
    // An f32 gradient is written in place; a bf16 one goes through the f32 scratch.
    float* grad = dqkv_type == DType::f32 ? static_cast<float*>(dqkv) : s.grad;
    // ds: over dp itself in f32, a bf16 copy the products read in bf16.
    void* ds = s.ds16 ? static_cast<void*>(s.ds16) : static_cast<void*>(s.scores);
    const auto* lse = static_cast<const float*>(saved);  // on the fused paths
    if (const CudnnAttention* c = cudnn_for(a, precision)) {
        // cuDNN's bf16 gradient in the f32 scratch's first half, rotated back from there.
        auto* grad16 = reinterpret_cast<uint16_t*>(s.grad);
        cudnn_attention_backward(*c, static_cast<const uint16_t*>(x),
                                 static_cast<const uint16_t*>(out), lse,
                                 static_cast<const uint16_t*>(dO), grad16);
        if (dqkv_type == DType::bf16)
            rotate_into(static_cast<uint16_t*>(dqkv), grad16, a, -1.0f);
        else
            rotate_into(static_cast<float*>(dqkv), grad16, a, -1.0f);
        return;
    }
    if (flash_attention(a, precision)) {
        // Each gradient row written once, rotated back on the way out, in dqkv's dtype.
        const auto* x16 = static_cast<const uint16_t*>(x);
        const auto* dout16 = static_cast<const uint16_t*>(dO);
        const auto* out16 = static_cast<const uint16_t*>(out);
        auto run = [&](auto* g) {
            using G = std::remove_pointer_t<decltype(g)>;
            launch_flash(flash_dq_kernel<G>, FlashPass::dq, a.H, a, x16, dout16, out16, lse,
                         s.rowdot, g);
            launch_flash(flash_dkdv_kernel<G>, FlashPass::dkdv, a.Hkv, a, x16, dout16, lse,
                         static_cast<const float*>(s.rowdot), g);
        };
        if (dqkv_type == DType::bf16)
            run(static_cast<uint16_t*>(dqkv));
        else
            run(static_cast<float*>(dqkv));
        return;
    }
    if (precision == Precision::bf16) {
        Device<uint16_t> device{a, precision, s.products};
        attention_products_backward(device, grad, dO, dO_type, x, ct, saved, ct, a, s.scores, ds,
                                    ct);
    } else {
        Device<float> device{a, precision, s.products};
        attention_products_backward(device, grad, dO, dO_type, x, ct, saved, ct, a, s.scores, ds,
                                    ct);
    }
    // Back through the rotation, its inverse on the gradient: on the way into the bf16 gradient,
    // or in place.
    if (dqkv_type == DType::bf16)
        rotate_into(static_cast<uint16_t*>(dqkv), grad, a, -1.0f);
    else if (a.rope_cos)
        rope(grad, a.ldqkv, M, a.T, a.H + a.Hkv, a.D, a.rope_cos, a.rope_sin, true);
}

}  // namespace kiln::kernels::cuda
