// Every collective of the host communicator, over both of gloo's transports here (TCP and shared
// memory), in real processes that meet through the rendezvous store: sizes of several MiB that
// end mid-chunk, groups of 2 and 3 (not a power of two), exact expected values, and the same
// bits on every rank.
#include <gloo/rendezvous/context.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <random>
#include <vector>

#include "core/fs.h"
#include "dist/communicator.h"
#include "dist/shm_transport.h"
#include "dist/store.h"
#include "fixture.h"
#include "launch/supervisor.h"

namespace kiln {
namespace {

using kiln::testing::TempDir;

// Checks every collective against values it can compute exactly. Returns what differs, or a
// newline followed by the bits of an all-reduce of random floats, for comparing ranks.
std::string exercise(dist::Job& job) {
    Collective& c = job.world();
    const int r = c.rank(), n = c.size();
    auto fail = [&](const char* what, size_t i, double got, double want) {
        return fmt::format("rank {}: {} [{}] = {}, want {}", r, what, i, got, want);
    };
    const size_t len = 3 * (size_t(1) << 18) + 17;  // 3 MiB of floats and a bit
    std::vector<float> f(len);
    std::vector<double> d(len);
    for (size_t i = 0; i < len; i++)
        f[i] = float((r + 1) * int(i % 1000)), d[i] = f[i];
    // Started, as the backward overlaps its sums with products: a second start finishes the
    // first.
    c.start([&] { c.all_reduce_sum(f.data(), len); });
    c.start([&] { c.all_reduce_sum(d.data(), len); });
    c.finish();
    for (size_t i = 0; i < len; i++) {
        double want = n * (n + 1) / 2 * double(i % 1000);
        if (f[i] != want)
            return fail("all_reduce_sum(float)", i, f[i], want);
        if (d[i] != want)
            return fail("all_reduce_sum(double)", i, d[i], want);
    }
    for (size_t i = 0; i < len; i++)
        f[i] = float((i + size_t(r)) % 7);
    c.all_reduce_max(f.data(), len);
    for (size_t i = 0; i < len; i++) {
        double want = 0;
        for (int k = 0; k < n; k++)
            want = std::max(want, double((i + size_t(k)) % 7));
        if (f[i] != want)
            return fail("all_reduce_max", i, f[i], want);
    }
    const size_t chunk = 300001;
    std::vector<float> g(chunk * size_t(n));
    for (int j = 0; j < n; j++)
        for (size_t i = 0; i < chunk; i++)
            g[size_t(j) * chunk + i] = float((r + 1) * (j + 1) + int(i % 13));
    c.reduce_scatter_sum(g.data(), chunk);
    for (size_t i = 0; i < chunk; i++) {
        double want = (r + 1) * n * (n + 1) / 2 + n * double(i % 13);
        if (g[size_t(r) * chunk + i] != want)
            return fail("reduce_scatter_sum", i, g[size_t(r) * chunk + i], want);
    }
    // A reduce to each root in turn over a region that is no multiple of anything, as ZeRO-1's
    // overlapped buckets reduce to the rank whose shard they lie in.
    for (int root = 0; root < n; root++) {
        const size_t len = 700001;
        std::vector<float> h(len);
        for (size_t i = 0; i < len; i++)
            h[i] = float((r + 1) * (root + 2) + int(i % 11));
        c.reduce_sum(h.data(), len, root);
        for (size_t i = 0; r == root && i < len; i++) {
            double want = (root + 2) * n * (n + 1) / 2 + n * double(i % 11);
            if (h[i] != want)
                return fail("reduce_sum", i, h[i], want);
        }
    }
    const size_t bytes = (size_t(5) << 19) + 3;  // 2.5 MiB and 3 bytes
    std::vector<unsigned char> b(bytes * size_t(n), 0);
    for (size_t i = 0; i < bytes; i++)
        b[size_t(r) * bytes + i] = static_cast<unsigned char>(r * 31 + int(i));
    c.all_gather_bytes(b.data(), bytes);
    for (int k = 0; k < n; k++)
        for (size_t i = 0; i < bytes; i++)
            if (b[size_t(k) * bytes + i] != static_cast<unsigned char>(k * 31 + int(i)))
                return fail("all_gather_bytes", size_t(k) * bytes + i, b[size_t(k) * bytes + i],
                            (k * 31 + int(i)) & 255);
    std::vector<unsigned char> cast((size_t(3) << 19) + 1, static_cast<unsigned char>(r));
    c.broadcast(cast.data(), cast.size(), n - 1);
    for (size_t i = 0; i < cast.size(); i++)
        if (cast[i] != n - 1)
            return fail("broadcast", i, cast[i], n - 1);
    // Point to point, as pipeline stages use it: around the ring both ways at once, twice (the
    // messages between two ranks arrive in order), then down a chain where the ends only send
    // or only receive.
    const size_t p2p = (size_t(3) << 18) + 5;  // 768 KiB of floats and a bit
    std::vector<float> out(p2p), in(p2p), in2(p2p);
    const int right = (r + 1) % n, left = (r + n - 1) % n;
    for (int round = 0; round < 2; round++) {
        for (size_t i = 0; i < p2p; i++)
            out[i] = float(r * 1000 + round * 100 + int(i % 97));
        c.exchange(out.data(), p2p * sizeof(float), right, in.data(), p2p * sizeof(float), left);
        for (size_t i = 0; i < p2p; i++)
            if (in[i] != float(left * 1000 + round * 100 + int(i % 97)))
                return fail("exchange around the ring", i, in[i],
                            left * 1000 + round * 100 + int(i % 97));
    }
    c.exchange(out.data(), r + 1 < n ? p2p * sizeof(float) : 0, r + 1, in2.data(),
               r > 0 ? p2p * sizeof(float) : 0, r - 1);
    for (size_t i = 0; r > 0 && i < p2p; i++)
        if (in2[i] != float((r - 1) * 1000 + 100 + int(i % 97)))
            return fail("exchange down a chain", i, in2[i], (r - 1) * 1000 + 100 + int(i % 97));
    c.barrier();
    if (c.payload_bytes() == 0)
        return "no payload counted";
    // Random values: sums round, and must round the same way on every rank.
    std::mt19937 rng(uint32_t(r) + 7);
    std::normal_distribution<float> normal;
    for (auto& x : f)
        x = normal(rng);
    c.all_reduce_sum(f.data(), len);
    return "\n" + std::string(reinterpret_cast<const char*>(f.data()), len * sizeof(float));
}

// Runs `body(rank)` in `ranks` forked processes; returns what each reported (or the Error it
// threw).
std::vector<std::string> run_forked(int ranks, const std::function<std::string(int)>& body) {
    TempDir dir;
    for (int r = 0; r < ranks; r++) {
        if (fork() == 0) {
            std::string report;
            try {
                report = body(r);
            } catch (const std::exception& e) {
                report = std::string("error: ") + e.what();
            }
            std::ofstream(dir / ("rank-" + std::to_string(r))) << report;
            _exit(0);  // no destructors of the parent's state, no gtest teardown
        }
    }
    for (int r = 0; r < ranks; r++)
        waitpid(-1, nullptr, 0);
    std::vector<std::string> out;
    for (int r = 0; r < ranks; r++)
        out.push_back(fs::read_file(dir / ("rank-" + std::to_string(r))));
    return out;
}

// run_forked() with each rank in one job connected through `transport`.
std::vector<std::string> run_ranks(int ranks, const std::string& transport,
                                   const std::function<std::string(dist::Job&)>& body,
                                   std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    const int port = launch::free_port();
    return run_forked(ranks, [&](int r) {
        dist::Placement p;
        p.rank = r, p.world_size = ranks, p.master_port = port;
        dist::Job job(p, 1, timeout, transport);
        return body(job);
    });
}

// Where shared memory is out of reach (another PID namespace, a seccomp filter), "shm" ends the
// job with that reason, and the shared-memory cases have nothing to test.
bool unreachable(const std::string& report) {
    return report.find("parallel.transport=shm, but") != std::string::npos;
}

// Both transports run gloo's same algorithms, so they must give the same bits too.
TEST(Collective, EveryOperationOverTcpAndSharedMemory) {
    for (int ranks : {2, 3, 4}) {
        std::string tcp_bits;
        for (const char* transport : {"tcp", "shm"}) {
            auto out = run_ranks(ranks, transport, [](dist::Job& job) {
                std::string report = exercise(job);
                job.finish();
                return report;
            });
            if (unreachable(out[0]))
                GTEST_SKIP() << out[0];
            std::string reports;  // every rank's, as the first to fail may only name another
            for (int r = 0; r < ranks; r++)
                reports += fmt::format("\nrank {}: {}", r, out[size_t(r)].substr(0, 300));
            for (int r = 0; r < ranks; r++) {
                ASSERT_EQ(out[size_t(r)].substr(0, 1), "\n")
                    << transport << ", " << ranks << " ranks, rank " << r << reports;
                EXPECT_TRUE(out[size_t(r)] == out[0])
                    << transport << ": rank " << r << " summed random floats to other bits";
            }
            if (tcp_bits.empty())
                tcp_bits = out[0];
            EXPECT_TRUE(out[0] == tcp_bits) << ranks << " ranks: shm and tcp sums differ";
        }
    }
}

// A rank that exits mid-job: its peer's next collective ends in an Error, well before the
// job's 60 s timeout, instead of waiting for it.
TEST(Collective, PeerThatExitsEndsTheWait) {
    for (const char* transport : {"tcp", "shm"}) {
        const auto start = std::chrono::steady_clock::now();
        auto out = run_ranks(2, transport, [](dist::Job& job) -> std::string {
            job.world().barrier();
            if (job.world().rank() == 1)
                return "left";
            std::vector<float> x(1 << 20, 1.0f);
            job.world().all_reduce_sum(x.data(), x.size());
            return "all-reduce returned";
        });
        if (unreachable(out[0]))
            GTEST_SKIP() << out[0];
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        EXPECT_EQ(out[1], "left");
        EXPECT_EQ(out[0].substr(0, 7), "error: ") << transport << ": " << out[0];
        EXPECT_LT(seconds, 30) << transport << ": " << out[0];
        if (std::string(transport) == "shm") {
            EXPECT_NE(out[0].find("rank 1 (pid"), std::string::npos) << out[0];
        }
    }
}

// A rank that stays alive but never joins the collective: its peer gives up at the job's timeout
// (parallel.timeout_s) with an Error.
TEST(SharedMemoryTransport, AbsentPeerEndsTheWaitAtTheTimeout) {
    auto out = run_ranks(
        2, "shm",
        [](dist::Job& job) -> std::string {
            job.world().barrier();
            if (job.world().rank() == 1) {
                sleep(4);
                return "stayed away";
            }
            std::vector<float> x(1024, 1.0f);
            job.world().all_reduce_sum(x.data(), x.size());
            return "all-reduce returned";
        },
        std::chrono::seconds(2));
    if (unreachable(out[0]))
        GTEST_SKIP() << out[0];
    EXPECT_EQ(out[1], "stayed away");
    EXPECT_NE(out[0].find("waited in a collective for more than 2 s"), std::string::npos) << out[0];
}

// The contract gloo's algorithms rely on: a bound buffer's send is complete when send() returns,
// so the sender may rewrite the region at once (gloo's halving-doubling reduce-scatter does).
// The receiver looks only after the sender has rewritten it, and must see what was sent.
TEST(SharedMemoryTransport, BoundSendIsCompleteWhenSendReturns) {
    const int port = launch::free_port();
    auto out = run_forked(2, [port](int r) -> std::string {
        dist::TcpStore store("127.0.0.1", port, r == 0, std::chrono::seconds(30));
        std::string why;
        if (!dist::shm_reachable(store, r, 2, true, &why))
            return "parallel.transport=shm, but " + why;
        auto ctx = std::make_shared<gloo::rendezvous::Context>(r, 2);
        ctx->setTimeout(std::chrono::seconds(30));
        auto device = dist::make_shm_device();
        ctx->connectFullMesh(store, device);
        std::vector<int> data(1 << 20, r == 1 ? 7 : 0);
        const size_t bytes = data.size() * sizeof(int);
        if (r == 1) {
            auto buf = ctx->getPair(0)->createSendBuffer(0, data.data(), bytes);
            buf->send();
            std::fill(data.begin(), data.end(), 9);
            buf->waitSend();
            store.set("rewritten", {'1'});
            store.get("checked");  // keeps the buffer until rank 0 has looked
            store.set("bye", {'1'});
            return "sent";
        }
        auto buf = ctx->getPair(1)->createRecvBuffer(0, data.data(), bytes);
        store.get("rewritten");
        buf->waitRecv();
        const auto wrong = std::count_if(data.begin(), data.end(), [](int x) { return x != 7; });
        store.set("checked", {'1'});
        store.get("bye");  // rank 0 serves the store: it leaves last
        return wrong ? fmt::format("{} of {} ints are not what was sent", wrong, data.size())
                     : "received";
    });
    if (unreachable(out[0]))
        GTEST_SKIP() << out[0];
    EXPECT_EQ(out[1], "sent");
    EXPECT_EQ(out[0], "received");
}

}  // namespace
}  // namespace kiln
