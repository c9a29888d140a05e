// The shared-memory gloo transport; see shm_transport.h.
#include "dist/shm_transport.h"

#include <fcntl.h>
#include <gloo/transport/buffer.h>
#include <gloo/transport/context.h>
#include <gloo/transport/pair.h>
#include <gloo/transport/unbound_buffer.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <sstream>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "dist/env.h"
#include "dist/store.h"

namespace kiln::dist {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
constexpr uint64_t kMagic = 0x316d68736e6c696b;  // "kilnshm1"

// Backs the whole 2 MiB pages inside [ptr, ptr + bytes) with huge pages, keeping their contents.
// gloo allocates its receive scratch with 4 KiB pages, and the peer's process_vm_writev pins
// the pages it writes one by one: on small's reduce-scatter right after a backward pass (116 MB
// a rank) that took ~85 ms on 4 KiB pages and ~45 ms on 2 MiB ones. Advice only: a kernel
// without MADV_COLLAPSE (before 6.1) or THP leaves the pages as they are.
void collapse_to_huge_pages(void* ptr, size_t bytes) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
    if (hi < lo + 4 * kHuge)
        return;
#ifndef MADV_COLLAPSE
    constexpr int MADV_COLLAPSE = 25;  // Linux 6.1; older headers lack the name
#endif
    ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
    ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_COLLAPSE);
}

// One control message, a cache line.
struct Msg {
    enum Kind : uint64_t {
        kSend = 1,   // unbound: `nbytes` at `addr` wait for a receive of `slot`; answered by kDone
        kDone = 2,   // unbound: the receiver has copied send `id`
        kReady = 3,  // bound: the receive buffer of `slot` is `nbytes` at `addr`
        kWrote = 4,  // bound: the sender has written into the receive buffer of `slot`
    };
    uint64_t kind = 0;
    uint64_t id = 0;
    uint64_t slot = 0;
    uint64_t addr = 0;  // in the address space of the process that sent the message
    uint64_t nbytes = 0;
    uint64_t unused[3] = {};
};
static_assert(sizeof(Msg) == 64);

// A single-producer single-consumer ring in shared memory: the peer appends, the owner consumes.
struct Ring {
    static constexpr uint64_t kSlots = 1024;
    uint64_t magic;
    uint64_t nonce;
    alignas(64) std::atomic<uint64_t> tail;  // messages appended, written by the peer
    alignas(64) std::atomic<uint64_t> head;  // messages consumed, written by the owner
    alignas(64) Msg slots[kSlots];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free);

// What a pair publishes for its peer: fixed size, as gloo's full mesh expects.
struct Address final : gloo::transport::Address {
    struct Bytes {
        uint64_t magic = kMagic;
        uint64_t nonce = 0;
        int32_t pid = 0;
        int32_t fd = -1;
        int32_t rank = -1;
        int32_t unused = 0;
    } b;
    std::string str() const override { return fmt::format("pid {} fd {}", b.pid, b.fd); }
    std::vector<char> bytes() const override {
        const char* p = reinterpret_cast<const char*>(&b);
        return {p, p + sizeof b};
    }
};

uint64_t random_nonce() {
    std::random_device rd;
    return (uint64_t(rd()) << 32) ^ rd() ^ uint64_t(getpid());
}

Ring* map_ring(int fd) {
    void* p = mmap(nullptr, sizeof(Ring), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? nullptr : static_cast<Ring*>(p);
}

// Whether process `pid` still runs (a zombie does not).
bool alive(pid_t pid) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    if (!std::getline(stat, line))
        return false;
    const auto paren = line.rfind(')');
    return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] != 'Z' &&
           line[paren + 2] != 'X';
}

// Copies `n` bytes between `local` and `remote` in process `pid` (rank `rank`): from the remote
// process (`read`) or to it.
void copy(pid_t pid, int rank, bool read, void* local, uint64_t remote, size_t n) {
    char* here = static_cast<char*>(local);
    while (n > 0) {
        iovec l{here, n}, r{reinterpret_cast<void*>(remote), n};
        const ssize_t done =
            read ? process_vm_readv(pid, &l, 1, &r, 1, 0) : process_vm_writev(pid, &l, 1, &r, 1, 0);
        if (done <= 0)
            throw error("cannot {} {} bytes {} rank {} (pid {}): {}", read ? "read" : "write", n,
                        read ? "from" : "to", rank, pid,
                        done < 0 ? strerror(errno) : "no progress");
        here += done, remote += uint64_t(done), n -= size_t(done);
    }
}

class Context;
class Pair;

// A bound buffer, gloo's original API: a send writes into the peer's buffer of the same slot.
// The sender copies it there before send() returns (the receive buffer announced its address when
// it was made): gloo's algorithms may reuse a sent region before hearing from the receiver.
class Buffer final : public gloo::transport::Buffer {
public:
    Buffer(Pair& pair, int slot, void* ptr, size_t size)
        : gloo::transport::Buffer(slot, ptr, size), pair_(pair) {}
    ~Buffer() override;
    using gloo::transport::Buffer::send;
    void send(size_t offset, size_t length, size_t roffset) override;
    void waitRecv() override;
    void waitSend() override {}  // a send is complete when send() returns

    char* data() { return static_cast<char*>(ptr_); }
    size_t size() const { return size_; }
    int recvs_done = 0;  // under the context's lock

private:
    Pair& pair_;
};

// A buffer of gloo's newer API: sends and receives name the peer rank and a slot.
class UnboundBuffer final : public gloo::transport::UnboundBuffer {
public:
    UnboundBuffer(Context& ctx, void* ptr, size_t size)
        : gloo::transport::UnboundBuffer(ptr, size), ctx_(ctx) {}
    ~UnboundBuffer() override;
    using gloo::transport::UnboundBuffer::waitRecv;
    using gloo::transport::UnboundBuffer::waitSend;
    bool waitRecv(int* rank, milliseconds timeout) override {
        return wait(received_, rank, timeout);
    }
    bool waitSend(int* rank, milliseconds timeout) override { return wait(sent_, rank, timeout); }
    void abortWaitRecv() override;
    void abortWaitSend() override;
    void send(int dst, uint64_t slot, size_t offset, size_t nbytes) override;
    void recv(int src, uint64_t slot, size_t offset, size_t nbytes) override;
    void recv(std::vector<int> srcs, uint64_t slot, size_t offset, size_t nbytes) override;

    // Under the context's lock: a transfer with `rank` finished.
    void sent(int rank) { sent_.done.push_back(rank); }
    void received(int rank) { received_.done.push_back(rank); }

private:
    struct Completions {
        std::deque<int> done;  // peers, in the order their transfers finished
        bool abort = false;
    };
    bool wait(Completions& c, int* rank, milliseconds timeout);
    size_t resolve(size_t offset, size_t nbytes) const;
    Context& ctx_;
    Completions sent_, received_;
};

// A posted receive of an unbound buffer.
struct Recv {
    UnboundBuffer* buf = nullptr;
    size_t offset = 0, nbytes = 0;
    std::vector<int> from;  // for receives from any of several ranks
    uint64_t slot = 0;
};

class Pair final : public gloo::transport::Pair {
public:
    Pair(Context& ctx, int self, int peer);
    ~Pair() override;
    const gloo::transport::Address& address() const override { return address_; }
    void connect(const std::vector<char>& bytes) override;
    void close() override {}
    void setSync(bool, bool) override {}  // every wait makes progress itself
    std::unique_ptr<gloo::transport::Buffer> createSendBuffer(int slot, void* ptr,
                                                              size_t size) override;
    std::unique_ptr<gloo::transport::Buffer> createRecvBuffer(int slot, void* ptr,
                                                              size_t size) override;
    void send(gloo::transport::UnboundBuffer* buf, uint64_t slot, size_t offset,
              size_t nbytes) override;
    void recv(gloo::transport::UnboundBuffer* buf, uint64_t slot, size_t offset,
              size_t nbytes) override;

    // Copies into the peer's receive buffer of `slot` once it has announced it; takes the lock.
    void write(Buffer& buf, int slot, size_t offset, size_t length, size_t roffset);
    // The rest runs under the context's lock.
    bool progress();  // sends queued messages and handles arrived ones; true when any moved
    void match(uint64_t slot);     // pairs the peer's announced sends with posted receives
    void forget(const void* buf);  // a buffer is going away: drop what refers to it
    Context& context() { return ctx_; }
    int peer() const { return peer_; }
    pid_t peer_pid() const { return peer_pid_; }

private:
    void post(const Msg& m);
    void flush();
    void handle(const Msg& m);
    Context& ctx_;
    const int self_, peer_;
    int fd_ = -1;
    Ring* in_ = nullptr;   // messages from the peer (this process made it)
    Ring* out_ = nullptr;  // messages to the peer (the peer's `in_`)
    pid_t peer_pid_ = 0;
    Address address_;
    uint64_t next_id_ = 1;
    std::deque<Msg> outq_;               // messages waiting for room in `out_`
    std::map<int, Buffer*> bound_recv_;  // by slot
    std::map<int, Msg> peer_recv_;       // the peer's receive buffers (kReady), by slot
    std::map<uint64_t, UnboundBuffer*> unbound_sends_;  // by id, until the peer has read them
    std::map<uint64_t, std::deque<Msg>> announced_;     // the peer's unmatched sends, by slot
    std::map<uint64_t, std::deque<Recv>> recvs_;        // posted receives from the peer, by slot
};

class Context final : public gloo::transport::Context {
public:
    Context(int rank, int size) : gloo::transport::Context(rank, size) {
        if (pairs_.size() < size_t(size))
            pairs_.resize(size_t(size));
    }
    std::unique_ptr<gloo::transport::Pair>& createPair(int peer) override {
        pairs_.at(size_t(peer)) = std::make_unique<Pair>(*this, rank, peer);
        return pairs_[size_t(peer)];
    }
    std::unique_ptr<gloo::transport::UnboundBuffer> createUnboundBuffer(void* ptr,
                                                                        size_t size) override {
        return std::make_unique<UnboundBuffer>(*this, ptr, size);
    }
    std::mutex& mutex() { return mutex_; }
    Pair& pair(int peer) {
        if (peer < 0 || peer >= size || peer == rank || !pairs_[size_t(peer)])
            throw error("no shared-memory pair from rank {} to rank {}", rank, peer);
        return static_cast<Pair&>(*pairs_[size_t(peer)]);
    }

    // Makes progress on every pair until `done()` (called under the lock) holds. Throws Error
    // when that takes longer than `timeout` (kUnsetTimeout: the context's) or a peer has exited.
    template <typename Done>
    void wait(Done&& done, milliseconds timeout);

    // Under the lock: takes the oldest receive from any of several ranks that `peer`'s send on
    // `slot` can complete.
    bool take_any(uint64_t slot, int peer, Recv* out) {
        for (auto it = any_.begin(); it != any_.end(); ++it)
            if (it->slot == slot && std::count(it->from.begin(), it->from.end(), peer)) {
                *out = *it;
                any_.erase(it);
                return true;
            }
        return false;
    }
    void post_any(Recv r) { any_.push_back(std::move(r)); }
    void forget(const void* buf) {
        any_.erase(
            std::remove_if(any_.begin(), any_.end(), [&](const Recv& r) { return r.buf == buf; }),
            any_.end());
        for (auto& p : pairs_)
            if (p)
                static_cast<Pair&>(*p).forget(buf);
    }

private:
    std::deque<Recv> any_;
};

// --- Context ------------------------------------------------------------------------------

constexpr milliseconds kExitedPeerGrace{3000};

template <typename Done>
void Context::wait(Done&& done, milliseconds timeout) {
    if (timeout == gloo::transport::kUnsetTimeout)
        timeout = getTimeout();
    const auto start = Clock::now();
    auto next_check = start + milliseconds(100);
    std::optional<Clock::time_point> dead_seen;  // when a peer was first seen to have exited
    for (int idle = 0;;) {
        {
            std::lock_guard lock(mutex_);
            bool moved = false;
            for (auto& p : pairs_)
                if (p)
                    moved |= static_cast<Pair&>(*p).progress();
            if (done())
                return;
            idle = moved ? 0 : idle + 1;
        }
        // Spin while messages flow; then yield the core to whoever computes on it; then sleep.
        if (idle > 2000)
            usleep(20);
        else if (idle > 50)
            sched_yield();
        const auto now = Clock::now();
        if (now < next_check)
            continue;
        next_check = now + milliseconds(100);
        // A peer that exited fails the wait unless the wait ends soon after. It may have posted
        // its last message and exited between our progress above and this check, or finished
        // its part of the collective (the last barrier of a job) while we wait for a live peer.
        // What we waited for from the dead one never comes, so a short grace tells them apart.
        for (auto& p : pairs_) {
            const auto* pair = static_cast<const Pair*>(p.get());
            if (!pair || !pair->peer_pid() || alive(pair->peer_pid()))
                continue;
            if (!dead_seen)
                dead_seen = now;
            if (now - *dead_seen > kExitedPeerGrace)
                throw error("rank {} (pid {}) exited while rank {} waited in a collective",
                            pair->peer(), pair->peer_pid(), rank);
        }
        if (timeout > milliseconds(0) && now - start > timeout)
            throw error("rank {} waited in a collective for more than {} s (parallel.timeout_s)",
                        rank, timeout.count() / 1000.0);
    }
}

// --- Buffer -------------------------------------------------------------------------------

Buffer::~Buffer() {
    std::lock_guard lock(pair_.context().mutex());
    pair_.forget(this);
}

void Buffer::send(size_t offset, size_t length, size_t roffset) {
    if (offset + length > size_)
        throw error("a send of {} bytes at offset {} overruns its {}-byte buffer", length, offset,
                    size_);
    pair_.write(*this, slot_, offset, length, roffset);
}

void Buffer::waitRecv() {
    pair_.context().wait(
        [&] {
            if (recvs_done == 0)
                return false;
            recvs_done--;
            return true;
        },
        gloo::transport::kUnsetTimeout);
}

// --- UnboundBuffer ------------------------------------------------------------------------

UnboundBuffer::~UnboundBuffer() {
    std::lock_guard lock(ctx_.mutex());
    ctx_.forget(this);
}

bool UnboundBuffer::wait(Completions& c, int* rank, milliseconds timeout) {
    bool completed = false;
    ctx_.wait(
        [&] {
            if (!c.done.empty()) {
                if (rank)
                    *rank = c.done.front();
                c.done.pop_front();
                return completed = true;
            }
            if (c.abort) {
                c.abort = false;
                return true;
            }
            return false;
        },
        timeout);
    return completed;
}

void UnboundBuffer::abortWaitRecv() {
    std::lock_guard lock(ctx_.mutex());
    received_.abort = true;
}

void UnboundBuffer::abortWaitSend() {
    std::lock_guard lock(ctx_.mutex());
    sent_.abort = true;
}

size_t UnboundBuffer::resolve(size_t offset, size_t nbytes) const {
    if (nbytes == kUnspecifiedByteCount)
        nbytes = offset <= size ? size - offset : 0;
    if (offset > size || nbytes > size - offset)
        throw error("a transfer of {} bytes at offset {} overruns its {}-byte buffer", nbytes,
                    offset, size);
    return nbytes;
}

void UnboundBuffer::send(int dst, uint64_t slot, size_t offset, size_t nbytes) {
    ctx_.pair(dst).send(this, slot, offset, resolve(offset, nbytes));
}

void UnboundBuffer::recv(int src, uint64_t slot, size_t offset, size_t nbytes) {
    ctx_.pair(src).recv(this, slot, offset, resolve(offset, nbytes));
}

void UnboundBuffer::recv(std::vector<int> srcs, uint64_t slot, size_t offset, size_t nbytes) {
    if (srcs.size() == 1)
        return recv(srcs[0], slot, offset, nbytes);
    nbytes = resolve(offset, nbytes);
    std::lock_guard lock(ctx_.mutex());
    for (int s : srcs)
        ctx_.pair(s);  // validates the rank
    ctx_.post_any(Recv{this, offset, nbytes, srcs, slot});
    for (int s : srcs)
        ctx_.pair(s).match(slot);
}

// --- Pair ---------------------------------------------------------------------------------

Pair::Pair(Context& ctx, int self, int peer) : ctx_(ctx), self_(self), peer_(peer) {
    fd_ = memfd_create("kiln-gloo", MFD_CLOEXEC);
    if (fd_ < 0 || ftruncate(fd_, sizeof(Ring)) != 0 || !(in_ = map_ring(fd_)))
        throw error("cannot make a shared-memory ring for rank {}: {}", peer, strerror(errno));
    in_->magic = kMagic;
    in_->nonce = random_nonce();
    address_.b.nonce = in_->nonce;
    address_.b.pid = getpid();
    address_.b.fd = fd_;
    address_.b.rank = self;
}

Pair::~Pair() {
    if (in_)
        munmap(in_, sizeof(Ring));
    if (out_)
        munmap(out_, sizeof(Ring));
    if (fd_ >= 0)
        ::close(fd_);
}

void Pair::connect(const std::vector<char>& bytes) {
    Address::Bytes b;
    if (bytes.size() != sizeof b)
        throw error("rank {} published a shared-memory address of {} bytes, not {}", peer_,
                    bytes.size(), sizeof b);
    std::memcpy(&b, bytes.data(), sizeof b);
    if (b.magic != kMagic || b.rank != peer_)
        throw error("rank {} published no shared-memory address for rank {}", peer_, self_);
    const std::string path = fmt::format("/proc/{}/fd/{}", b.pid, b.fd);
    const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0)
        throw error("cannot open rank {}'s ring {}: {}", peer_, path, strerror(errno));
    out_ = map_ring(fd);
    ::close(fd);
    if (!out_ || out_->magic != kMagic || out_->nonce != b.nonce)
        throw error("{} is not the ring rank {} published (another host or PID namespace?)", path,
                    peer_);
    peer_pid_ = b.pid;
}

std::unique_ptr<gloo::transport::Buffer> Pair::createSendBuffer(int slot, void* ptr, size_t size) {
    return std::make_unique<Buffer>(*this, slot, ptr, size);
}

std::unique_ptr<gloo::transport::Buffer> Pair::createRecvBuffer(int slot, void* ptr, size_t size) {
    auto buf = std::make_unique<Buffer>(*this, slot, ptr, size);
    collapse_to_huge_pages(ptr, size);  // once per buffer: gloo's algorithms keep theirs
    std::lock_guard lock(ctx_.mutex());
    if (bound_recv_.count(slot))
        throw error("two receive buffers for slot {} from rank {}", slot, peer_);
    bound_recv_[slot] = buf.get();
    Msg ready;
    ready.kind = Msg::kReady;
    ready.slot = uint64_t(slot);
    ready.addr = reinterpret_cast<uint64_t>(ptr);
    ready.nbytes = size;
    post(ready);
    return buf;
}

void Pair::send(gloo::transport::UnboundBuffer* base, uint64_t slot, size_t offset, size_t nbytes) {
    auto* buf = static_cast<UnboundBuffer*>(base);  // made by this transport's context
    std::lock_guard lock(ctx_.mutex());
    Msg m;
    m.kind = Msg::kSend;
    m.id = next_id_++;
    m.slot = slot;
    m.addr = reinterpret_cast<uint64_t>(buf->ptr) + offset;
    m.nbytes = nbytes;
    unbound_sends_[m.id] = buf;
    post(m);
}

void Pair::recv(gloo::transport::UnboundBuffer* base, uint64_t slot, size_t offset, size_t nbytes) {
    auto* buf = static_cast<UnboundBuffer*>(base);
    std::lock_guard lock(ctx_.mutex());
    recvs_[slot].push_back(Recv{buf, offset, nbytes, {}, slot});
    match(slot);
}

void Pair::write(Buffer& buf, int slot, size_t offset, size_t length, size_t roffset) {
    ctx_.wait([&] { return peer_recv_.count(slot) > 0; }, gloo::transport::kUnsetTimeout);
    std::lock_guard lock(ctx_.mutex());
    const Msg& to = peer_recv_[slot];
    if (roffset > to.nbytes || length > to.nbytes - roffset)
        throw error("a write of {} bytes at offset {} overruns rank {}'s {}-byte buffer (slot {})",
                    length, roffset, peer_, to.nbytes, slot);
    copy(peer_pid_, peer_, false, buf.data() + offset, to.addr + roffset, length);
    Msg wrote;
    wrote.kind = Msg::kWrote;
    wrote.slot = uint64_t(slot);
    post(wrote);
}

void Pair::post(const Msg& m) {
    outq_.push_back(m);
    flush();
}

void Pair::flush() {
    if (outq_.empty())
        return;
    uint64_t tail = out_->tail.load(std::memory_order_relaxed);
    const uint64_t head = out_->head.load(std::memory_order_acquire);
    for (; !outq_.empty() && tail - head < Ring::kSlots; tail++) {
        out_->slots[tail % Ring::kSlots] = outq_.front();
        outq_.pop_front();
    }
    out_->tail.store(tail, std::memory_order_release);
}

bool Pair::progress() {
    if (!out_)
        return false;  // not connected yet
    flush();
    uint64_t head = in_->head.load(std::memory_order_relaxed);
    const uint64_t tail = in_->tail.load(std::memory_order_acquire);
    const bool moved = head != tail;
    for (; head != tail; head++) {
        const Msg m = in_->slots[head % Ring::kSlots];
        in_->head.store(head + 1, std::memory_order_release);
        handle(m);
    }
    flush();
    return moved;
}

void Pair::handle(const Msg& m) {
    switch (m.kind) {
        case Msg::kDone:
            if (auto u = unbound_sends_.find(m.id); u != unbound_sends_.end()) {
                u->second->sent(peer_);
                unbound_sends_.erase(u);
            }  // else its buffer is gone, and nobody waits
            return;
        case Msg::kReady:
            peer_recv_[int(m.slot)] = m;
            return;
        case Msg::kWrote:
            if (auto b = bound_recv_.find(int(m.slot)); b != bound_recv_.end())
                b->second->recvs_done++;
            return;
        case Msg::kSend:
            announced_[m.slot].push_back(m);
            match(m.slot);
            return;
        default:
            throw error("rank {} sent a message of unknown kind {}", peer_, m.kind);
    }
}

void Pair::match(uint64_t slot) {
    auto sends = announced_.find(slot);
    if (sends == announced_.end())
        return;
    while (!sends->second.empty()) {
        Recv r;
        auto posted = recvs_.find(slot);
        if (posted != recvs_.end() && !posted->second.empty()) {
            r = posted->second.front();
            posted->second.pop_front();
            if (posted->second.empty())
                recvs_.erase(posted);
        } else if (!ctx_.take_any(slot, peer_, &r)) {
            return;
        }
        const Msg m = sends->second.front();
        sends->second.pop_front();
        if (m.nbytes != r.nbytes)
            throw error("rank {} sent {} bytes on slot {} where rank {} expected {}", peer_,
                        m.nbytes, slot, self_, r.nbytes);
        copy(peer_pid_, peer_, true, static_cast<char*>(r.buf->ptr) + r.offset, m.addr, m.nbytes);
        r.buf->received(peer_);
        Msg done;
        done.kind = Msg::kDone;
        done.id = m.id;
        post(done);
    }
    announced_.erase(sends);
}

void Pair::forget(const void* buf) {
    for (auto it = bound_recv_.begin(); it != bound_recv_.end();)
        it = it->second == buf ? bound_recv_.erase(it) : std::next(it);

    for (auto it = unbound_sends_.begin(); it != unbound_sends_.end();)
        it = it->second == buf ? unbound_sends_.erase(it) : std::next(it);
    for (auto& [slot, q] : recvs_)
        q.erase(std::remove_if(q.begin(), q.end(), [&](const Recv& r) { return r.buf == buf; }),
                q.end());
}

// --- Device -------------------------------------------------------------------------------

class Device final : public gloo::transport::Device {
public:
    std::string str() const override { return "shared memory"; }
    const std::string& getPCIBusID() const override {
        static const std::string none;
        return none;
    }
    std::shared_ptr<gloo::transport::Context> createContext(int rank, int size) override {
        return std::make_shared<Context>(rank, size);
    }
};

}  // namespace

std::shared_ptr<gloo::transport::Device> make_shm_device() {
    return std::make_shared<Device>();
}

bool shm_reachable(TcpStore& store, int rank, int size, bool widen_ptrace, std::string* why) {
    // Under Yama's ptrace_scope 1 a process may read only its descendants' memory, and ranks are
    // siblings. Widening that to every process of this user (what the scope is without Yama) is
    // done only when asked for, and said.
    std::ifstream yama("/proc/sys/kernel/yama/ptrace_scope");
    int scope = 0;
    std::string reason;
    if (yama >> scope && scope == 1) {
        if (widen_ptrace) {
            prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
            if (rank == 0)
                log::warn("dist",
                          "parallel.transport=shm under Yama ptrace_scope 1: each rank now lets "
                          "every process of this user read and write its memory "
                          "(PR_SET_PTRACER_ANY); parallel.transport=tcp keeps that protection");
        } else {
            reason =
                "Yama's ptrace_scope 1 keeps sibling ranks from reading each other's memory "
                "(parallel.transport=shm lifts it for every process of this user)";
        }
    }
    const std::string host = host_name();
    const uint64_t nonce = random_nonce();
    const int fd = memfd_create("kiln-probe", MFD_CLOEXEC);
    if (fd < 0 || pwrite(fd, &nonce, sizeof nonce, 0) != ssize_t(sizeof nonce))
        reason = fmt::format("rank {} cannot make a memfd: {}", rank, strerror(errno));
    auto put = [&](const std::string& key, const std::string& value) {
        store.set(key, std::vector<char>(value.begin(), value.end()));
    };
    auto get = [&](const std::string& key) {
        auto v = store.get(key);
        return std::string(v.begin(), v.end());
    };
    put(fmt::format("shm/probe/{}", rank), fmt::format("{} {} {} {} {}", host, getpid(), fd, nonce,
                                                       reinterpret_cast<uint64_t>(&nonce)));
    // Each rank reads every other rank's nonce twice: from its memfd through /proc (same host,
    // same PID namespace) and from its memory with process_vm_readv (permission to copy).
    for (int r = 0; r < size && reason.empty(); r++) {
        if (r == rank)
            continue;
        std::istringstream in(get(fmt::format("shm/probe/{}", r)));
        std::string peer_host;
        pid_t pid = 0;
        int peer_fd = -1;
        uint64_t peer_nonce = 0, addr = 0, seen = 0;
        in >> peer_host >> pid >> peer_fd >> peer_nonce >> addr;
        const std::string path = fmt::format("/proc/{}/fd/{}", pid, peer_fd);
        const int f = peer_host == host ? open(path.c_str(), O_RDONLY | O_CLOEXEC) : -1;
        if (peer_host != host) {
            reason = fmt::format("rank {} runs on {}, rank {} on {}", r, peer_host, rank, host);
        } else if (f < 0 || pread(f, &seen, sizeof seen, 0) != ssize_t(sizeof seen) ||
                   seen != peer_nonce) {
            reason = fmt::format("rank {} cannot open rank {}'s {}: {}", rank, r, path,
                                 f < 0 ? strerror(errno) : "another PID namespace");
        } else {
            iovec l{&seen, sizeof seen}, rem{reinterpret_cast<void*>(addr), sizeof seen};
            seen = 0;
            if (process_vm_readv(pid, &l, 1, &rem, 1, 0) != ssize_t(sizeof seen) ||
                seen != peer_nonce)
                reason = fmt::format("rank {} may not read rank {}'s memory: {}", rank, r,
                                     strerror(errno));
        }
        if (f >= 0)
            ::close(f);
    }
    put(fmt::format("shm/verdict/{}", rank), reason.empty() ? "ok" : "no " + reason);
    why->clear();
    for (int r = 0; r < size; r++) {  // also keeps this rank's probe open until all have read it
        const std::string verdict = get(fmt::format("shm/verdict/{}", r));
        if (verdict != "ok" && why->empty())
            *why = verdict.substr(3);
    }
    if (fd >= 0)
        ::close(fd);
    return why->empty();
}

}  // namespace kiln::dist
