// The CUDA backend's memory: device allocations for arenas, copies between host and device, and
// the reductions whose result the host reads (the gradient's sum of squares).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/launch.h"

namespace kiln::kernels::cuda {
namespace {

constexpr int kSumBlocks = 256;  // blocks of the sum of squares; their partials meet on the host

__global__ void sum_squares_kernel(double* partials, const float* x, int64_t n) {
    const double s = block_reduce(sum_squares_share(x, n, first_index(), stride()), 0.0, Sum{});
    if (threadIdx.x == 0)
        partials[blockIdx.x] += s;  // launches on one stream: one range after another
}

__global__ void sum_into_kernel(double* total, const float* x, int64_t n) {
    const double s = block_reduce(sum_share(x, n, threadIdx.x, blockDim.x), 0.0, Sum{});
    if (threadIdx.x == 0)
        *total += s;
}

void* device_alloc(size_t bytes, const char* what) {
    const size_t n = std::max<size_t>(bytes, 1);
    void* p = nullptr;
    const cudaError_t status = cudaMalloc(&p, n);
    if (status == cudaErrorMemoryAllocation) {
        cudaGetLastError();  // not sticky: the device stays usable
        size_t free = 0, total = 0;
        cudaMemGetInfo(&free, &total);
        throw error(
            "out of GPU memory allocating {:.1f} MiB for {} ({:.0f} of {:.0f} MiB free); lower "
            "train.micro_batch, set train.recompute=selective or full, or raise parallel.tp",
            n / 1048576.0, what, free / 1048576.0, total / 1048576.0);
    }
    KILN_CUDA(status);
    KILN_CUDA(cudaMemset(p, 0, n));
    return p;
}

void device_release(void* p) {
    cudaFree(p);  // in a destructor: a failure here has nowhere to go
}

void* pinned_alloc(size_t bytes, const char* what) {
    const size_t n = std::max<size_t>(bytes, 1);
    void* p = nullptr;
    if (cudaHostAlloc(&p, n, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        throw error("out of page-locked host memory allocating {:.1f} MiB for {}", n / 1048576.0,
                    what);
    }
    std::memset(p, 0, n);
    return p;
}

void pinned_release(void* p) {
    cudaFreeHost(p);
}

}  // namespace

const Memory device_memory = {"cuda", 256, device_alloc, device_release};
const Memory pinned_memory = {"cuda-pinned", 64, pinned_alloc, pinned_release};

cudaStream_t stream() {
    static cudaStream_t s = [] {
        cudaStream_t created = nullptr;
        KILN_CUDA(cudaStreamCreateWithFlags(&created, cudaStreamDefault));
        return created;
    }();
    return s;
}

bool sync_each_launch() {
    static const bool sync = [] {
        const char* v = std::getenv("KILN_CUDA_SYNC");
        return v && std::strcmp(v, "0") != 0 && *v != '\0';
    }();
    return sync;
}

namespace {
// How many devices the runtime counts, and the reason when it counts none.
std::pair<int, std::string> counted() {
    int n = 0;
    if (const cudaError_t e = cudaGetDeviceCount(&n); e != cudaSuccess) {
        cudaGetLastError();  // clear the sticky error of a machine without a driver
        return {0, fmt::format("the CUDA runtime says: {}", cudaGetErrorString(e))};
    }
    return {n, n > 0 ? "" : "the CUDA runtime found no device"};
}
}  // namespace

int device_count() {
    return counted().first;
}

std::string no_device_reason() {
    return counted().second;
}

namespace {
bool on_device(const void* p) {
    cudaPointerAttributes a = {};
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}
}  // namespace

// In stream order; the host waits only where host memory is a side (its bytes must be read
// before, or be there after, the call).
void set_device(int device) {
    KILN_CUDA(cudaSetDevice(device));
}

int64_t device_memory_bytes(int device) {
    cudaDeviceProp prop = {};
    KILN_CUDA(cudaGetDeviceProperties(&prop, device));
    return int64_t(prop.totalGlobalMem);
}

void copy(void* dst, const void* src, size_t bytes) {
    if (bytes == 0)
        return;
    KILN_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream()));
    // While a graph is recorded (record()) the copy is a node of it, between device buffers (the
    // model's recorded work touches no host memory); nothing is asked of the pointers then.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    KILN_CUDA(cudaStreamIsCapturing(stream(), &capture));
    if (capture == cudaStreamCaptureStatusNone && (!on_device(dst) || !on_device(src)))
        KILN_CUDA(cudaStreamSynchronize(stream()));
}

void zero(void* dst, size_t bytes) {
    if (bytes > 0)
        KILN_CUDA(cudaMemsetAsync(dst, 0, bytes, stream()));
}

void wait() {
    KILN_CUDA(cudaStreamSynchronize(stream()));
}

double sum_squares(const float* x, const std::vector<Range>& ranges) {
    static double* partials = [] {
        double* p = nullptr;
        KILN_CUDA(cudaMalloc(&p, kSumBlocks * sizeof(double)));
        return p;
    }();
    zero(partials, kSumBlocks * sizeof(double));
    for (const Range& r : ranges) {
        if (r.end <= r.begin)
            continue;
        sum_squares_kernel<<<kSumBlocks, kElementThreads, 0, stream()>>>(partials, x + r.begin,
                                                                         r.end - r.begin);
        finish_launch();
    }
    double host[kSumBlocks];
    copy(host, partials, sizeof(host));
    double total = 0;
    for (double s : host)
        total += s;
    return total;
}

void sum_into(double* total, const float* x, int64_t n) {
    sum_into_kernel<<<1, kRowThreads, 0, stream()>>>(total, x, n);
    finish_launch();
}

void* record(const std::function<void()>& work) {
    if (sync_each_launch())
        throw error("KILN_CUDA_SYNC waits after every launch, which a recorded graph cannot do");
    cudaStream_t s = stream();
    KILN_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    cudaGraph_t graph = nullptr;
    auto abandon = [&] {  // ends the capture, whatever it holds; nothing of it has run
        cudaStreamEndCapture(s, &graph);
        if (graph)
            cudaGraphDestroy(graph);
        cudaGetLastError();  // capture errors are not sticky: the device stays usable
    };
    try {
        work();
    } catch (const Error& e) {
        abandon();
        throw error("the device work could not be recorded as a CUDA graph: {}", e.what());
    } catch (...) {
        abandon();
        throw;
    }
    const cudaError_t ended = cudaStreamEndCapture(s, &graph);
    if (ended != cudaSuccess) {  // the capture has ended, invalidated: no graph
        cudaGetLastError();
        throw error("the device work could not be recorded as a CUDA graph: {}",
                    cudaGetErrorString(ended));
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (made != cudaSuccess) {
        cudaGetLastError();
        throw error("a recorded CUDA graph could not be instantiated: {}",
                    cudaGetErrorString(made));
    }
    return exec;
}

void replay(void* graph) {
    KILN_CUDA(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph), stream()));
}

void release(void* graph) {
    cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph));  // a destructor's: nowhere to fail
}

}  // namespace kiln::kernels::cuda
