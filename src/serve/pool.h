#pragma once
// The head's connection threads. cpp-httplib serves each connection on one thread for the
// connection's whole life, headers, keep-alive pauses and log follows included, so a fixed pool
// of a few dozen is held by as many clients that send their headers slowly, and the API, the
// dashboard and /metrics stop answering until the read timeout frees them. This pool starts
// `base` threads and adds one whenever a connection finds none idle, up to `max`; past that,
// connections wait for a thread, and the head logs that they do.
#include <httplib.h>

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kiln::serve {

class ConnectionPool : public httplib::TaskQueue {
public:
    ConnectionPool(size_t base, size_t max);
    ~ConnectionPool() override;
    void enqueue(std::function<void()> fn) override;
    void shutdown() override;  // runs what was queued, then joins every thread

    size_t threads() const;  // started so far
    size_t busy() const;     // serving a connection now

private:
    void work();
    void start_thread();  // with mutex_ held

    const size_t max_;
    mutable std::mutex mutex_;
    std::condition_variable wake_;
    std::deque<std::function<void()>> tasks_;
    std::vector<std::thread> threads_;
    size_t idle_ = 0;
    bool stop_ = false;
    bool warned_ = false;  // that connections wait, once per saturation
};

// cpp-httplib listens with a backlog of 5, compiled into Debian's library: a burst of
// connections (a dashboard's fetches, a load test, many slow clients) then loses SYNs, and each
// seventh connection waits a second for the kernel to retry. Listening again on the bound
// socket of `port` raises the backlog to the system's limit.
void widen_listen_backlog(int port);

}  // namespace kiln::serve
