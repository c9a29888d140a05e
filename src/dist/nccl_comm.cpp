#include "dist/nccl_comm.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "core/error.h"
#include "dist/store.h"

// Failed calls end the run with one sentence, as the kernels' CUDA failures do (core/error.h).
#define KILN_NCCL(call)                                                         \
    do {                                                                        \
        ncclResult_t status_ = (call);                                          \
        if (status_ != ncclSuccess)                                             \
            ::kiln::library_failed("NCCL", #call, ncclGetErrorString(status_)); \
    } while (0)

#define KILN_CUDA_RT(call)                                                      \
    do {                                                                        \
        cudaError_t status_ = (call);                                           \
        if (status_ != cudaSuccess)                                             \
            ::kiln::library_failed("CUDA", #call, cudaGetErrorString(status_)); \
    } while (0)

namespace kiln::dist {
namespace {

class NcclCollective : public Collective {
public:
    NcclCollective(ncclComm_t comm, int rank, int size, std::chrono::milliseconds timeout)
        : comm_(comm), rank_(rank), size_(size), timeout_(timeout) {
        KILN_CUDA_RT(cudaGetDevice(&device_));
        KILN_CUDA_RT(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        KILN_CUDA_RT(cudaEventCreateWithFlags(&device_work_, cudaEventDisableTiming));
        KILN_CUDA_RT(cudaMalloc(&scratch_, sizeof(float)));
    }
    ~NcclCollective() override {
        cudaFree(scratch_);
        cudaEventDestroy(device_work_);
        cudaStreamDestroy(stream_);
        // A communicator whose operation failed may never finish one: abort it rather than
        // wait in its destruction.
        if (failed_)
            ncclCommAbort(comm_);
        else
            ncclCommDestroy(comm_);
    }
    int rank() const override { return rank_; }
    int size() const override { return size_; }

    void all_reduce_sum(float* data, size_t n) override {
        run([&] { return ncclAllReduce(data, data, n, ncclFloat, ncclSum, comm_, stream_); },
            n * 4);
    }
    void all_reduce_sum(double* data, size_t n) override {
        run([&] { return ncclAllReduce(data, data, n, ncclDouble, ncclSum, comm_, stream_); },
            n * 8);
    }
    // bf16 on the wire: NCCL sums bf16 as it goes.
    void all_reduce_sum_bf16(uint16_t* data, size_t n) override {
        run([&] { return ncclAllReduce(data, data, n, ncclBfloat16, ncclSum, comm_, stream_); },
            n * 2);
    }
    void reduce_scatter_sum_bf16(uint16_t* data, size_t chunk) override {
        run(
            [&] {
                return ncclReduceScatter(data, data + size_t(rank_) * chunk, chunk, ncclBfloat16,
                                         ncclSum, comm_, stream_);
            },
            chunk * size_t(size_) * 2);
    }
    void all_reduce_max(float* data, size_t n) override {
        run([&] { return ncclAllReduce(data, data, n, ncclFloat, ncclMax, comm_, stream_); },
            n * 4);
    }
    // In place: NCCL's result for rank r lands at data + r * chunk, as the contract says.
    void reduce_scatter_sum(float* data, size_t chunk) override {
        run(
            [&] {
                return ncclReduceScatter(data, data + size_t(rank_) * chunk, chunk, ncclFloat,
                                         ncclSum, comm_, stream_);
            },
            chunk * size_t(size_) * 4);
    }
    void reduce_sum(float* data, size_t n, int root) override {
        run([&] { return ncclReduce(data, data, n, ncclFloat, ncclSum, root, comm_, stream_); },
            n * 4);
    }
    void all_gather_bytes(void* data, size_t chunk) override {
        char* bytes = static_cast<char*>(data);
        run(
            [&] {
                return ncclAllGather(bytes + size_t(rank_) * chunk, bytes, chunk, ncclChar, comm_,
                                     stream_);
            },
            chunk * size_t(size_));
    }
    void broadcast(void* bytes, size_t n, int root) override {
        run([&] { return ncclBroadcast(bytes, bytes, n, ncclChar, root, comm_, stream_); }, n);
    }
    void barrier() override {
        run(
            [&] {
                return ncclAllReduce(scratch_, scratch_, 1, ncclFloat, ncclSum, comm_, stream_);
            },
            0);
    }
    // NCCL's point-to-point pair, grouped so that neither side waits for the other to start.
    void exchange(const void* send, size_t send_bytes, int to, void* recv, size_t recv_bytes,
                  int from) override {
        run(
            [&] {
                ncclResult_t r = ncclGroupStart();
                if (r == ncclSuccess && send_bytes > 0)
                    r = ncclSend(send, send_bytes, ncclChar, to, comm_, stream_);
                if (r == ncclSuccess && recv_bytes > 0)
                    r = ncclRecv(recv, recv_bytes, ncclChar, from, comm_, stream_);
                const ncclResult_t ended = ncclGroupEnd();
                return r == ncclSuccess ? ended : r;
            },
            send_bytes);
    }

    // The operation launches now, on this collective's stream, and the kernels queued before
    // finish() run beside it; finish() waits for it as run() does.
    void start(std::function<void()> op) override {
        finish();
        launching_only_ = true;
        try {
            op();
        } catch (...) {
            launching_only_ = false;
            throw;
        }
        launching_only_ = false;
        pending_ = true;
    }
    void finish() override {
        if (std::exchange(pending_, false))
            wait();
    }

private:
    // Launches an operation once the device work already queued on this process's streams is
    // done (the kernels' stream is a blocking one, so the legacy stream's event follows it),
    // and waits for it. Any host thread may call it (the trainer reduces gradients from one of
    // its own while the backward goes on): the device is per thread, so it is set each time.
    template <typename Launch>
    void run(Launch launch, size_t bytes) {
        if (!launching_only_)
            finish();
        KILN_CUDA_RT(cudaSetDevice(device_));
        KILN_CUDA_RT(cudaEventRecord(device_work_, cudaStreamLegacy));
        KILN_CUDA_RT(cudaStreamWaitEvent(stream_, device_work_, 0));
        const ncclResult_t launched = launch();
        if (launched != ncclSuccess) {
            failed_ = true;
            library_failed("NCCL", "a collective", ncclGetErrorString(launched));
        }
        payload_bytes_ += bytes;
        if (!launching_only_)
            wait();
    }
    // Waits for the operation. A peer that died leaves NCCL's kernels waiting for ever, so the
    // wait polls NCCL's own error and gives up after the job's timeout.
    void wait() {
        const auto deadline = std::chrono::steady_clock::now() + timeout_;
        for (int polls = 0;; polls++) {
            const cudaError_t done = cudaStreamQuery(stream_);
            if (done == cudaSuccess)
                return;
            if (done != cudaErrorNotReady) {
                failed_ = true;
                library_failed("CUDA", "an NCCL collective", cudaGetErrorString(done));
            }
            ncclResult_t async = ncclSuccess;
            ncclCommGetAsyncError(comm_, &async);
            if (async != ncclSuccess && async != ncclInProgress) {
                failed_ = true;
                library_failed("NCCL", "a collective", ncclGetErrorString(async));
            }
            if (std::chrono::steady_clock::now() > deadline) {
                failed_ = true;
                throw error(
                    "an NCCL collective of {} ranks did not finish in {} s (parallel.timeout_s): "
                    "a peer stopped or is stuck",
                    size_, timeout_.count() / 1000);
            }
            if (polls > 1000)  // spin briefly for short operations, then sleep between polls
                std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    }
    ncclComm_t comm_;
    int rank_, size_;
    int device_ = 0;  // the GPU this rank took when the group connected
    std::chrono::milliseconds timeout_;
    bool failed_ = false;
    bool launching_only_ = false;  // inside start(): run() launches and leaves the wait
    bool pending_ = false;         // start()'s operations are launched, not yet waited for
    cudaStream_t stream_ = nullptr;
    cudaEvent_t device_work_ = nullptr;
    float* scratch_ = nullptr;  // [device] one float for the barrier
};

}  // namespace

std::unique_ptr<Collective> connect_nccl(TcpStore& store, const std::string& name, int rank,
                                         int size, std::chrono::milliseconds timeout) {
    ncclUniqueId id;
    const std::string key = name + "/nccl-id";
    if (rank == 0) {
        KILN_NCCL(ncclGetUniqueId(&id));
        store.set(key, std::vector<char>(id.internal, id.internal + sizeof id.internal));
    } else {
        std::vector<char> bytes = store.get(key);
        if (bytes.size() != sizeof id.internal) {
            throw error("the NCCL id of group {} in the rendezvous store is malformed", name);
        }
        std::memcpy(id.internal, bytes.data(), sizeof id.internal);
    }
    ncclComm_t comm;
    KILN_NCCL(ncclCommInitRank(&comm, size, id, rank));
    return std::make_unique<NcclCollective>(comm, rank, size, timeout);
}

}  // namespace kiln::dist
