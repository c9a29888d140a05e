#pragma once
// Test helpers shared by the test executables: temporary folders, the kiln binary, and the
// PyTorch reference fixtures (tests/reference/llama_ref.py, run with Debian's python3-torch).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>

#include "core/error.h"
#include "core/fs.h"

namespace kiln::testing {

// Baked in by tests/CMakeLists.txt.
inline std::string source_dir() {
    return KILN_SOURCE_DIR;
}
inline std::string kiln_binary() {
    return KILN_BINARY;
}

// A fresh folder under the system temp dir, removed at destruction.
struct TempDir {
    std::string path;
    TempDir() {
        std::string pattern =
            (std::filesystem::temp_directory_path() / "kiln-test-XXXXXX").string();
        path = mkdtemp(pattern.data());
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string operator/(const std::string& name) const { return path + "/" + name; }
};

// Every test process (CTest runs one per case) gets its own cache folder, so that the plan
// caches of runs it starts (train/autotune.h) are its own: a case that compares two runs bit for
// bit never finds a plan another case tuned in between.
inline const TempDir& test_cache_home() {
    static TempDir dir;
    static const int set = setenv("XDG_CACHE_HOME", dir.path.c_str(), 1);
    (void)set;
    return dir;
}
inline const TempDir& test_cache_home_at_start = test_cache_home();

// Runs a shell command; returns its exit status.
inline int run(const std::string& command) {
    int rc = std::system(command.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

struct Result {
    int rc;
    std::string out;  // stdout and stderr together
};

// The kiln binary run with `args`; `env`: assignments before the command ("NAME=value ").
inline Result kiln(const std::string& args, const std::string& env = "") {
    TempDir tmp;
    const std::string cmd = env + kiln_binary() + " " + args + " >" + (tmp / "out") + " 2>&1";
    const int rc = run(cmd);
    return {rc, fs::read_file(tmp / "out")};
}

// The message of the kiln::Error that f throws ("" when it throws none).
inline std::string message_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

// Why this machine's kiln refuses bf16 products ("" when it runs them): its own one sentence.
inline std::string without_bf16_products() {
    static const std::string why = [] {
        std::string out;
        std::string cmd = kiln_binary() + " train --set train.precision=bf16 --check 2>&1";
        if (std::FILE* p = ::popen(cmd.c_str(), "r")) {
            char buf[4096];
            while (size_t n = std::fread(buf, 1, sizeof buf, p))
                out.append(buf, n);
            if (::pclose(p) == 0)
                out.clear();
        }
        return out;
    }();
    return why;
}

inline bool have_torch() {
    static int rc = run("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1");
    return rc == 0;
}

// Writes a reference fixture with `args` (llama_ref.py fixture flags) to `out`.
inline void make_fixture(const std::string& out, const std::string& args) {
    std::string cmd = "/usr/bin/python3 " + source_dir() +
                      "/tests/reference/llama_ref.py fixture --out " + out + " " + args +
                      " >/dev/null";
    ASSERT_EQ(run(cmd), 0) << cmd;
}

}  // namespace kiln::testing
