#pragma once
// The collectives the training step needs, on one group of ranks, in training verbs. Implemented
// by dist/ (gloo over TCP for CPU tensors); model/ and optim/ call it without linking dist/, so a
// reader sees where communication happens. Every rank of the group must make the same calls in
// the same order with the same sizes. Buffers are host memory, float32 unless stated.
#include <cstddef>
#include <cstdint>

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

    // Bytes handed to collectives so far (the payload; what travels depends on the algorithm).
    uint64_t payload_bytes() const { return payload_bytes_; }

protected:
    uint64_t payload_bytes_ = 0;
};

}  // namespace kiln
