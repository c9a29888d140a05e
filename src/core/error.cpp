#include "core/error.h"

#include <cstdio>
#include <cstdlib>

namespace kiln {

void check_failed(const char* file, int line, const char* condition, const std::string& message) {
    std::fprintf(stderr, "kiln: internal error at %s:%d: check `%s` failed: %s\n", file, line,
                 condition, message.c_str());
    std::fflush(stderr);
    std::abort();
}

void library_failed(const char* library, const char* call, const std::string& message) {
    throw Error(fmt::format("{}: {} failed: {}", library, call, message));
}

}  // namespace kiln
