// What a job of the head may touch. The jobs API runs whatever kiln command it is sent, and a
// kiln command that writes a file where its caller says is as good as running code (a
// ~/.bashrc, an authorized_keys). So a job works inside the head's roots: its runs folder and
// the data roots it was given (`kiln serve --data-root DIR`).
//   - Its file arguments (--out, --corpus, --checkpoint, --tokenizer, --data, --config, the
//     folder of `data verify`, and the path keys of --set) must resolve inside a root; the head
//     refuses the job otherwise, naming the argument.
//   - Where the kernel has Landlock, the job's processes cannot create, change or remove files
//     anywhere else (the roots, /tmp, /dev/shm and kiln's cache folder excepted), whatever a
//     config file names. Reading is not restricted by the kernel.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace kiln::serve {

struct Sandbox {
    std::vector<std::string> roots;  // absolute and symlink-free: the runs folder first
    std::string cwd;                 // what a relative argument is relative to (the head's)

    // The runs folder and the data roots, resolved; throws Error naming a data root that is not
    // a folder.
    static Sandbox of(const std::string& runs, const std::vector<std::string>& data_roots);

    // Throws Error naming the first file argument of `entrypoint` (a kiln command without
    // "kiln") that resolves outside every root.
    void check(const std::vector<std::string>& entrypoint) const;
    // The folder `path` (relative to cwd) resolved, links and `..` followed. Throws Error
    // naming `what` when it is not an existing folder inside a root.
    std::string folder(const std::string& what, const std::string& path) const;
    // Throws Error naming the first variable of a job's environment (runtime_env.env_vars)
    // that it may not set: a malformed or oversized one, one that loads code into the job
    // (LD_PRELOAD, ...) or moves its binaries (PATH), or one the head and the rank discovery
    // own (KILN_*, RANK, WORLD_SIZE, MASTER_ADDR, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, ...).
    static void check_env(const std::map<std::string, std::string>& vars);
    // "RUNS and the data roots A, B" (or "... and no data root") for messages and logs.
    std::string describe() const;
};

// The kernel's fence, made in the head and entered by the job's process between fork and exec.
class WriteFence {
public:
    // Builds a Landlock rule set that lets writes happen only beneath `box`'s roots, /tmp,
    // /dev/shm and kiln's cache folder. Where the kernel has no Landlock, available() is false
    // and why() says so.
    explicit WriteFence(const Sandbox& box);
    ~WriteFence();
    WriteFence(const WriteFence&) = delete;
    WriteFence& operator=(const WriteFence&) = delete;

    bool available() const { return fd_ >= 0; }
    const std::string& why() const { return why_; }
    // In the forked child, before exec: only async-signal-safe calls. Returns false if the
    // kernel refused.
    bool enter() const;

private:
    int fd_ = -1;
    std::string why_;
};

}  // namespace kiln::serve
