#pragma once
// The client side of the jobs API (`kiln submit`, `status`, `logs`, `stop`). The address and
// token come from flags, else KILN_ADDRESS / KILN_TOKEN, else http://127.0.0.1:8265.
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace kiln::serve {

class Client {
public:
    Client(std::string address, std::string token);
    // Each returns the response's JSON; an HTTP error becomes an Error with the server's
    // sentence, an unreachable server an Error naming the address.
    nlohmann::json get(const std::string& path) const;
    nlohmann::json post(const std::string& path, const nlohmann::json& body) const;
    nlohmann::json del(const std::string& path) const;
    // Streams a text response to `out` as it arrives.
    void stream(const std::string& path, const std::function<void(std::string_view)>& out) const;

private:
    std::string address_, token_;
};

std::string default_address();

}  // namespace kiln::serve
