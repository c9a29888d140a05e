#pragma once
// The collectives the training step needs, on one group of ranks, in training verbs. Implemented
// by dist/ (gloo over TCP for CPU tensors); model/ and optim/ call it without linking dist/, so a
// reader sees where communication happens. Every rank of the group must make the same calls in
// the same order with the same sizes. Buffers are host memory, float32 unless stated.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "core/dtype.h"

namespace kiln {

class Collective {
public:
    virtual ~Collective() = default;
    virtual int rank() const = 0;  // within this group
    virtual int size() const = 0;

    // data (n) = elementwise sum over the group, in place.
    virtual void all_reduce_sum(float* data, size_t n) = 0;
    virtual void all_reduce_sum(double* data, size_t n) = 0;
    // data (n) = elementwise maximum over the group, in place.
    virtual void all_reduce_max(float* data, size_t n) = 0;
    // data (size() * chunk): on return, chunk r (data + r*chunk .. +chunk) of rank r holds the sum
    // over the group of everyone's chunk r; the other chunks hold unspecified values. Callers
    // reduce the same buffer again and again; an implementation may keep state per buffer.
    virtual void reduce_scatter_sum(float* data, size_t chunk) = 0;
    // data (n): on return the root's holds the sum over the group of everyone's data; the
    // others' hold unspecified values. ZeRO-1 with overlap reduces each bucket of gradients to
    // the rank whose shard it lies in.
    virtual void reduce_sum(float* data, size_t n, int root) = 0;
    // The same sums of bf16 values (activations in the compute precision), each result rounded
    // to bf16. How the partial sums travel is the implementation's: NCCL carries bf16; this
    // default, for host memory, widens to f32, reduces that and rounds back (on one host the
    // conversions inside gloo's reductions measured slower than the f32 bytes they save).
    virtual void all_reduce_sum_bf16(uint16_t* data, size_t n) {
        if (size() == 1)
            return;
        float* wide = widened(data, n);
        all_reduce_sum(wide, n);
        convert_f32_to_bf16(data, wide, int64_t(n));
    }
    virtual void reduce_scatter_sum_bf16(uint16_t* data, size_t chunk) {
        if (size() == 1)
            return;
        float* wide = widened(data, chunk * size_t(size()));
        reduce_scatter_sum(wide, chunk);
        const size_t mine = size_t(rank()) * chunk;
        convert_f32_to_bf16(data + mine, wide + mine, int64_t(chunk));
    }
    // data (size() * chunk_bytes): rank r's chunk r is sent to all; on return every chunk holds
    // its owner's bytes. In place.
    virtual void all_gather_bytes(void* data, size_t chunk_bytes) = 0;
    void all_gather(float* data, size_t chunk) { all_gather_bytes(data, chunk * sizeof(float)); }
    // bytes (n) of `root` copied to every rank.
    virtual void broadcast(void* bytes, size_t n, int root) = 0;
    virtual void barrier() = 0;
    // Point to point: sends `send_bytes` at `send` to group rank `to` while it receives
    // `recv_bytes` into `recv` from group rank `from`; returns when both are done. Either side
    // may be empty (0 bytes). Messages between two ranks arrive in the order they were sent.
    // Posting both before waiting lets neighbours that send to each other proceed.
    virtual void exchange(const void* send, size_t send_bytes, int to, void* recv,
                          size_t recv_bytes, int from) = 0;

    // Overlap: start(op) runs `op`, calls of this collective, so that work the caller queues
    // before finish() may run beside it; op's buffers hold their results only after finish().
    // No other call of this collective comes between the two. On a device the calls launch at
    // once on the collective's own stream, and finish() waits for them while the kernels queued
    // meanwhile run. Host memory has nothing to run beside them (the products take the rank's
    // cores), so this default runs `op` in finish(): the same calls in the same order on every
    // rank, and a caller that reads a buffer too early reads it unsummed, every time.
    virtual void start(std::function<void()> op) {
        finish();
        pending_ = std::move(op);
    }
    virtual void finish() {
        if (auto op = std::exchange(pending_, nullptr))
            op();
    }

    // Bytes handed to collectives so far (the payload; what travels depends on the algorithm).
    uint64_t payload_bytes() const { return payload_bytes_; }

protected:
    uint64_t payload_bytes_ = 0;

private:
    // `data` (n) widened into a buffer kept for the next call of the same size, so that an
    // implementation keeping state per buffer (gloo's reduce-scatter) finds it again.
    float* widened(const uint16_t* data, size_t n) {
        if (wide_.size() != n)
            wide_.assign(n, 0.0f);
        convert_bf16_to_f32(wide_.data(), data, int64_t(n));
        return wide_.data();
    }
    std::vector<float> wide_;
    std::function<void()> pending_;  // start()'s operation, run by finish()
};

}  // namespace kiln
