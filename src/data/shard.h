#pragma once
// Token shards: the on-disk form of a packed data set (format byte for byte in docs/formats.md).
//   DIR/manifest.json      seq_len, vocab size, token width, per-shard counts and xxh64 sums
//   DIR/shard-NNNNN.bin    64-byte header, then n_seqs rows of seq_len tokens (u16 or u32, LE)
// A folder without manifest.json is not a data set: the manifest is written last.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/fs.h"

namespace kiln::data {

constexpr char kShardMagic[8] = {'K', 'I', 'L', 'N', 'T', 'O', 'K', '\0'};
constexpr uint32_t kShardVersion = 1;
constexpr size_t kShardHeaderBytes = 64;

struct ShardHeader {
    uint32_t token_bytes = 2;  // 2 when vocab_size <= 65535, else 4
    uint32_t seq_len = 0;
    uint64_t n_seqs = 0;
};

// Parses and checks a shard header; throws Error naming `path` and the field at fault.
ShardHeader parse_shard_header(const uint8_t* data, size_t size, const std::string& path);

// Writes one shard atomically from whole rows; returns its xxh64 checksum (of the whole file).
uint64_t write_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t seq_len,
                     uint32_t token_bytes);

struct ShardEntry {
    std::string file;
    uint64_t sequences = 0;
    uint64_t xxh64 = 0;
};

struct Manifest {
    uint32_t seq_len = 0;
    int64_t vocab_size = 0;
    uint32_t token_bytes = 2;
    std::string tokenizer;  // identity of the tokenizer (e.g. "sha256:...")
    std::vector<ShardEntry> shards;
    std::vector<std::string> sources;
    bool add_eos = true;        // packing recipe: BOS + tokens (+ EOS) per document
    std::string tail = "drop";  // packing recipe: the short last row dropped or padded
    uint64_t dropped_tokens = 0;
    uint64_t sequences() const;
};

Manifest read_manifest(const std::string& dir);  // throws Error naming the file and key
void write_manifest(const std::string& dir, const Manifest& m);

// Where training rows come from: a shard folder or the synthetic stream.
class TokenSource {
public:
    virtual ~TokenSource() = default;
    virtual int64_t rows() const = 0;
    virtual int64_t seq_len() const = 0;
    virtual void read_row(int64_t index, int32_t* out) const = 0;  // out (seq_len)
};

// A shard folder, memory-mapped. Opening checks the manifest against every shard's header and
// size and the token ids against `vocab_size`; verify() also checks the checksums.
class ShardSet : public TokenSource {
public:
    ShardSet(const std::string& dir, int64_t vocab_size);
    int64_t rows() const override { return rows_; }
    int64_t seq_len() const override { return manifest_.seq_len; }
    void read_row(int64_t index, int32_t* out) const override;
    const Manifest& manifest() const { return manifest_; }
    void verify() const;  // throws Error naming the first bad shard

private:
    std::string dir_;
    Manifest manifest_;
    std::vector<fs::MappedFile> files_;
    std::vector<int64_t> first_row_;  // [shard] global index of its first row
    int64_t rows_ = 0;
};

// A deterministic, learnable stream for when no data exists yet: each row counts upward from a
// random start with a random stride (1..7) modulo min(vocab, 1024), so the next token follows
// from the previous two.
class SyntheticSource : public TokenSource {
public:
    SyntheticSource(int64_t seq_len, int64_t vocab_size, uint64_t seed, int64_t rows = 1 << 20);
    int64_t rows() const override { return rows_; }
    int64_t seq_len() const override { return seq_len_; }
    void read_row(int64_t index, int32_t* out) const override;

private:
    int64_t seq_len_, vocab_size_, rows_;
    uint64_t seed_;
};

// Opens `data.source`: "synthetic" or a shard folder. Throws Error naming the path.
std::unique_ptr<TokenSource> open_source(const std::string& source, int64_t seq_len,
                                         int64_t vocab_size, uint64_t seed);

}  // namespace kiln::data
