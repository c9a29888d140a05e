#include "serve/sandbox.h"

#include <fcntl.h>
#include <linux/landlock.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/error.h"
#include "core/fs.h"

namespace kiln::serve {

namespace stdfs = std::filesystem;

namespace {

// Options of kiln commands whose values are files or folders; --corpus takes several.
const std::set<std::string> kPathOptions = {"--out",  "--corpus", "--checkpoint", "--tokenizer",
                                            "--data", "--config", "--inspect",    "--cluster"};
// Config keys (--set KEY=VALUE) whose values are files or folders.
const std::set<std::string> kPathKeys = {"data.source", "data.tokenizer", "train.plan_cache",
                                         "run.dir"};

// Values of those that name no file: built-in corpora, synthetic data, cluster presets.
bool names_no_file(const std::string& option, const std::string& value) {
    if (value.empty() || value.rfind("builtin:", 0) == 0 || value == "synthetic")
        return true;
    return option == "--cluster" && value.find('/') == std::string::npos && !stdfs::exists(value);
}

bool beneath(const stdfs::path& p, const stdfs::path& root) {
    auto [r, q] = std::mismatch(root.begin(), root.end(), p.begin(), p.end());
    return r == root.end();
}

// Variables a job may not set, whole names and prefixes. Each loads code into the job or
// changes which binaries run (outside the sandbox's reach), or belongs to the head and the
// rank discovery, which would then start ranks that do not find each other.
const std::set<std::string> kHeadVariables = {"PATH",
                                              "HOME",
                                              "SHELL",
                                              "IFS",
                                              "BASH_ENV",
                                              "ENV",
                                              "XDG_CACHE_HOME",
                                              "TMPDIR",
                                              "PYTHONPATH",
                                              "PYTHONSTARTUP",
                                              "MASTER_ADDR",
                                              "MASTER_PORT",
                                              "RANK",
                                              "LOCAL_RANK",
                                              "WORLD_SIZE",
                                              "LOCAL_WORLD_SIZE",
                                              "GROUP_RANK",
                                              "OMP_NUM_THREADS",
                                              "CUDA_VISIBLE_DEVICES",
                                              "GLOO_SOCKET_IFNAME"};
const char* const kHeadPrefixes[] = {"LD_",   "KILN_", "SLURM_", "OMPI_",   "PMI_",
                                     "PMIX_", "VC_",   "GCONV_", "MALLOC_", "GLIBC_"};
constexpr size_t kMaxEnvVars = 128, kMaxEnvName = 128, kMaxEnvValue = 16 << 10,
                 kMaxEnvBytes = 64 << 10;

}  // namespace

Sandbox Sandbox::of(const std::string& runs, const std::vector<std::string>& data_roots) {
    Sandbox box;
    box.cwd = stdfs::current_path().string();
    std::error_code ec;
    box.roots.push_back(stdfs::weakly_canonical(stdfs::absolute(runs), ec).string());
    for (const std::string& d : data_roots) {
        if (!stdfs::is_directory(d, ec))
            throw error("data root {} (--data-root) is not a folder", d);
        box.roots.push_back(stdfs::canonical(d, ec).string());
    }
    return box;
}

std::string Sandbox::describe() const {
    std::string s = "the runs folder " + roots.front();
    if (roots.size() == 1)
        return s + " (no --data-root)";
    s += " and the data root" + std::string(roots.size() > 2 ? "s " : " ");
    for (size_t i = 1; i < roots.size(); i++)
        s += (i > 1 ? ", " : "") + roots[i];
    return s;
}

std::string Sandbox::folder(const std::string& what, const std::string& path) const {
    if (path.empty() || path.size() > 4096 || path.find('\0') != std::string::npos)
        throw error("{} must be a folder path of 1-4096 bytes", what);
    stdfs::path p = stdfs::path(path).is_absolute() ? stdfs::path(path) : stdfs::path(cwd) / path;
    std::error_code ec;
    stdfs::path real = stdfs::canonical(p, ec);
    if (ec || !stdfs::is_directory(real, ec))
        throw error("{} \"{}\" is not a folder on the head node", what, path);
    for (const std::string& root : roots)
        if (beneath(real, root))
            return real.string();
    throw error(
        "{} \"{}\" resolves to {}, outside {}: a job works only there (kiln serve --data-root "
        "DIR adds a folder)",
        what, path, real.string(), describe());
}

void Sandbox::check_env(const std::map<std::string, std::string>& vars) {
    if (vars.size() > kMaxEnvVars)
        throw error("runtime_env.env_vars has {} variables; a job may set at most {}", vars.size(),
                    kMaxEnvVars);
    size_t bytes = 0;
    for (const auto& [name, value] : vars) {
        bool ok = !name.empty() && name.size() <= kMaxEnvName &&
                  !std::isdigit(static_cast<unsigned char>(name[0]));
        for (char c : name)
            ok = ok && (std::isalnum(static_cast<unsigned char>(c)) || c == '_');
        if (!ok)
            throw error(
                "runtime_env.env_vars name \"{}\" is not a variable name (1-{} letters, digits "
                "or _, not starting with a digit)",
                name.substr(0, kMaxEnvName), kMaxEnvName);
        if (value.size() > kMaxEnvValue || value.find('\0') != std::string::npos)
            throw error("runtime_env.env_vars {} is over {} bytes or holds a NUL byte", name,
                        kMaxEnvValue);
        bytes += name.size() + value.size();
        if (bytes > kMaxEnvBytes)
            throw error("runtime_env.env_vars holds over {} bytes", kMaxEnvBytes);
        bool owned = kHeadVariables.count(name) > 0;
        for (const char* prefix : kHeadPrefixes)
            owned = owned || name.rfind(prefix, 0) == 0;
        if (owned)
            throw error(
                "runtime_env.env_vars may not set {}: it would load code into the job, change "
                "which programs it runs, or override what the head and the rank discovery set "
                "(PATH, HOME, LD_*, KILN_*, MASTER_ADDR, RANK, WORLD_SIZE, OMP_NUM_THREADS, "
                "CUDA_VISIBLE_DEVICES, Slurm and MPI variables)",
                name);
    }
}

void Sandbox::check(const std::vector<std::string>& entrypoint) const {
    auto inside = [&](const std::string& what, const std::string& option,
                      const std::string& value) {
        if (names_no_file(option, value))
            return;
        // A glob's folder: the part before its first wildcard.
        std::string literal = value.substr(0, value.find_first_of("*?["));
        stdfs::path p =
            stdfs::path(literal).is_absolute() ? stdfs::path(literal) : stdfs::path(cwd) / literal;
        if (literal.size() < value.size())
            p = p.parent_path();
        std::error_code ec;
        stdfs::path real = stdfs::weakly_canonical(p, ec);  // follows links where they exist
        if (ec)
            real = p.lexically_normal();
        for (const std::string& root : roots)
            if (beneath(real, root))
                return;
        throw error(
            "{} \"{}\" resolves to {}, outside {}: a job reads and writes only there (kiln serve "
            "--data-root DIR adds a folder)",
            what, value, real.string(), describe());
    };
    // "--out=X" reads as "--out X".
    std::vector<std::string> words;
    for (size_t i = 1; i < entrypoint.size(); i++) {
        const std::string& w = entrypoint[i];
        size_t eq = w.find('=');
        if (w.rfind("--", 0) == 0 && eq != std::string::npos) {
            words.push_back(w.substr(0, eq));
            words.push_back(w.substr(eq + 1));
        } else {
            words.push_back(w);
        }
    }
    const bool verify =
        entrypoint.size() > 1 && entrypoint[0] == "data" && entrypoint[1] == "verify";
    std::string option;  // the path option (or --set) whose values follow, if any
    for (const std::string& w : words) {
        if (w.size() > 1 && w[0] == '-' && !std::isdigit(static_cast<unsigned char>(w[1]))) {
            option = kPathOptions.count(w) || w == "--set" ? w : "";
            continue;
        }
        if (option == "--set") {  // takes several KEY=VALUE words
            size_t k = w.find('=');
            if (k != std::string::npos && kPathKeys.count(w.substr(0, k)))
                inside("--set " + w.substr(0, k), "", w.substr(k + 1));
        } else if (!option.empty()) {
            inside(option, option, w);
            if (option != "--corpus")  // the only path option that takes several values
                option.clear();
        } else if (verify && w != "verify") {
            inside("the folder of data verify", "", w);
        }
    }
}

// ---- Landlock ----

namespace {

#ifndef LANDLOCK_ACCESS_FS_REFER
#define LANDLOCK_ACCESS_FS_REFER (1ULL << 13)
#endif
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif

// Every right that changes the file system, as far as the kernel's Landlock version knows them.
uint64_t write_rights(int abi) {
    uint64_t r = LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_REMOVE_DIR |
                 LANDLOCK_ACCESS_FS_REMOVE_FILE | LANDLOCK_ACCESS_FS_MAKE_CHAR |
                 LANDLOCK_ACCESS_FS_MAKE_DIR | LANDLOCK_ACCESS_FS_MAKE_REG |
                 LANDLOCK_ACCESS_FS_MAKE_SOCK | LANDLOCK_ACCESS_FS_MAKE_FIFO |
                 LANDLOCK_ACCESS_FS_MAKE_BLOCK | LANDLOCK_ACCESS_FS_MAKE_SYM;
    if (abi >= 2)
        r |= LANDLOCK_ACCESS_FS_REFER;
    if (abi >= 3)
        r |= LANDLOCK_ACCESS_FS_TRUNCATE;
    return r;
}

}  // namespace

WriteFence::WriteFence(const Sandbox& box) {
    const long abi =
        ::syscall(SYS_landlock_create_ruleset, nullptr, 0, LANDLOCK_CREATE_RULESET_VERSION);
    if (abi < 0) {
        why_ = errno == EOPNOTSUPP
                   ? "the kernel has Landlock but it is not enabled (the lsm= boot parameter)"
                   : "the kernel has no Landlock";
        return;
    }
    const uint64_t rights = write_rights(int(abi));
    landlock_ruleset_attr attr{};
    attr.handled_access_fs = rights;
    int fd = int(::syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0));
    if (fd < 0) {
        why_ = std::string("the kernel refused a Landlock rule set: ") + std::strerror(errno);
        return;
    }
    std::vector<std::string> writable = box.roots;
    writable.push_back(fs::cache_dir());
    fs::make_dirs(writable.back());
    writable.insert(writable.end(), {"/tmp", "/dev/shm", "/var/tmp"});
    auto allow = [&](const std::string& path, uint64_t access) {
        int dir = ::open(path.c_str(), O_PATH | O_CLOEXEC);
        if (dir < 0)
            return true;  // absent here: nothing to allow
        landlock_path_beneath_attr rule{};
        rule.allowed_access = access;
        rule.parent_fd = dir;
        bool ok = ::syscall(SYS_landlock_add_rule, fd, LANDLOCK_RULE_PATH_BENEATH, &rule, 0) == 0;
        ::close(dir);
        return ok;
    };
    for (const std::string& w : writable) {
        if (!allow(w, rights)) {
            why_ = "the kernel refused a Landlock rule for " + w + ": " + std::strerror(errno);
            ::close(fd);
            return;
        }
    }
    // Devices jobs open to write (a file rule takes file rights only).
    const uint64_t file_rights =
        LANDLOCK_ACCESS_FS_WRITE_FILE | (abi >= 3 ? LANDLOCK_ACCESS_FS_TRUNCATE : 0);
    for (const char* dev : {"/dev/null", "/dev/zero", "/dev/full", "/dev/tty"})
        allow(dev, file_rights);
    fd_ = fd;
}

WriteFence::~WriteFence() {
    if (fd_ >= 0)
        ::close(fd_);
}

bool WriteFence::enter() const {
    if (fd_ < 0)
        return true;
    return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
           ::syscall(SYS_landlock_restrict_self, fd_, 0) == 0;
}

}  // namespace kiln::serve
