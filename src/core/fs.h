#pragma once
// Files: whole-file reads, atomic writes (temp + fsync + rename), read-only memory maps.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <span>
#include <string>

namespace kiln::fs {

// The whole file; throws Error naming the path when it cannot be read, is a folder, or holds
// more than max_bytes (a device such as /dev/zero never ends: the bound ends it).
std::string read_file(const std::string& path, size_t max_bytes = size_t(1) << 30);

// Writes `data` to `path` so that a crash leaves either the old file or the new one, never a
// mix: writes path.tmp, fsyncs it, renames it over path, fsyncs the folder.
void write_file_atomic(const std::string& path, std::span<const char> data);
inline void write_file_atomic(const std::string& path, const std::string& text) {
    write_file_atomic(path, std::span<const char>(text.data(), text.size()));
}

// Refuses, in one sentence naming `path`, an output that would replace what is already there:
// anything but a regular file (a rename over a FIFO, a device node or a symbolic link replaces
// that node, not what it stands for), and a regular file unless `force` (the user's --force).
// Nothing there: returns.
void check_replaceable(const std::string& path, bool force);
// Refuses, naming `path`, a folder to write into that exists as anything but a folder (or a link
// to one).
void check_folder(const std::string& path);

// Like write_file_atomic without the fsyncs, for status files rewritten every few seconds:
// readers see the old file or the new one, never half of one; a crash may lose the newest.
void write_file_replace(const std::string& path, const std::string& text);

// Streams a file into place atomically: bytes go to path.tmp; commit() fsyncs, renames it over
// path and fsyncs the folder. Destroyed without commit(), it removes path.tmp.
//
// A file of kDirectBytes or more (by the caller's `expected_bytes`) bypasses the page cache
// (O_DIRECT through an aligned staging buffer) where the file system allows it. Written once and
// not read back soon, such a file gains nothing from the cache, and filling the cache cost
// 0.7-3.6 CPU-seconds per GB on the machine of bench/RESULTS.md (copies and writeback), taken from
// training by a checkpoint written in the background; the direct path cost about 0.5.
class AtomicWriter {
public:
    static constexpr size_t kDirectBytes = size_t(16) << 20;
    // Throws Error naming the path.
    explicit AtomicWriter(std::string path, size_t expected_bytes = 0);
    AtomicWriter(const AtomicWriter&) = delete;
    AtomicWriter& operator=(const AtomicWriter&) = delete;
    ~AtomicWriter();
    void write(const void* data, size_t bytes);  // throws Error naming the path
    // Makes the file durable and visible; returns the XXH64 (seed 0) of every byte written.
    uint64_t commit();

private:
    void write_fd(const char* p, size_t bytes);
    void leave_direct();  // back to buffered writes, for the tail or a file system that refuses
    std::string path_, tmp_;
    int fd_ = -1;
    void* hash_;  // XXH64_state_t, kept opaque here
    std::unique_ptr<char, void (*)(void*)> staging_{nullptr, std::free};  // direct path only
    size_t staged_ = 0;
};

void fsync_path(const std::string& path);  // a file or a folder

// XXH64 (seed 0): the checksum every kiln manifest records, of bytes or of a whole file.
uint64_t xxh64(const void* data, size_t bytes);
uint64_t xxh64_file(const std::string& path);  // throws Error naming the path
// An xxh64 as manifests write it: 16 lower-case hex digits; nullopt for anything else.
std::optional<uint64_t> parse_xxh64(const std::string& hex);
void make_dirs(const std::string& path);  // like mkdir -p; throws Error naming the path
bool exists(const std::string& path);
// kiln's per-user cache folder: $XDG_CACHE_HOME/kiln, else ~/.cache/kiln, else /tmp/kiln-cache.
std::string cache_dir();

// A read-only mapping of a whole file. Movable, not copyable.
class MappedFile {
public:
    explicit MappedFile(const std::string& path);  // throws Error naming the path
    MappedFile(MappedFile&& other) noexcept;
    MappedFile& operator=(MappedFile&& other) noexcept;
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    ~MappedFile();

    const uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    const std::string& path() const { return path_; }

private:
    std::string path_;
    const uint8_t* data_ = nullptr;
    size_t size_ = 0;
};

}  // namespace kiln::fs
