#pragma once
// The CUDA backend's ops: those of the Kernels table, with the table's signatures and contracts
// (table.h) on device pointers, their arithmetic in kernel_math.h and attention_math.h;
// cuda_kernels() assembles them into the table.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "kernels/cuda/sizes.h"
#include "kernels/table.h"

namespace kiln::kernels {
// The CUDA table in a precision (table.h); its memory is the current device's.
const Kernels& cuda_kernels(Precision precision);
}  // namespace kiln::kernels

namespace kiln::kernels::cuda {

// The table cuda_kernels() hands out: this, unless KILN_CUDA_PROFILE names a file (profile_path),
// then profiled_kernels(): the same ops, each marked by events on the stream, their device time
// summed per op (the products per shape) into that file at every `wait` (profile.cu).
const Kernels& unprofiled_kernels(Precision precision);
const char* profile_path();  // KILN_CUDA_PROFILE, or null
const Kernels& profiled_kernels(Precision precision, const std::string& path);

int device_count();  // 0 when there is no usable device or driver
// Why device_count() is 0: the runtime's reason (a driver older than this CUDA, no driver), or
// that it found no device. Empty while devices are found.
std::string no_device_reason();
void set_device(int device);  // the current device of this process, before any allocation
int64_t device_memory_bytes(int device);  // its total memory
// The current GPU's name, compute capability, driver and CUDA runtime and cuBLASLt versions.
std::string device_platform();

// Device memory, 256-byte aligned, zero-filled; out of memory is an Error naming the config keys
// that shrink a rank's share.
extern const Memory device_memory;
extern const Memory pinned_memory;                    // page-locked host memory, for staging copies
void copy(void* dst, const void* src, size_t bytes);  // either side host or device
void zero(void* dst, size_t bytes);
void widen(float* dst, const uint16_t* src, int64_t n);
void add(float* y, const float* a, const float* b, int64_t n);
void slice_ids(int32_t* local, float* weight, const int32_t* ids, int64_t n, int64_t begin,
               int64_t count, float value);
void rescale_sumexp(float* sumexp, const float* local_max, const float* max, int64_t M);
void row_losses(float* losses, const float* max, const float* sumexp, const float* target_logit,
                const int32_t* targets, int64_t M);
// Each block's double partial accumulated over the ranges in order, summed on the host in block
// order: one wait.
double sum_squares(const float* x, const std::vector<Range>& ranges);
void sum_into(double* total, const float* x, int64_t n);  // one block, queued
void wait();                                              // for the stream's queued work
// The stream's work recorded as a CUDA graph (Kernels::record), captured from the calling thread,
// instantiated, and launched on the stream by replay(). While it records, the legacy stream is
// unusable (the stream is a blocking one): no other thread may queue work there, as NCCL's
// collectives do (dist/nccl_comm.cpp); the trainer records none while one may run.
void* record(const std::function<void()>& work);
void replay(void* graph);
void release(void* graph);

// Each call queues its work on the process's one stream (launch.h) and returns, converting a
// launch failure into KILN_CUDA's check; the host waits only where it reads or lends memory
// (copy() with a host side, sum_squares()), or after every launch with KILN_CUDA_SYNC=1.
// Pointers are device memory; the host-side scalars (AdamWStep) are not.
void embedding_forward(float* out, const int32_t* tokens, const void* wte, DType wte_type,
                       int64_t M, int64_t C);
void embedding_backward(float* dwte, const float* dout, const int32_t* tokens, int64_t M,
                        int64_t C);
void rmsnorm_forward(void* out, DType out_type, float* rstd, const float* x, const float* w,
                     int64_t M, int64_t C, float eps);
void rmsnorm_backward(float* dx, uint16_t* dx_bf16, float* dw, const float* dout, const float* x,
                      const float* w, const float* rstd, int64_t M, int64_t C);
void swiglu_forward(void* h, DType h_type, const void* gu, DType in_type, int64_t M, int64_t F);
void swiglu_backward(void* dgu, DType dgu_type, const void* dh, const void* gu, DType in_type,
                     int64_t M, int64_t F);
void logit_stats(const float* logits, const int32_t* targets, int64_t M, int64_t V, float* max,
                 float* sumexp, float* target_logit);
void cross_entropy_backward(const float* logits, const int32_t* targets, const float* max,
                            const float* sumexp, const float* row_scale, int64_t M, int64_t V,
                            void* dlogits, DType dlogits_type);
void cross_entropy(const float* logits, const int32_t* targets, const float* row_scale, int64_t M,
                   int64_t V, float* losses, void* dlogits, DType dlogits_type);
void adamw(float* p, uint16_t* p_bf16, float* m, float* v, const float* g, int64_t n,
           const AdamWStep& s);
void to_bf16(uint16_t* dst, const float* src, int64_t n);

// Matrix products through cuBLASLt, with the Gemm contract of ops.h: bf16 products with fp32
// accumulation under Precision::bf16 (f32 operands rounded to bf16 in the workspace first), fp32
// throughout under Precision::fp32 (bf16 operands widened). `ws` is device memory of at least
// gemm_workspace_bytes(max elements of one operand) (sizes.h), 256-byte aligned.
void gemm(const Gemm& g, Precision precision, Workspace ws);
// Autotuning of those products, with the table's contract (table.h): among the algorithms
// cuBLASLt's heuristic ranks first for a shape, those with the default's bits, each timed.
void tune(int part, int parts);
bool tune_next();
Plan tuned();
void use(const Plan& plan);

// Causal attention with the contract of the table's entries (table.h, ops.h; rope_cos/rope_sin
// device pointers when set), the precision choosing the dtype the products read and `out` is
// in. Fused where flash_attention(a, precision) (attention_flash.h): `saved` keeps each row's
// log-sum-exp; otherwise the probabilities in the compute dtype (attention_saved_bytes). `ws`
// is device memory of attention_workspace_bytes(a, precision) (sizes.h).
void attention_forward(void* out, void* saved, const void* qkv, DType in_type, const Attention& a,
                       Precision precision, Workspace ws);
void attention_backward(void* dqkv, DType dqkv_type, const void* dout, const void* out,
                        const void* qkv, DType in_type, const void* saved, const Attention& a,
                        Precision precision, Workspace ws);

// Rotary embedding in place on the first n_heads heads (of D) of each row of x (M, ld), as the
// Attention contract in ops.h defines it (rope_cos/rope_sin (T, D/2)); inverse rotates back,
// which is the backward on gradients.
void rope(float* x, int64_t ld, int64_t M, int64_t T, int64_t n_heads, int64_t D,
          const float* rope_cos, const float* rope_sin, bool inverse);

}  // namespace kiln::kernels::cuda
