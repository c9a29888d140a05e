#pragma once
// Shared by the fuzz targets (one per parser of outside input; tests/fuzz/CMakeLists.txt).
// A parser may refuse an input only with kiln::Error and one sentence; any other exception
// escapes LLVMFuzzerTestOneInput, ends in std::terminate and is reported as a crash, as are
// sanitizer reports, hangs and memory past the limit.
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include "core/error.h"

namespace kiln::fuzz {

// Stops the run with a report: an invariant of the parser's contract does not hold.
[[noreturn]] inline void finding(const std::string& what) {
    std::fprintf(stderr, "fuzz finding: %s\n", what.c_str());
    std::fflush(stderr);
    std::abort();
}

// A refusal must say something, and stay short enough to print whatever the input holds.
// (It may quote the input, a line break included.)
inline void check_message(const std::string& message) {
    if (message.empty() || message.size() > 4096)
        finding("a refusal is empty or longer than 4096 bytes: " + message.substr(0, 4096));
}

// Runs `f`; a kiln::Error is the expected refusal of a bad input. Returns whether f accepted.
template <typename F>
bool accepted(F&& f) {
    try {
        f();
        return true;
    } catch (const Error& e) {
        check_message(e.what());
        return false;
    }
}

// A folder of this process's own (in memory where /dev/shm exists), removed at exit.
inline const std::string& scratch_dir() {
    struct Dir {
        std::string path;
        Dir() {
            std::string base = std::filesystem::is_directory("/dev/shm")
                                   ? std::string("/dev/shm")
                                   : std::filesystem::temp_directory_path().string();
            std::string pattern = base + "/kiln-fuzz-XXXXXX";
            if (mkdtemp(pattern.data()) == nullptr)
                finding("cannot make a scratch folder under " + base);
            path = pattern;
        }
        ~Dir() {
            std::error_code ec;
            std::filesystem::remove_all(path, ec);
        }
    };
    static Dir dir;
    return dir.path;
}

// Writes `size` bytes to `path`, replacing it.
inline void write_bytes(const std::string& path, const void* data, size_t size) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0)
        finding("cannot write " + path);
}

}  // namespace kiln::fuzz
