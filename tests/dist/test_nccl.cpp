// The NCCL communicator on a GPU: a group of one rank (all one device allows), every collective
// called on device memory and checked. Skipped without CUDA or a device.
#include <gtest/gtest.h>

#include <thread>
#include <vector>

#include "kernels/backends.h"

#ifdef KILN_HAVE_NCCL
#include <cuda_runtime.h>

#include "dist/nccl_comm.h"
#include "dist/store.h"
#include "launch/supervisor.h"
#endif

namespace kiln {
namespace {

#ifdef KILN_HAVE_NCCL
TEST(Nccl, CollectivesOnDeviceMemory) {
    if (!kernels::cuda_available())
        GTEST_SKIP() << "no CUDA device";
    dist::TcpStore store("127.0.0.1", launch::free_port(), true, std::chrono::seconds(10));
    auto comm = dist::connect_nccl(store, "test", 0, 1, std::chrono::seconds(30));
    std::vector<float> host = {1, -2, 3, 4, 5, 6, 7, 8}, back(8);
    float* dev = nullptr;
    ASSERT_EQ(cudaMalloc(&dev, host.size() * 4), cudaSuccess);
    cudaMemcpy(dev, host.data(), host.size() * 4, cudaMemcpyHostToDevice);
    comm->all_reduce_sum(dev, 8);
    comm->all_reduce_max(dev, 8);
    comm->reduce_scatter_sum(dev, 8);
    // From another host thread, as the trainer reduces gradient buckets during the backward.
    std::thread([&] { comm->reduce_sum(dev, 8, 0); }).join();
    comm->all_gather(dev, 8);
    comm->broadcast(dev, 32, 0);
    comm->barrier();
    // Started and finished, as the backward overlaps its sums with products; a collective
    // called after a start finishes it first.
    comm->start([&] {
        comm->all_reduce_sum(dev, 8);
        comm->all_gather(dev, 8);
    });
    comm->finish();
    comm->start([&] { comm->reduce_scatter_sum(dev, 8); });
    comm->all_reduce_sum(dev, 8);
    cudaMemcpy(back.data(), dev, host.size() * 4, cudaMemcpyDeviceToHost);
    cudaFree(dev);
    EXPECT_EQ(back, host);  // a group of one: every collective is the identity
    EXPECT_GT(comm->payload_bytes(), 0u);
}
#else
TEST(Nccl, CollectivesOnDeviceMemory) {
    GTEST_SKIP() << "built without CUDA/NCCL";
}
#endif

}  // namespace
}  // namespace kiln
