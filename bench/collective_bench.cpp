// The collectives of a training step between two ranks on this host, through each of gloo's
// transports (TCP loopback and shared memory): the ZeRO-1 gradient reduce-scatter (fp32) and
// weight all-gather (bf16) at `small`'s size, a TP activation all-reduce (8 x 256 x 288 fp32,
// tiny's), and a one-float all-reduce (latency). Each rank is pinned to its own core; the figure
// is the median over the repetitions of the slower rank's time. Each repetition finds its
// buffers in the caches where the last one left them; in a training step the reduce-scatter
// follows a backward pass and took up to twice as long (metrics.jsonl's reduce_s).
//
//   build/bench/bench_collective [floats]     floats: the gradient's length (default 58,040,320)
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "launch/supervisor.h"

namespace {

using Clock = std::chrono::steady_clock;

// Runs `op` `reps` times after one untimed run; returns the median seconds of this rank, taken
// as the maximum over both ranks (a collective ends when its slower rank does).
double timed(kiln::Collective& c, int reps, const std::function<void()>& op) {
    op();
    std::vector<double> t;
    for (int i = 0; i < reps; i++) {
        c.barrier();
        const auto start = Clock::now();
        op();
        double s = std::chrono::duration<double>(Clock::now() - start).count();
        float f = float(s);
        c.all_reduce_max(&f, 1);
        t.push_back(double(f));
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

void rank_main(int rank, int port, const std::string& transport, size_t floats) {
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    CPU_SET(rank % int(sysconf(_SC_NPROCESSORS_ONLN)), &cpus);
    sched_setaffinity(0, sizeof cpus, &cpus);
    kiln::dist::Placement p;
    p.rank = rank, p.world_size = 2, p.master_port = port;
    kiln::dist::Job job(p, 1, std::chrono::seconds(120), transport);
    kiln::Collective& c = job.world();
    std::vector<float> grads(floats, 1.0f + float(rank));
    std::vector<uint16_t> weights(floats, 0x3f80);
    std::vector<float> acts(8 * 256 * 288, 1.0f);
    float one = 1.0f;
    const double rs = timed(c, 5, [&] { c.reduce_scatter_sum(grads.data(), floats / 2); });
    const double ag =
        timed(c, 5, [&] { c.all_gather_bytes(weights.data(), floats / 2 * sizeof(uint16_t)); });
    const double tp = timed(c, 50, [&] { c.all_reduce_sum(acts.data(), acts.size()); });
    const double lat = timed(c, 200, [&] { c.all_reduce_sum(&one, 1); });
    if (rank == 0) {
        std::printf("| %s | %.1f | %.1f | %.2f | %.0f |\n", transport.c_str(), rs * 1e3, ag * 1e3,
                    tp * 1e3, lat * 1e6);
        std::fflush(stdout);
    }
    job.finish();
}

}  // namespace

int main(int argc, char** argv) {
    char* end = nullptr;
    const size_t floats = argc > 1 ? std::strtoull(argv[1], &end, 10) : 58040320;
    if (argc > 2 || (argc > 1 && *end != '\0') || floats < 2 || floats % 2) {
        std::fprintf(stderr,
                     "usage: bench_collective [floats]\n"
                     "  floats: the gradient's length, even and at least 2 (default 58040320, "
                     "small's)\n");
        return 2;
    }
    std::printf("2 ranks, one core each; reduce-scatter %zu fp32, all-gather %zu bf16 halves\n\n",
                floats, floats / 2);
    std::printf(
        "| transport | reduce-scatter (ms) | all-gather (ms) | 2.4 MB all-reduce (ms) | "
        "1-float all-reduce (us) |\n|---|---:|---:|---:|---:|\n");
    std::fflush(stdout);
    for (const std::string transport : {"tcp", "shm"}) {
        const int port = kiln::launch::free_port();
        for (int r = 0; r < 2; r++) {
            if (fork() == 0) {
                try {
                    rank_main(r, port, transport, floats);
                } catch (const std::exception& e) {
                    std::fprintf(stderr, "rank %d: %s\n", r, e.what());
                    _exit(1);
                }
                _exit(0);
            }
        }
        int failed = 0;
        for (int r = 0; r < 2; r++) {
            int status = 0;
            wait(&status);
            failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
        }
        if (failed)
            return 1;
    }
    return 0;
}
