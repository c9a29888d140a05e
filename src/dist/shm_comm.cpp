// The shared-memory backend of Collective.
//
// Rank 0 of the group creates a POSIX shared memory segment; the others open it by the name it
// publishes in the store and check its nonce; once everyone has it mapped, rank 0 unlinks the
// name, so nothing outlives the processes. The segment holds one arrival counter per rank and
// two halves of `size` slots of kSlotBytes. A collective runs in rounds: each rank writes a
// piece into its slot, all arrive at a barrier, each rank reads what it needs from the others'
// slots. Rounds alternate halves, so a rank may write the next round while a slower peer still
// reads the last one: a rank enters round t+2 (the same half as t) only after every rank has
// arrived at round t+1's barrier, which they do after finishing their reads of round t.
#include "dist/shm_comm.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/log.h"
#include "dist/store.h"

namespace kiln::dist {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kSlotBytes = size_t(1) << 20;

struct Header {
    uint64_t nonce;
    int64_t size;
};

struct alignas(64) Arrival {
    std::atomic<uint64_t> round;  // rounds this rank has arrived at
    int64_t pid;
    uint64_t pid_namespace;  // a pid means something to a peer only within one namespace
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "arrival counters must be lock-free");

size_t slots_offset(int size) {
    return (sizeof(Arrival) * (size_t(size) + 1) + 4095) / 4096 * 4096;
}

uint64_t namespace_inode(const char* path) {
    struct stat st {};
    return ::stat(path, &st) == 0 ? uint64_t(st.st_ino) : 0;
}

// Ranks that print the same identity can see one another's shared memory and processes.
std::string host_identity() {
    char name[256] = {0};
    gethostname(name, sizeof name - 1);
    std::string boot;
    std::ifstream("/proc/sys/kernel/random/boot_id") >> boot;
    return std::string(name) + " " + boot + " " +
           std::to_string(namespace_inode("/proc/self/ns/ipc")) + " " +
           std::to_string(namespace_inode("/proc/self/ns/mnt"));
}

std::string text(const std::vector<char>& v) {
    return std::string(v.begin(), v.end());
}
std::vector<char> bytes(const std::string& s) {
    return std::vector<char>(s.begin(), s.end());
}

// A mapped segment; unmapped on destruction.
struct Mapping {
    void* base = MAP_FAILED;
    size_t bytes = 0;
    Mapping() = default;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping() {
        if (base != MAP_FAILED)
            munmap(base, bytes);
    }
    Header* header() const { return static_cast<Header*>(base); }
};

// Creates (rank 0) or opens the segment `name` into `m`; returns why not, or "" on success.
std::string map_segment(Mapping& m, const std::string& name, bool create, size_t bytes) {
    int fd = create ? shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600)
                    : shm_open(name.c_str(), O_RDWR, 0);
    if (fd < 0)
        return fmt::format("shm_open {}: {}", name, std::strerror(errno));
    std::string why;
    struct stat st {};
    if (create && ftruncate(fd, off_t(bytes)) != 0) {
        why = fmt::format("ftruncate {} to {} bytes: {}", name, bytes, std::strerror(errno));
    } else if (int e = create ? posix_fallocate(fd, 0, off_t(bytes)) : 0; e != 0) {
        // Reserved now: a full /dev/shm shows here, not as SIGBUS on first touch.
        why = fmt::format("reserving {} bytes in /dev/shm: {}", bytes, std::strerror(e));
    } else if (fstat(fd, &st) != 0 || size_t(st.st_size) != bytes) {
        why = fmt::format("{} is not {} bytes", name, bytes);
    } else {
        m.base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        m.bytes = bytes;
        if (m.base == MAP_FAILED)
            why = fmt::format("mmap {}: {}", name, std::strerror(errno));
    }
    close(fd);
    if (!why.empty() && create)
        shm_unlink(name.c_str());
    return why;
}

// out[i] = op over ranks, in rank order, of src[k][i], for i < n. A source may be `out` itself:
// every block is read whole before it is written.
template <typename T, typename Op>
void combine(T* out, const T* const* src, int ranks, size_t n, Op op) {
    constexpr size_t kBlock = 4096 / sizeof(T);
    alignas(64) T acc[kBlock];
    for (size_t o = 0; o < n; o += kBlock) {
        const size_t b = std::min(kBlock, n - o);
        const T* __restrict a0 = src[0] + o;
        const T* __restrict a1 = src[1] + o;
        for (size_t i = 0; i < b; i++)
            acc[i] = op(a0[i], a1[i]);
        for (int k = 2; k < ranks; k++) {
            const T* __restrict ak = src[k] + o;
            for (size_t i = 0; i < b; i++)
                acc[i] = op(acc[i], ak[i]);
        }
        std::memcpy(out + o, acc, b * sizeof(T));
    }
}

struct Sum {
    template <typename T>
    T operator()(T a, T b) const {
        return a + b;
    }
};
struct Max {
    template <typename T>
    T operator()(T a, T b) const {
        return a < b ? b : a;
    }
};

class ShmCollective final : public Collective {
public:
    ShmCollective(std::unique_ptr<Mapping> m, std::string name, int rank, int size,
                  std::chrono::milliseconds timeout)
        : map_(std::move(m)),
          name_(std::move(name)),
          rank_(rank),
          size_(size),
          timeout_(timeout),
          arrivals_(reinterpret_cast<Arrival*>(static_cast<char*>(map_->base) + sizeof(Arrival))),
          slots_(static_cast<char*>(map_->base) + slots_offset(size)) {
        arrivals_[rank_].pid = getpid();
        arrivals_[rank_].pid_namespace = namespace_inode("/proc/self/ns/pid");
        own_pid_namespace_ = arrivals_[rank_].pid_namespace;
    }
    int rank() const override { return rank_; }
    int size() const override { return size_; }

    void all_reduce_sum(float* data, size_t n) override { all_reduce(data, n, Sum{}); }
    void all_reduce_sum(double* data, size_t n) override { all_reduce(data, n, Sum{}); }
    void all_reduce_max(float* data, size_t n) override { all_reduce(data, n, Max{}); }

    // Each round: every rank writes its piece of everyone else's chunk, then sums the pieces
    // of its own chunk from every slot.
    void reduce_scatter_sum(float* data, size_t chunk) override {
        payload_bytes_ += chunk * size_t(size_) * sizeof(float);
        const size_t per = kSlotBytes / sizeof(float) / size_t(size_);
        std::vector<const float*> src(static_cast<size_t>(size_));
        for (size_t o = 0; o < chunk; o += per) {
            const size_t n = std::min(per, chunk - o);
            const int half = half_;
            float* mine = slot<float>(half, rank_);
            for (int j = 0; j < size_; j++) {
                if (j != rank_)
                    std::memcpy(mine + size_t(j) * per, data + size_t(j) * chunk + o, n * 4);
            }
            sync();
            float* out = data + size_t(rank_) * chunk + o;
            for (int k = 0; k < size_; k++)
                src[size_t(k)] = k == rank_ ? out : slot<float>(half, k) + size_t(rank_) * per;
            combine(out, src.data(), size_, n, Sum{});
        }
    }

    void all_gather_bytes(void* data, size_t chunk) override {
        payload_bytes_ += chunk * size_t(size_);
        char* bytes = static_cast<char*>(data);
        for (size_t o = 0; o < chunk; o += kSlotBytes) {
            const size_t n = std::min(kSlotBytes, chunk - o);
            const int half = half_;
            std::memcpy(slot<char>(half, rank_), bytes + size_t(rank_) * chunk + o, n);
            sync();
            for (int k = 0; k < size_; k++) {
                if (k != rank_)
                    std::memcpy(bytes + size_t(k) * chunk + o, slot<char>(half, k), n);
            }
        }
    }

    void broadcast(void* data, size_t n_bytes, int root) override {
        payload_bytes_ += n_bytes;
        char* bytes = static_cast<char*>(data);
        for (size_t o = 0; o < n_bytes; o += kSlotBytes) {
            const size_t n = std::min(kSlotBytes, n_bytes - o);
            const int half = half_;
            if (rank_ == root)
                std::memcpy(slot<char>(half, root), bytes + o, n);
            sync();
            if (rank_ != root)
                std::memcpy(bytes + o, slot<char>(half, root), n);
        }
    }

    void barrier() override { sync(); }

private:
    // Every rank sums (or takes the maximum of) all slots in rank order, so all get the same
    // bits.
    template <typename T, typename Op>
    void all_reduce(T* data, size_t count, Op op) {
        payload_bytes_ += count * sizeof(T);
        const size_t per = kSlotBytes / sizeof(T);
        std::vector<const T*> src(static_cast<size_t>(size_));
        for (size_t o = 0; o < count; o += per) {
            const size_t n = std::min(per, count - o);
            const int half = half_;
            std::memcpy(slot<T>(half, rank_), data + o, n * sizeof(T));
            sync();
            for (int k = 0; k < size_; k++)
                src[size_t(k)] = slot<T>(half, k);
            combine(data + o, src.data(), size_, n, op);
        }
    }

    template <typename T>
    T* slot(int half, int rank) const {
        return reinterpret_cast<T*>(slots_ +
                                    (size_t(half) * size_t(size_) + size_t(rank)) * kSlotBytes);
    }

    // Arrives at the next round's barrier and waits for every other rank to arrive there.
    void sync() {
        const uint64_t round = ++round_;
        half_ = int(round & 1);
        arrivals_[rank_].round.store(round, std::memory_order_release);
        for (int k = 0; k < size_; k++) {
            if (k != rank_ && arrivals_[k].round.load(std::memory_order_acquire) < round)
                wait_for(k, round);
        }
    }

    // Spins briefly (peers in step arrive within microseconds), then yields, then sleeps, so
    // that ranks sharing cores leave them to whoever is working.
    void wait_for(int k, uint64_t round) {
        const Clock::time_point start = Clock::now();
        for (uint64_t spin = 0;; spin++) {
            if (arrivals_[k].round.load(std::memory_order_acquire) >= round)
                return;
            if (spin < 2000) {
#if defined(__x86_64__)
                __builtin_ia32_pause();
#endif
                continue;
            }
            const Clock::duration waited = Clock::now() - start;
            if (waited > timeout_) {
                throw error("rank {} of the {} group did not reach a collective within {} s", k,
                            name_, timeout_.count() / 1000.0);
            }
            if ((spin & 1023) == 0 && arrivals_[k].pid_namespace == own_pid_namespace_ &&
                kill(pid_t(arrivals_[k].pid), 0) != 0 && errno == ESRCH) {
                throw error("rank {} of the {} group (pid {}) exited during a collective", k, name_,
                            arrivals_[k].pid);
            }
            if (waited < std::chrono::milliseconds(2))
                sched_yield();
            else
                usleep(50);
        }
    }

    std::unique_ptr<Mapping> map_;
    std::string name_;
    int rank_, size_;
    std::chrono::milliseconds timeout_;
    Arrival* arrivals_;
    char* slots_;
    uint64_t own_pid_namespace_ = 0;
    uint64_t round_ = 0;
    int half_ = 0;
};

}  // namespace

size_t shared_memory_bytes(int ranks) {
    return slots_offset(ranks) + 2 * size_t(ranks) * kSlotBytes;
}

std::unique_ptr<Collective> connect_shared_memory(TcpStore& store, const std::string& name,
                                                  int rank, int size,
                                                  std::chrono::milliseconds timeout) {
    const std::string key = "shm/" + name + "/";
    // One host? Every rank reads the same identities, so every rank decides the same.
    store.set(key + "host/" + std::to_string(rank), bytes(host_identity()));
    for (int r = 0; r < size; r++) {
        if (text(store.get(key + "host/" + std::to_string(r))) != host_identity())
            return nullptr;
    }
    auto m = std::make_unique<Mapping>();
    const size_t total = shared_memory_bytes(size);
    std::string why;
    if (rank == 0) {
        const uint64_t nonce = std::random_device{}() * 0x9e3779b97f4a7c15ull ^ uint64_t(getpid());
        const std::string segment = fmt::format("/kiln-{}-{}-{:016x}", getpid(), name, nonce);
        why = map_segment(*m, segment, true, total);
        if (why.empty()) {
            m->header()->nonce = nonce;
            m->header()->size = size;
        }
        store.set(key + "segment", bytes(why.empty() ? fmt::format("{} {}", segment, nonce) : ""));
        store.set(key + "ok/0", bytes(why.empty() ? "1" : "0"));
        for (int r = 1; r < size; r++)
            store.get(key + "ok/" + std::to_string(r));
        if (why.empty())
            shm_unlink(segment.c_str());  // every rank has it mapped or has given up
    } else {
        std::string published = text(store.get(key + "segment"));
        if (published.empty()) {
            why = "rank 0 could not create the segment";
        } else {
            std::string segment = published.substr(0, published.find(' '));
            uint64_t nonce = std::stoull(published.substr(published.find(' ') + 1));
            why = map_segment(*m, segment, false, total);
            if (why.empty() && (m->header()->nonce != nonce || m->header()->size != size))
                why = fmt::format("{} is another job's segment", segment);
        }
        store.set(key + "ok/" + std::to_string(rank), bytes(why.empty() ? "1" : "0"));
    }
    bool everyone = true;
    for (int r = 0; r < size; r++)
        everyone = everyone && text(store.get(key + "ok/" + std::to_string(r))) == "1";
    if (!why.empty())
        log::warn("dist", "{} group: no shared memory ({}); using TCP", name, why);
    if (!everyone)
        return nullptr;
    return std::make_unique<ShmCollective>(std::move(m), name, rank, size, timeout);
}

}  // namespace kiln::dist
