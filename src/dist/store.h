#pragma once
// The rendezvous store: a small key-value service over TCP. Rank 0 serves it on
// MASTER_ADDR:MASTER_PORT; every rank (rank 0 too) is a client. gloo's full-mesh connection
// runs on top of it (it implements gloo::rendezvous::Store), and so does the arrival check that
// names the ranks that never came.
#include <gloo/rendezvous/store.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace kiln::dist {

class StoreServer;  // runs on rank 0

class TcpStore : public gloo::rendezvous::Store {
public:
    // Rank 0 (`serve`) also starts the server; throws Error when the port is taken. Clients
    // retry the connection until `timeout`, then throw Error naming the address.
    TcpStore(const std::string& host, int port, bool serve, std::chrono::milliseconds timeout);
    ~TcpStore() override;

    void set(const std::string& key, const std::vector<char>& data) override;
    std::vector<char> get(const std::string& key) override;  // waits for the key
    void wait(const std::vector<std::string>& keys) override;
    void wait(const std::vector<std::string>& keys,
              const std::chrono::milliseconds& timeout) override;
    // The keys among `keys` that are not set yet (no waiting).
    std::vector<std::string> missing(const std::vector<std::string>& keys);

private:
    std::vector<char> request(char op, const std::string& key, const std::vector<char>& value);
    std::unique_ptr<StoreServer> server_;
    int fd_ = -1;
    std::chrono::milliseconds timeout_;
};

}  // namespace kiln::dist
