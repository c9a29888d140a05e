#include "serve/client.h"

#include <httplib.h>

#include <cstdlib>

#include "core/error.h"

namespace kiln::serve {
namespace {

using json = nlohmann::json;

httplib::Headers headers(const std::string& token) {
    httplib::Headers h;
    if (!token.empty())
        h.emplace("Authorization", "Bearer " + token);
    return h;
}

json parse(const std::string& address, const std::string& path, const httplib::Result& r) {
    if (!r)
        throw error("cannot reach the head node at {}: {} error (is `kiln serve` running there?)",
                    address, httplib::to_string(r.error()));
    json body = json::parse(r->body, nullptr, false);
    if (r->status >= 400) {
        std::string why = body.is_object() && body.contains("error")
                              ? body["error"].get<std::string>()
                              : r->body.substr(0, 200);
        throw error("{} {}: {}", r->status, path, why);
    }
    if (body.is_discarded())
        throw error("{}{} answered with something that is not JSON", address, path);
    return body;
}

}  // namespace

std::string default_address() {
    const char* a = std::getenv("KILN_ADDRESS");
    return a && *a ? a : "http://127.0.0.1:8265";
}

Client::Client(std::string address, std::string token)
    : address_(std::move(address)), token_(std::move(token)) {
    if (token_.empty()) {
        if (const char* t = std::getenv("KILN_TOKEN"))
            token_ = t;
    }
    if (address_.rfind("http://", 0) != 0)
        throw error("address {} must start with http://", address_);
}

json Client::get(const std::string& path) const {
    httplib::Client c(address_);
    return parse(address_, path, c.Get(path.c_str(), headers(token_)));
}

json Client::post(const std::string& path, const json& body) const {
    httplib::Client c(address_);
    return parse(address_, path,
                 c.Post(path.c_str(), headers(token_), body.dump(), "application/json"));
}

json Client::del(const std::string& path) const {
    httplib::Client c(address_);
    return parse(address_, path, c.Delete(path.c_str(), headers(token_)));
}

void Client::stream(const std::string& path,
                    const std::function<void(std::string_view)>& out) const {
    httplib::Client c(address_);
    c.set_read_timeout(3600, 0);
    std::string error_body;
    int status = 0;
    auto r = c.Get(
        path.c_str(), headers(token_),
        [&](const httplib::Response& res) {
            status = res.status;
            return true;
        },
        [&](const char* data, size_t n) {
            if (status >= 400)
                error_body.append(data, n);
            else
                out(std::string_view(data, n));
            return true;
        });
    if (!r)
        throw error("cannot reach the head node at {}: {}", address_,
                    httplib::to_string(r.error()));
    if (status >= 400) {
        json body = json::parse(error_body, nullptr, false);
        throw error("{} {}: {}", status, path,
                    body.is_object() && body.contains("error") ? body["error"].get<std::string>()
                                                               : error_body);
    }
}

}  // namespace kiln::serve
