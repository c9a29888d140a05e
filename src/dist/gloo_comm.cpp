// The gloo backend of Collective, and the Job that builds the groups.
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/reduce.h>
#include <gloo/reduce_scatter.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#include <unistd.h>

#include <cstring>
#include <map>

#include "core/error.h"
#include "core/log.h"
#include "dist/communicator.h"
#include "dist/shm_transport.h"
#include "dist/store.h"
#ifdef KILN_HAVE_NCCL
#include "dist/nccl_comm.h"
#endif

namespace kiln::dist {
namespace {

class GlooCollective : public Collective {
public:
    explicit GlooCollective(std::shared_ptr<gloo::Context> ctx) : ctx_(std::move(ctx)) {}
    int rank() const override { return ctx_->rank; }
    int size() const override { return ctx_->size; }

    void all_reduce_sum(float* data, size_t n) override { all_reduce(data, n); }
    void all_reduce_sum(double* data, size_t n) override { all_reduce(data, n); }
    void all_reduce_max(float* data, size_t n) override {
        all_reduce(data, n, static_cast<Reduce>(&gloo::max<float>));
    }

    // gloo's halving-doubling reduce-scatter. It sets up buffers and pairs when built, so one
    // is kept per buffer (training reduces the same gradient buffer every step). For group sizes
    // that are not powers of two its result was seen to be wrong (tests/dist pins 3 ranks), so
    // those groups use an all-reduce, which satisfies the contract at twice the traffic.
    //
    // gloo leaves rank r's chunk at the front of the buffer, where this contract wants it at
    // r*chunk. Its recursive halving first leaves rank p holding chunk bit-reverse(p) in place;
    // with two ranks that is each rank's own chunk, so the receive counts {chunk, 0} skip its
    // distribution phase (a copy of the whole chunk to the front on rank 1). With more ranks the
    // distribution runs, and the chunk is copied from the front to its place.
    void reduce_scatter_sum(float* data, size_t chunk) override {
        const int n = size();
        if (n == 1)
            return;
        if ((n & (n - 1)) != 0)
            return all_reduce(data, chunk * size_t(n));
        payload_bytes_ += chunk * size_t(n) * sizeof(float);
        auto key = std::make_pair(data, chunk);
        auto it = reduce_scatters_.find(key);
        if (it == reduce_scatters_.end()) {
            KILN_CHECK(chunk * size_t(n) < size_t(1) << 31, "reduce-scatter of {} floats",
                       chunk * size_t(n));
            std::vector<int> counts(static_cast<size_t>(n), static_cast<int>(chunk));
            if (n == 2)
                counts[1] = 0;
            auto algo = std::make_unique<gloo::ReduceScatterHalvingDoubling<float>>(
                ctx_, std::vector<float*>{data}, int(chunk) * n, counts);
            it = reduce_scatters_.emplace(key, std::move(algo)).first;
        }
        it->second->run();
        if (n > 2 && rank() > 0)
            std::memcpy(data + size_t(rank()) * chunk, data, chunk * sizeof(float));
    }

    // gloo's ring: a reduce-scatter, then each chunk of the sum sent to the root.
    void reduce_sum(float* data, size_t n, int root) override {
        if (size() == 1 || n == 0)
            return;
        payload_bytes_ += n * sizeof(float);
        gloo::ReduceOptions opts(ctx_);
        opts.setOutput(data, n);
        opts.setRoot(root);
        opts.setReduceFunction(static_cast<Reduce>(&gloo::sum<float>));
        opts.setTag(next_tag());
        gloo::reduce(opts);
    }

    void all_gather_bytes(void* data, size_t chunk) override {
        if (size() == 1)
            return;
        payload_bytes_ += chunk * size_t(size());
        char* bytes = static_cast<char*>(data);
        gloo::AllgatherOptions opts(ctx_);
        opts.setOutput(bytes, chunk * size_t(size()));
        opts.setTag(next_tag());
        gloo::allgather(opts);
    }

    void broadcast(void* bytes, size_t n, int root) override {
        if (size() == 1)
            return;
        payload_bytes_ += n;
        gloo::BroadcastOptions opts(ctx_);
        opts.setOutput(static_cast<char*>(bytes), n);
        opts.setRoot(root);
        opts.setTag(next_tag());
        gloo::broadcast(opts);
    }

    void barrier() override {
        if (size() == 1)
            return;
        gloo::BarrierOptions opts(ctx_);
        opts.setTag(next_tag());
        gloo::barrier(opts);
    }

    void exchange(const void* send, size_t send_bytes, int to, void* recv, size_t recv_bytes,
                  int from) override {
        // One slot for every point-to-point message of the group, outside gloo's collectives'
        // prefixes: between two ranks they match in order.
        const uint64_t slot = gloo::Slot::build(kPointToPointPrefix, 0);
        std::unique_ptr<gloo::transport::UnboundBuffer> in, out;
        if (recv_bytes > 0) {
            in = ctx_->createUnboundBuffer(recv, recv_bytes);
            in->recv(from, slot);
        }
        if (send_bytes > 0) {
            payload_bytes_ += send_bytes;
            out = ctx_->createUnboundBuffer(const_cast<void*>(send), send_bytes);
            out->send(to, slot);
        }
        if (in)
            in->waitRecv(ctx_->getTimeout());
        if (out)
            out->waitSend(ctx_->getTimeout());
    }

private:
    static constexpr uint8_t kPointToPointPrefix = 0x40;
    using Reduce = void (*)(void*, const void*, const void*, size_t);
    template <typename T>
    void all_reduce(T* data, size_t n, Reduce reduce = static_cast<Reduce>(&gloo::sum<T>)) {
        if (size() == 1 || n == 0)
            return;
        payload_bytes_ += n * sizeof(T);
        gloo::AllreduceOptions opts(ctx_);
        opts.setOutput(data, n);
        opts.setReduceFunction(reduce);
        opts.setTag(next_tag());
        gloo::allreduce(opts);
    }
    uint32_t next_tag() { return tag_++; }
    std::shared_ptr<gloo::Context> ctx_;
    uint32_t tag_ = 0;
    std::map<std::pair<float*, size_t>, std::unique_ptr<gloo::ReduceScatterHalvingDoubling<float>>>
        reduce_scatters_;
};

// A group of one rank: every collective is the identity.
class SoloCollective : public Collective {
public:
    int rank() const override { return 0; }
    int size() const override { return 1; }
    void all_reduce_sum(float*, size_t) override {}
    void all_reduce_sum(double*, size_t) override {}
    void all_reduce_max(float*, size_t) override {}
    void reduce_scatter_sum(float*, size_t) override {}
    void reduce_sum(float*, size_t, int) override {}
    void all_gather_bytes(void*, size_t) override {}
    void broadcast(void*, size_t, int) override {}
    void barrier() override {}
    void exchange(const void*, size_t send_bytes, int, void*, size_t recv_bytes, int) override {
        KILN_CHECK(send_bytes == 0 && recv_bytes == 0, "a point-to-point message within one rank");
    }
};

std::unique_ptr<Collective> connect(TcpStore& store,
                                    std::shared_ptr<gloo::transport::Device>& device,
                                    const std::string& name, int rank, int size,
                                    std::chrono::milliseconds timeout) {
    if (size == 1)
        return std::make_unique<SoloCollective>();
    auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
    ctx->setTimeout(timeout);
    gloo::rendezvous::PrefixStore prefixed(name, store);
    try {
        ctx->connectFullMesh(prefixed, device);
    } catch (const std::exception& e) {
        throw error("cannot connect the {} group: {}", name, e.what());
    }
    return std::make_unique<GlooCollective>(ctx);
}

}  // namespace

Grid make_grid(int world_size, int rank, int tp, int pp) {
    if (tp < 1 || pp < 1 || world_size % (tp * pp) != 0) {
        throw error("world size {} is not divisible by parallel.tp={} x parallel.pp={}", world_size,
                    tp, pp);
    }
    Grid g;
    g.world = world_size;
    g.rank = rank;
    g.tp = tp;
    g.tp_rank = rank % tp;
    g.pp = pp;
    g.pp_rank = rank / tp % pp;
    g.dp = world_size / (tp * pp);
    g.dp_rank = rank / (tp * pp);
    return g;
}

Job::Job(const Placement& p, int tp, std::chrono::milliseconds timeout,
         const std::string& transport, int pp, Tensors tensors)
    : grid_(make_grid(p.world_size, p.rank, tp, pp)) {
#ifndef KILN_HAVE_NCCL
    if (tensors == Tensors::device && p.world_size > 1)
        throw error("{} ranks on GPUs need NCCL, and this kiln was built without it", p.world_size);
#endif
    if (p.world_size == 1) {
        world_ = std::make_unique<SoloCollective>();
        dp_ = std::make_unique<SoloCollective>();
        tp_ = std::make_unique<SoloCollective>();
        pp_ = std::make_unique<SoloCollective>();
        return;
    }
    // Found before the rendezvous, so that a wrong interface or address fails at once.
    const std::string address = local_address(p);
    store_ = std::make_unique<TcpStore>(p.master_addr, p.master_port, p.rank == 0, timeout);
    // Arrival: each rank checks in, then waits for all; a timeout names who is missing.
    store_->set("arrived/" + std::to_string(p.rank), {'1'});
    std::vector<std::string> keys;
    for (int r = 0; r < p.world_size; r++)
        keys.push_back("arrived/" + std::to_string(r));
    auto deadline = std::chrono::steady_clock::now() + timeout;
    std::vector<std::string> missing;
    while (!(missing = store_->missing(keys)).empty()) {
        if (std::chrono::steady_clock::now() > deadline) {
            std::string ranks;
            for (const auto& k : missing)
                ranks += (ranks.empty() ? "" : ", ") + k.substr(8);
            throw error("rendezvous at {}:{} timed out after {} s: rank(s) {} of {} never arrived",
                        p.master_addr, p.master_port, timeout.count() / 1000, ranks, p.world_size);
        }
        usleep(20000);
    }
    // The transport: shared memory when asked or possible (the probe is collective), else TCP.
    std::shared_ptr<gloo::transport::Device> device;
    std::string why = "parallel.transport=tcp", via = "shared memory";
    if (transport != "tcp" &&
        shm_reachable(*store_, p.rank, p.world_size, transport == "shm", &why)) {
        device = make_shm_device();
    } else if (transport == "shm") {
        throw error("parallel.transport=shm, but {}", why);
    } else {
        gloo::transport::tcp::attr attr;
        attr.hostname = address;
        device = gloo::transport::tcp::CreateDevice(attr);
        via = fmt::format("TCP on {} ({})", attr.hostname, why);
    }
    const Grid& g = grid_;
    world_ = connect(*store_, device, "world", g.rank, g.world, timeout);
    // Each group is named by the grid coordinates its ranks share.
    const std::string stage = g.pp > 1 ? fmt::format(".{}", g.pp_rank) : "";
    dp_ =
        connect(*store_, device, fmt::format("dp{}{}", g.tp_rank, stage), g.dp_rank, g.dp, timeout);
    tp_ =
        connect(*store_, device, fmt::format("tp{}{}", g.dp_rank, stage), g.tp_rank, g.tp, timeout);
    pp_ = connect(*store_, device, fmt::format("pp{}.{}", g.dp_rank, g.tp_rank), g.pp_rank, g.pp,
                  timeout);
#ifdef KILN_HAVE_NCCL
    if (tensors == Tensors::device) {
        auto nccl = [&](const std::string& name, int rank,
                        int size) -> std::unique_ptr<Collective> {
            if (size == 1)
                return std::make_unique<SoloCollective>();
            return connect_nccl(*store_, name, rank, size, timeout);
        };
        dp_nccl_ = nccl(fmt::format("nccl-dp{}{}", g.tp_rank, stage), g.dp_rank, g.dp);
        tp_nccl_ = nccl(fmt::format("nccl-tp{}{}", g.dp_rank, stage), g.tp_rank, g.tp);
        pp_nccl_ = nccl(fmt::format("nccl-pp{}.{}", g.dp_rank, g.tp_rank), g.pp_rank, g.pp);
        via += "; tensors over NCCL";
    }
#endif
    log::info("dist", "rank {} of {} connected ({}) through {}: dp {}/{}, pp {}/{}, tp {}/{}",
              g.rank, g.world, p.source, via, g.dp_rank, g.dp, g.pp_rank, g.pp, g.tp_rank, g.tp);
}

Job::~Job() = default;

}  // namespace kiln::dist
