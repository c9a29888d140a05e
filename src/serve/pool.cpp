#include "serve/pool.h"

#include <netinet/in.h>
#include <sys/socket.h>

#include "core/log.h"

namespace kiln::serve {

ConnectionPool::ConnectionPool(size_t base, size_t max) : max_(std::max(base, max)) {
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < base; i++)
        start_thread();
}

ConnectionPool::~ConnectionPool() {
    shutdown();
}

void ConnectionPool::start_thread() {
    threads_.emplace_back([this] { work(); });
}

void ConnectionPool::enqueue(std::function<void()> fn) {
    {
        std::lock_guard lock(mutex_);
        tasks_.push_back(std::move(fn));
        if (idle_ < tasks_.size()) {
            if (threads_.size() < max_) {
                start_thread();
            } else if (!warned_) {
                warned_ = true;
                log::warn("serve",
                          "all {} connection threads are busy; new connections wait for one "
                          "(slow or idle clients hold them until the 10 s read timeout)",
                          max_);
            }
        }
    }
    wake_.notify_one();
}

void ConnectionPool::work() {
    std::unique_lock lock(mutex_);
    while (true) {
        idle_++;
        wake_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
        idle_--;
        if (tasks_.empty())
            return;  // stopping, and nothing left to run
        std::function<void()> fn = std::move(tasks_.front());
        tasks_.pop_front();
        if (tasks_.empty())
            warned_ = false;
        lock.unlock();
        fn();
        lock.lock();
    }
}

void ConnectionPool::shutdown() {
    std::vector<std::thread> threads;
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
        threads.swap(threads_);
    }
    wake_.notify_all();
    for (auto& t : threads)
        t.join();
}

size_t ConnectionPool::threads() const {
    std::lock_guard lock(mutex_);
    return threads_.size();
}

size_t ConnectionPool::busy() const {
    std::lock_guard lock(mutex_);
    return threads_.size() - idle_;
}

void widen_listen_backlog(int port) {
    for (int fd = 3; fd < 4096; fd++) {
        int listening = 0;
        socklen_t size = sizeof listening;
        sockaddr_storage addr{};
        socklen_t len = sizeof addr;
        if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) != 0 || !listening ||
            ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
            continue;
        const int bound =
            addr.ss_family == AF_INET    ? ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port)
            : addr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                                         : -1;
        if (bound == port)
            ::listen(fd, SOMAXCONN);
    }
}

}  // namespace kiln::serve
