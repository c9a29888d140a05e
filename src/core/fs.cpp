#include "core/fs.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "core/error.h"

namespace kiln::fs {

std::string read_file(const std::string& path, size_t max_bytes) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
        throw error("cannot read {}: it is a folder, not a file", path);
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        throw error("cannot read {}: {}", path, std::strerror(errno));
    }
    std::string out;
    std::vector<char> buf(1 << 16);
    while (in.read(buf.data(), std::streamsize(buf.size())) || in.gcount() > 0) {
        out.append(buf.data(), size_t(in.gcount()));
        if (out.size() > max_bytes)
            throw error("{} is larger than the {} bytes such a file may hold", path, max_bytes);
    }
    return out;
}

namespace {
// What a path that is not a regular file is, for the sentence that refuses it.
const char* kind_of(mode_t mode) {
    if (S_ISREG(mode))
        return "a file";
    if (S_ISDIR(mode))
        return "a folder";
    if (S_ISLNK(mode))
        return "a symbolic link";
    if (S_ISFIFO(mode))
        return "a FIFO";
    if (S_ISCHR(mode) || S_ISBLK(mode))
        return "a device";
    if (S_ISSOCK(mode))
        return "a socket";
    return "a special file";
}
}  // namespace

void check_replaceable(const std::string& path, bool force) {
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) {
        if (errno == ENOENT)
            return;
        throw error("cannot write {}: {}", path, std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        throw error("{} is {}, not a regular file; kiln replaces only regular files", path,
                    kind_of(st.st_mode));
    }
    if (!force)
        throw error("{} exists; pass --force to replace it", path);
}

void check_folder(const std::string& path) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
        if (errno == ENOENT)
            return;
        throw error("cannot write into {}: {}", path, std::strerror(errno));
    }
    if (!S_ISDIR(st.st_mode))
        throw error("{} is {}, not a folder to write into", path, kind_of(st.st_mode));
}

void fsync_path(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) {
        throw error("cannot open {} to sync it: {}", path, std::strerror(errno));
    }
    ::fsync(fd);
    ::close(fd);
}

namespace {
constexpr size_t kBlock = 4096;               // O_DIRECT alignment of memory, offset and length
constexpr size_t kStaging = size_t(8) << 20;  // bytes per direct write
}  // namespace

AtomicWriter::AtomicWriter(std::string path, size_t expected_bytes)
    : path_(std::move(path)), tmp_(path_ + ".tmp"), hash_(XXH64_createState()) {
    XXH64_reset(static_cast<XXH64_state_t*>(hash_), 0);
    const int flags = O_WRONLY | O_CREAT | O_TRUNC;
    if (expected_bytes >= kDirectBytes) {
        fd_ = ::open(tmp_.c_str(), flags | O_DIRECT, 0644);  // EINVAL: no direct I/O here
        if (fd_ >= 0) {
            staging_.reset(static_cast<char*>(std::aligned_alloc(kBlock, kStaging)));
            if (!staging_)
                leave_direct();
        }
    }
    if (fd_ < 0)
        fd_ = ::open(tmp_.c_str(), flags, 0644);
    if (fd_ < 0) {
        throw error("cannot write {}: {}", tmp_, std::strerror(errno));
    }
}

AtomicWriter::~AtomicWriter() {
    XXH64_freeState(static_cast<XXH64_state_t*>(hash_));
    if (fd_ >= 0) {
        ::close(fd_);
        ::unlink(tmp_.c_str());
    }
}

void AtomicWriter::leave_direct() {
    int flags = ::fcntl(fd_, F_GETFL);
    if (flags < 0 || ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT) != 0) {
        throw error("cannot write {}: {}", tmp_, std::strerror(errno));
    }
}

void AtomicWriter::write_fd(const char* p, size_t bytes) {
    while (bytes > 0) {
        ssize_t n = ::write(fd_, p, bytes);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EINVAL && staging_) {  // opened for direct I/O, yet refused it
                leave_direct();
                continue;
            }
            throw error("cannot write {}: {}", tmp_, std::strerror(errno));
        }
        p += n;
        bytes -= static_cast<size_t>(n);
    }
}

void AtomicWriter::write(const void* data, size_t bytes) {
    XXH64_update(static_cast<XXH64_state_t*>(hash_), data, bytes);
    const char* p = static_cast<const char*>(data);
    if (!staging_)
        return write_fd(p, bytes);
    while (bytes > 0) {
        size_t n = std::min(bytes, kStaging - staged_);
        std::memcpy(staging_.get() + staged_, p, n);
        staged_ += n, p += n, bytes -= n;
        if (staged_ == kStaging) {
            write_fd(staging_.get(), kStaging);
            staged_ = 0;
        }
    }
}

uint64_t AtomicWriter::commit() {
    if (staging_ && staged_ > 0) {
        size_t whole = staged_ / kBlock * kBlock;  // direct writes are whole blocks
        write_fd(staging_.get(), whole);
        leave_direct();
        write_fd(staging_.get() + whole, staged_ - whole);
        staged_ = 0;
    }
    if (::fsync(fd_) != 0) {
        throw error("cannot sync {}: {}", tmp_, std::strerror(errno));
    }
    ::close(fd_);
    fd_ = -1;
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
        int e = errno;
        ::unlink(tmp_.c_str());
        throw error("cannot rename {} to {}: {}", tmp_, path_, std::strerror(e));
    }
    std::string dir = std::filesystem::path(path_).parent_path().string();
    fsync_path(dir.empty() ? "." : dir);
    return XXH64_digest(static_cast<XXH64_state_t*>(hash_));
}

void write_file_replace(const std::string& path, const std::string& text) {
    std::string tmp = path + ".tmp";
    std::FILE* f = std::fopen(tmp.c_str(), "wb");
    if (f == nullptr)
        throw error("cannot write {}: {}", tmp, std::strerror(errno));
    bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    ok = std::fclose(f) == 0 && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
        int e = errno;
        std::remove(tmp.c_str());
        throw error("cannot write {}: {}", path, std::strerror(e));
    }
}

void write_file_atomic(const std::string& path, std::span<const char> data) {
    AtomicWriter w(path, data.size());
    w.write(data.data(), data.size());
    w.commit();
}

uint64_t xxh64(const void* data, size_t bytes) {
    return XXH64(data, bytes, 0);
}

std::optional<uint64_t> parse_xxh64(const std::string& hex) {
    if (hex.size() != 16 || hex.find_first_not_of("0123456789abcdef") != std::string::npos)
        return std::nullopt;
    return std::stoull(hex, nullptr, 16);
}

uint64_t xxh64_file(const std::string& path) {
    MappedFile f(path);
    return xxh64(f.data(), f.size());
}

void make_dirs(const std::string& path) {
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) {
        throw error("cannot create folder {}: {}", path, ec.message());
    }
}

bool exists(const std::string& path) {
    return std::filesystem::exists(path);
}

MappedFile::MappedFile(const std::string& path) : path_(path) {
    // Non-blocking, so that a FIFO in a file's place is refused instead of waited on.
    int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        throw error("cannot open {}: {}", path, std::strerror(errno));
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        int e = errno;
        ::close(fd);
        throw error("cannot stat {}: {}", path, std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw error("{} is not a regular file", path);
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
        void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            ::close(fd);
            throw error("cannot map {}: {}", path, std::strerror(e));
        }
        data_ = static_cast<const uint8_t*>(p);
    }
    ::close(fd);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
    if (this != &other) {
        if (data_)
            ::munmap(const_cast<uint8_t*>(data_), size_);
        path_ = std::move(other.path_);
        data_ = std::exchange(other.data_, nullptr);
        size_ = std::exchange(other.size_, 0);
    }
    return *this;
}

MappedFile::~MappedFile() {
    if (data_) {
        ::munmap(const_cast<uint8_t*>(data_), size_);
    }
}

std::string cache_dir() {
    if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0')
        return std::string(xdg) + "/kiln";
    if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0')
        return std::string(home) + "/.cache/kiln";
    return "/tmp/kiln-cache";
}

}  // namespace kiln::fs
