#include "dist/store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "core/error.h"

namespace kiln::dist {
namespace {

// Wire format, both ways: op (1 byte), key length (u32), key, value length (u32), value.
// Ops: 's' set, 'g' get (reply: found byte + value), 'c' check (reply: 1 if set).
bool read_all(int fd, void* buf, size_t n) {
    char* p = static_cast<char*>(buf);
    while (n > 0) {
        ssize_t got = ::recv(fd, p, n, 0);
        if (got <= 0) {
            if (got < 0 && errno == EINTR)
                continue;
            return false;
        }
        p += got;
        n -= size_t(got);
    }
    return true;
}

bool write_all(int fd, const void* buf, size_t n) {
    const char* p = static_cast<const char*>(buf);
    while (n > 0) {
        ssize_t sent = ::send(fd, p, n, MSG_NOSIGNAL);
        if (sent <= 0) {
            if (sent < 0 && errno == EINTR)
                continue;
            return false;
        }
        p += sent;
        n -= size_t(sent);
    }
    return true;
}

bool write_message(int fd, char op, const std::string& key, const std::vector<char>& value) {
    uint32_t kl = uint32_t(key.size()), vl = uint32_t(value.size());
    return write_all(fd, &op, 1) && write_all(fd, &kl, 4) && write_all(fd, key.data(), kl) &&
           write_all(fd, &vl, 4) && write_all(fd, value.data(), vl);
}

bool read_message(int fd, char& op, std::string& key, std::vector<char>& value) {
    uint32_t kl, vl;
    if (!read_all(fd, &op, 1) || !read_all(fd, &kl, 4) || kl > (1u << 20))
        return false;
    key.resize(kl);
    if (!read_all(fd, key.data(), kl) || !read_all(fd, &vl, 4) || vl > (64u << 20))
        return false;
    value.resize(vl);
    return read_all(fd, value.data(), vl);
}

sockaddr_storage resolve(const std::string& host, int port, socklen_t& len) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
    if (rc != 0 || res == nullptr) {
        throw error("MASTER_ADDR={} cannot be resolved: {}", host, gai_strerror(rc));
    }
    sockaddr_storage addr{};
    std::memcpy(&addr, res->ai_addr, res->ai_addrlen);
    len = res->ai_addrlen;
    ::freeaddrinfo(res);
    return addr;
}

}  // namespace

class StoreServer {
public:
    StoreServer(const std::string& host, int port) {
        listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        socklen_t len;
        sockaddr_storage addr = resolve(host, port, len);
        if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
            int e = errno;
            ::close(listen_fd_);
            throw error("cannot serve the rendezvous on {}:{} (MASTER_ADDR:MASTER_PORT): {}", host,
                        port, e == EADDRINUSE ? "the port is in use" : std::strerror(e));
        }
        ::listen(listen_fd_, 256);
        thread_ = std::thread([this] { loop(); });
    }
    ~StoreServer() {
        stop_ = true;
        thread_.join();
        for (int fd : clients_)
            ::close(fd);
        ::close(listen_fd_);
    }

private:
    void loop() {
        while (!stop_) {
            std::vector<pollfd> fds{{listen_fd_, POLLIN, 0}};
            for (int fd : clients_)
                fds.push_back({fd, POLLIN, 0});
            if (::poll(fds.data(), fds.size(), 50) <= 0)
                continue;
            if (fds[0].revents & POLLIN) {
                int fd = ::accept(listen_fd_, nullptr, nullptr);
                if (fd >= 0)
                    clients_.push_back(fd);
            }
            for (size_t i = 1; i < fds.size(); i++) {
                if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
                    continue;
                if (!serve_one(fds[i].fd)) {
                    ::close(fds[i].fd);
                    clients_.erase(std::find(clients_.begin(), clients_.end(), fds[i].fd));
                }
            }
        }
    }
    bool serve_one(int fd) {
        char op;
        std::string key;
        std::vector<char> value;
        if (!read_message(fd, op, key, value))
            return false;
        if (op == 's') {
            data_[key] = value;
            return write_message(fd, 'k', "", {});
        }
        auto it = data_.find(key);
        if (op == 'g') {
            return write_message(fd, it == data_.end() ? 'n' : 'y', "",
                                 it == data_.end() ? std::vector<char>{} : it->second);
        }
        return write_message(fd, it == data_.end() ? 'n' : 'y', "", {});
    }
    int listen_fd_ = -1;
    std::vector<int> clients_;
    std::map<std::string, std::vector<char>> data_;
    std::atomic<bool> stop_{false};
    std::thread thread_;
};

TcpStore::TcpStore(const std::string& host, int port, bool serve, std::chrono::milliseconds timeout)
    : timeout_(timeout) {
    if (serve)
        server_ = std::make_unique<StoreServer>(host, port);
    socklen_t len;
    sockaddr_storage addr = resolve(host, port, len);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
        fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
        if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), len) == 0)
            break;
        ::close(fd_);
        fd_ = -1;
        if (std::chrono::steady_clock::now() > deadline) {
            throw error(
                "no rendezvous at {}:{} (MASTER_ADDR:MASTER_PORT) after {} s: rank 0 "
                "never started serving it",
                host, port, timeout.count() / 1000);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    int one = 1;
    ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

TcpStore::~TcpStore() {
    if (fd_ >= 0)
        ::close(fd_);
}

std::vector<char> TcpStore::request(char op, const std::string& key,
                                    const std::vector<char>& value) {
    char reply;
    std::string unused;
    std::vector<char> out;
    if (!write_message(fd_, op, key, value) || !read_message(fd_, reply, unused, out)) {
        throw error("lost the connection to the rendezvous store (rank 0 exited?)");
    }
    if (reply == 'n')
        return {'\0'};
    out.insert(out.begin(), '\1');  // found marker
    return out;
}

void TcpStore::set(const std::string& key, const std::vector<char>& data) {
    request('s', key, data);
}

std::vector<char> TcpStore::get(const std::string& key) {
    wait({key}, timeout_);
    std::vector<char> v = request('g', key, {});
    v.erase(v.begin());
    return v;
}

std::vector<std::string> TcpStore::missing(const std::vector<std::string>& keys) {
    std::vector<std::string> out;
    for (const auto& k : keys) {
        if (request('c', k, {}).front() == '\0')
            out.push_back(k);
    }
    return out;
}

void TcpStore::wait(const std::vector<std::string>& keys) {
    wait(keys, timeout_);
}

void TcpStore::wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    std::vector<std::string> left = keys;
    while (!(left = missing(left)).empty()) {
        if (std::chrono::steady_clock::now() > deadline) {
            throw error("rendezvous timed out after {} s waiting for {}", timeout.count() / 1000,
                        left.front());
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
}

}  // namespace kiln::dist
