#include "launch/agents.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "core/error.h"
#include "launch/supervisor.h"

namespace kiln::launch {
namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
}

// One agent-to-agent connection: whole lines out, whole lines in, never blocking for long.
struct Link {
    int fd = -1;
    std::string in;  // bytes of an unfinished line
    Clock::time_point heard = Clock::now();

    bool up() const { return fd >= 0; }
    void close() {
        if (fd >= 0)
            ::close(fd);
        fd = -1;
        in.clear();
    }
    void send(const std::string& line) {
        if (fd < 0)
            return;
        std::string s = line + "\n";
        // Small lines into a socket buffer; a full buffer means the other side is long gone.
        if (::send(fd, s.data(), s.size(), MSG_NOSIGNAL | MSG_DONTWAIT) != ssize_t(s.size()))
            close();
    }
    // The complete lines that have arrived; closes the link at end of stream.
    std::vector<std::string> lines() {
        std::vector<std::string> out;
        char buf[4096];
        while (fd >= 0) {
            ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (n > 0) {
                in.append(buf, size_t(n));
                heard = Clock::now();
                if (in.size() > 65536) {  // no line of ours is that long
                    close();
                    break;
                }
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                close();
            break;
        }
        for (size_t nl; (nl = in.find('\n')) != std::string::npos; in.erase(0, nl + 1))
            out.push_back(in.substr(0, nl));
        return out;
    }
    // Waits up to `seconds` for input.
    void wait(double seconds) const {
        if (fd < 0) {
            std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
            return;
        }
        pollfd p{fd, POLLIN, 0};
        ::poll(&p, 1, int(seconds * 1000));
    }
};

std::string word(const std::string& line, size_t i) {  // the i-th space-separated word
    size_t at = 0;
    for (size_t k = 0; k < i && at != std::string::npos; k++) {
        at = line.find(' ', at);
        at = at == std::string::npos ? at : at + 1;
    }
    return at == std::string::npos ? "" : line.substr(at, line.find(' ', at) - at);
}
std::string rest(const std::string& line) {  // everything after the first word
    size_t sp = line.find(' ');
    return sp == std::string::npos ? "" : line.substr(sp + 1);
}

void no_delay(int fd) {  // beats and short lines go out at once
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// Both roles: beats, silence, and the reason to stop.
class Agent : public Peers {
public:
    explicit Agent(const LaunchOptions& o)
        : o_(o), silence_s_(o.hang_timeout_s > 0 ? o.hang_timeout_s : 600) {}
    bool interrupted() const override { return interrupted_; }

protected:
    void beat(std::vector<Link*> links) {
        if (since(beat_) < 1)
            return;
        beat_ = Clock::now();
        for (Link* l : links)
            l->send("beat");
    }
    // The time a host may take to join an attempt: a restart waits for a partition to heal.
    double join_s() const { return std::max(60.0, 10 * silence_s_); }

    const LaunchOptions& o_;
    const double silence_s_;
    Clock::time_point beat_ = Clock::now();
    std::string stop_;  // why the current attempt stops ("" while it runs)
    bool interrupted_ = false;
};

class Coordinator : public Agent {
public:
    explicit Coordinator(const LaunchOptions& o) : Agent(o), members_(size_t(o.nnodes)) {
        listen_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        int one = 1;
        ::setsockopt(listen_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_ANY);
        addr.sin_port = htons(uint16_t(o.agent_port));
        if (::bind(listen_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
            ::listen(listen_, 64) != 0) {
            int e = errno;
            ::close(listen_);
            throw error("--agent-port {}: node 0 cannot listen there for the other hosts: {}",
                        o.agent_port, std::strerror(e));
        }
    }
    ~Coordinator() override {
        for (Link& m : members_)
            m.close();
        ::close(listen_);
    }

    int begin(int attempt) override {
        stop_.clear();
        interrupted_ = false;
        done_.assign(members_.size(), -1);
        std::vector<bool> ready(members_.size(), false);
        ready[0] = true;
        const auto t0 = Clock::now();
        while (true) {
            accept_all();
            for (size_t r = 1; r < members_.size(); r++)
                for (const std::string& line : members_[r].lines())
                    if (line == "ready")
                        ready[r] = true;
            int missing = 0;
            for (size_t r = 1; r < members_.size(); r++)
                missing += !(ready[r] && members_[r].up());
            if (missing == 0)
                break;
            if (since(t0) > join_s()) {
                std::string who;
                for (size_t r = 1; r < members_.size(); r++)
                    if (!(ready[r] && members_[r].up()))
                        who += (who.empty() ? "" : ", ") + std::to_string(r);
                throw error(
                    "node(s) {} did not join within {:.0f} s (their kiln launch --nnodes "
                    "{} --node-rank R --master-addr {} --agent-port {})",
                    who, join_s(), o_.nnodes, o_.master_addr, o_.agent_port);
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        for (size_t r = 1; r < members_.size(); r++) {
            members_[r].send(fmt::format("go {}", attempt));
            members_[r].heard = Clock::now();
        }
        return attempt;
    }

    std::string poll() override {
        accept_all();
        for (size_t r = 1; r < members_.size(); r++) {
            Link& m = members_[r];
            const bool was_up = m.up();
            for (const std::string& line : m.lines())
                hear(r, line);
            if (stop_.empty() && was_up && !m.up())
                stop(fmt::format("node {}'s agent closed its connection", r), false);
            else if (stop_.empty() && m.up() && since(m.heard) > silence_s_) {
                stop(fmt::format("node {} was silent for {:.0f} s (host down or network "
                                 "partition)",
                                 r, since(m.heard)),
                     false);
                m.close();
            }
        }
        beat(links());
        return stop_;
    }

    void failed(const std::string& why, bool interrupted) override {
        stop("node 0: " + why, interrupted);
    }

    Outcome end(bool local_ok) override {
        std::vector<int>& done = done_;
        const auto t0 = Clock::now();
        const double wait_s = silence_s_ + o_.grace_s + 5;
        for (bool waiting = true; waiting && since(t0) < wait_s;) {
            waiting = false;
            for (size_t r = 1; r < members_.size(); r++) {
                for (const std::string& line : members_[r].lines())
                    hear(r, line);
                waiting = waiting || (done[r] < 0 && members_[r].up());
            }
            beat(links());
            if (waiting)
                std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        Outcome out;
        out.ok = local_ok && stop_.empty();
        for (size_t r = 1; r < members_.size(); r++) {
            if (done[r] != 1) {
                out.ok = false;
                if (stop_.empty())
                    stop_ = done[r] < 0 ? fmt::format("node {} did not report its end", r)
                                        : fmt::format("node {}'s ranks failed", r);
            }
        }
        out.interrupted = interrupted_;
        out.reason = out.ok ? "" : stop_;
        const std::string result = out.ok            ? "result ok"
                                   : out.interrupted ? "result interrupted " + out.reason
                                                     : "result failed " + out.reason;
        for (Link* l : links())
            l->send(result);
        return out;
    }

private:
    // A member's news during an attempt or at its end.
    void hear(size_t r, const std::string& line) {
        if (line.rfind("done ", 0) == 0)
            done_[r] = line == "done ok";
        else if (line.rfind("failed ", 0) == 0 || line.rfind("interrupted ", 0) == 0)
            stop(fmt::format("node {}: {}", r, rest(line)), line[0] == 'i');
    }
    std::vector<Link*> links() {
        std::vector<Link*> out;
        for (size_t r = 1; r < members_.size(); r++)
            if (members_[r].up())
                out.push_back(&members_[r]);
        return out;
    }
    void stop(const std::string& why, bool interrupted) {
        if (!stop_.empty())
            return;
        stop_ = why;
        interrupted_ = interrupted;
        for (Link* l : links())
            l->send((interrupted ? "stop! " : "stop ") + why);
    }
    // New connections: each says "hello R" first and takes node R's place.
    void accept_all() {
        for (int fd; (fd = ::accept4(listen_, nullptr, nullptr, SOCK_CLOEXEC)) >= 0;) {
            no_delay(fd);
            Link l;
            l.fd = fd;
            std::vector<std::string> got;
            for (int i = 0; i < 50 && got.empty() && l.up(); i++) {
                l.wait(0.1);
                got = l.lines();
            }
            const std::string hello = got.empty() ? "" : got[0];
            int r = -1;
            if (word(hello, 0) == "hello")
                r = std::atoi(word(hello, 1).c_str());
            if (r < 1 || r >= int(members_.size())) {
                l.close();
                continue;
            }
            std::string early;  // a "ready" sent along with the hello
            for (size_t i = 1; i < got.size(); i++)
                early += got[i] + "\n";
            l.in = early + l.in;
            members_[size_t(r)].close();
            members_[size_t(r)] = l;
        }
    }

    int listen_ = -1;
    std::vector<Link> members_;  // by node rank; [0] unused
    std::vector<int> done_;      // by node rank, this attempt: -1 not yet, 0 failed, 1 ok
};

class Member : public Agent {
public:
    using Agent::Agent;
    ~Member() override { coordinator_.close(); }

    int begin(int /*attempt: the coordinator's count decides*/) override {
        stop_.clear();
        interrupted_ = false;
        const auto t0 = Clock::now();
        while (true) {
            if (!coordinator_.up())
                connect();
            coordinator_.send("ready");
            for (auto t = Clock::now(); coordinator_.up() && since(t) < join_s();) {
                coordinator_.wait(0.2);
                for (const std::string& line : coordinator_.lines())
                    if (word(line, 0) == "go") {
                        coordinator_.heard = Clock::now();
                        return std::atoi(word(line, 1).c_str());
                    }
            }
            if (since(t0) > join_s())
                throw error("node 0 at {}:{} did not start the gang within {:.0f} s",
                            o_.master_addr, o_.agent_port, join_s());
        }
    }

    std::string poll() override {
        const bool was_up = coordinator_.up();
        for (const std::string& line : coordinator_.lines()) {
            if (line.rfind("stop ", 0) == 0 || line.rfind("stop! ", 0) == 0)
                stop(rest(line), line[4] == '!');
        }
        if (stop_.empty() && was_up && !coordinator_.up())
            stop("node 0's agent closed its connection", false);
        else if (stop_.empty() && coordinator_.up() && since(coordinator_.heard) > silence_s_) {
            stop(fmt::format("node 0 was silent for {:.0f} s (host down or network partition)",
                             since(coordinator_.heard)),
                 false);
            coordinator_.close();
        }
        beat({&coordinator_});
        return stop_;
    }

    void failed(const std::string& why, bool interrupted) override {
        if (stop_.empty())
            coordinator_.send((interrupted ? "interrupted " : "failed ") + why);
        stop(fmt::format("node {}: {}", o_.node_rank, why), interrupted);
    }

    Outcome end(bool local_ok) override {
        coordinator_.send(local_ok ? "done ok" : "done failed");
        const auto t0 = Clock::now();
        const double wait_s = silence_s_ + o_.grace_s + 10;
        while (coordinator_.up() && since(t0) < wait_s) {
            coordinator_.wait(0.2);
            for (const std::string& line : coordinator_.lines()) {
                if (line == "result ok")
                    return {true, false, ""};
                if (line.rfind("result ", 0) == 0) {
                    const bool interrupted = word(line, 1) == "interrupted";
                    std::string why = rest(rest(line));
                    return {false, interrupted, why};
                }
                if (line.rfind("stop", 0) == 0)
                    stop(rest(line), line[4] == '!');
            }
            beat({&coordinator_});
        }
        coordinator_.close();  // reconnect for the next attempt
        return {false, interrupted_,
                stop_.empty() ? "lost contact with node 0 at the end of the attempt" : stop_};
    }

private:
    void stop(const std::string& why, bool interrupted) {
        if (!stop_.empty())
            return;
        stop_ = why;
        interrupted_ = interrupted;
    }
    void connect() {
        addrinfo hints{}, *res = nullptr;
        hints.ai_family = AF_INET;
        hints.ai_socktype = SOCK_STREAM;
        const std::string port = std::to_string(o_.agent_port);
        if (int rc = ::getaddrinfo(o_.master_addr.c_str(), port.c_str(), &hints, &res); rc != 0)
            throw error("--master-addr {} cannot be resolved: {}", o_.master_addr,
                        ::gai_strerror(rc));
        const auto t0 = Clock::now();
        std::string last;
        while (since(t0) < join_s()) {
            int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
                no_delay(fd);
                ::freeaddrinfo(res);
                coordinator_.fd = fd;
                coordinator_.in.clear();
                coordinator_.heard = Clock::now();
                coordinator_.send(fmt::format("hello {}", o_.node_rank));
                return;
            }
            last = std::strerror(errno);
            ::close(fd);
            std::this_thread::sleep_for(std::chrono::milliseconds(500));
        }
        ::freeaddrinfo(res);
        throw error("cannot reach node 0's agent at {}:{} for {:.0f} s: {}", o_.master_addr,
                    o_.agent_port, join_s(), last);
    }

    Link coordinator_;
};

}  // namespace

std::unique_ptr<Peers> make_peers(const LaunchOptions& o) {
    if (o.nnodes <= 1)
        return nullptr;
    if (o.node_rank == 0)
        return std::make_unique<Coordinator>(o);
    return std::make_unique<Member>(o);
}

}  // namespace kiln::launch
