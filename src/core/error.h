#pragma once
// Errors, three tiers (see docs/architecture.md):
//   kiln::Error     bad input that ends the command; one sentence naming the file/key/value.
//                   Also a failure of a library that drives hardware (CUDA, cuBLAS, NCCL):
//                   library_failed() names the call and the library's own message.
//   std::optional   expected outcomes ("no checkpoint yet") are return values, not exceptions.
//   KILN_CHECK      broken invariants (programmer errors): print file:line and abort.
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace kiln {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Formats and returns an Error to `throw`: throw error("key {} must be positive", key);
template <typename... Args>
Error error(fmt::format_string<Args...> format, Args&&... args) {
    return Error(fmt::format(format, std::forward<Args>(args)...));
}

[[noreturn]] void check_failed(const char* file, int line, const char* condition,
                               const std::string& message);

// Throws the Error for a failed call of `library` (CUDA, cuBLAS, NCCL): the device, the driver
// or a peer went wrong, not kiln's logic, so the run ends with one sentence (and a gang restart
// can retry it) instead of an abort.
[[noreturn]] void library_failed(const char* library, const char* call, const std::string& message);

}  // namespace kiln

#define KILN_CHECK(cond, ...)                                                          \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            ::kiln::check_failed(__FILE__, __LINE__, #cond, fmt::format(__VA_ARGS__)); \
        }                                                                              \
    } while (0)
