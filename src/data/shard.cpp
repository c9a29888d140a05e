#include "data/shard.h"

#include <xxhash.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "core/error.h"

namespace kiln::data {

ShardHeader parse_shard_header(const uint8_t* data, size_t size, const std::string& path) {
    if (size < kShardHeaderBytes) {
        throw error("{} is not a kiln shard: {} bytes, shorter than the 64-byte header", path,
                    size);
    }
    if (std::memcmp(data, kShardMagic, 8) != 0) {
        throw error("{} is not a kiln shard: wrong magic bytes", path);
    }
    uint32_t version, reserved;
    ShardHeader h;
    std::memcpy(&version, data + 8, 4);
    std::memcpy(&h.token_bytes, data + 12, 4);
    std::memcpy(&h.seq_len, data + 16, 4);
    std::memcpy(&reserved, data + 20, 4);
    std::memcpy(&h.n_seqs, data + 24, 8);
    if (version != kShardVersion) {
        throw error("{}: shard format version {} is not supported (this kiln reads {})", path,
                    version, kShardVersion);
    }
    if (h.token_bytes != 2 && h.token_bytes != 4) {
        throw error("{}: token width {} bytes is not 2 or 4", path, h.token_bytes);
    }
    if (h.seq_len == 0)
        throw error("{}: seq_len is 0", path);
    // Checked arithmetic: a forged row count must not wrap the size it promises into the
    // file's real size (and reads past its end).
    const uint64_t row_bytes = uint64_t(h.seq_len) * h.token_bytes;
    uint64_t expect = 0;
    if (__builtin_mul_overflow(h.n_seqs, row_bytes, &expect) ||
        __builtin_add_overflow(expect, kShardHeaderBytes, &expect)) {
        throw error("{}: its header promises {} rows of {} tokens, more than any file holds", path,
                    h.n_seqs, h.seq_len);
    }
    if (size != expect) {
        throw error("{}: file is {} bytes but its header promises {} ({} rows of {} tokens)", path,
                    size, expect, h.n_seqs, h.seq_len);
    }
    return h;
}

uint64_t write_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t seq_len,
                     uint32_t token_bytes) {
    KILN_CHECK(tokens.size() % seq_len == 0, "shard rows must be whole");
    std::vector<uint8_t> bytes(kShardHeaderBytes + tokens.size() * token_bytes, 0);
    uint64_t n = tokens.size() / seq_len;
    std::memcpy(bytes.data(), kShardMagic, 8);
    std::memcpy(bytes.data() + 8, &kShardVersion, 4);
    std::memcpy(bytes.data() + 12, &token_bytes, 4);
    std::memcpy(bytes.data() + 16, &seq_len, 4);
    std::memcpy(bytes.data() + 24, &n, 8);
    uint8_t* out = bytes.data() + kShardHeaderBytes;
    for (size_t i = 0; i < tokens.size(); i++) {
        if (token_bytes == 2) {
            KILN_CHECK(tokens[i] <= 0xffff, "token {} does not fit 16 bits", tokens[i]);
            uint16_t t = static_cast<uint16_t>(tokens[i]);
            std::memcpy(out + 2 * i, &t, 2);
        } else {
            std::memcpy(out + 4 * i, &tokens[i], 4);
        }
    }
    fs::write_file_atomic(
        path, std::span<const char>(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    return fs::xxh64(bytes.data(), bytes.size());
}

uint64_t Manifest::sequences() const {
    uint64_t n = 0;
    for (const auto& s : shards)
        n += s.sequences;
    return n;
}

namespace {

// A number of the manifest as a whole number in [0, most]. Asked for an integer, the JSON
// library converts a float or an out-of-range value with undefined behaviour (1e20 as seq_len).
uint64_t whole_number(const nlohmann::json& v, const std::string& what, uint64_t most,
                      const std::string& path) {
    const bool ok = v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0);
    if (!ok || v.get<uint64_t>() > most)
        throw error("{}: {} {} is not a whole number from 0 to {}", path, what,
                    v.is_primitive() ? v.dump().substr(0, 40) : std::string(v.type_name()), most);
    return v.get<uint64_t>();
}

}  // namespace

Manifest read_manifest(const std::string& dir) {
    std::string path = dir + "/manifest.json";
    if (!fs::exists(path)) {
        throw error("{} is not a kiln data set: it has no manifest.json (make one with kiln data)",
                    dir);
    }
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(fs::read_file(path));
    } catch (const nlohmann::json::exception& e) {
        throw error("{} is not valid JSON: {}", path, e.what());
    }
    Manifest m;
    try {
        if (j.at("format").get<std::string>() != "kiln-shards") {
            throw error("{}: format is not kiln-shards", path);
        }
        if (whole_number(j.at("version"), "version", UINT32_MAX, path) != 1) {
            throw error("{}: version {} is not supported", path, j.at("version").dump());
        }
        m.seq_len = uint32_t(whole_number(j.at("seq_len"), "seq_len", UINT32_MAX, path));
        if (!j.at("vocab_size").is_number_integer())
            throw error("{}: vocab_size {} is not a whole number", path,
                        j.at("vocab_size").dump().substr(0, 40));
        m.vocab_size = j.at("vocab_size").get<int64_t>();
        if (m.vocab_size < 1 || m.vocab_size > (int64_t(1) << 31) - 1)
            throw error("{}: vocab_size {} is not between 1 and 2^31-1", path, m.vocab_size);
        m.token_bytes =
            uint32_t(whole_number(j.at("token_bytes"), "token_bytes", UINT32_MAX, path));
        m.tokenizer = j.value("tokenizer", "");
        if (j.contains("dropped_tokens"))
            m.dropped_tokens =
                whole_number(j.at("dropped_tokens"), "dropped_tokens", UINT64_MAX, path);
        m.sources = j.value("sources", std::vector<std::string>{});
        m.add_eos = j.value("add_eos", true);
        m.tail = j.value("tail", std::string("drop"));
        std::unordered_set<std::string> names;
        for (const auto& s : j.at("shards")) {
            ShardEntry e;
            e.file = s.at("file").get<std::string>();
            e.sequences = whole_number(s.at("sequences"), "sequences", UINT64_MAX, path);
            const std::string hex = s.at("xxh64").get<std::string>();
            const std::optional<uint64_t> sum = fs::parse_xxh64(hex);
            if (!sum)
                throw error("{}: xxh64 \"{}\" of {} is not 16 hexadecimal digits", path,
                            hex.substr(0, 40), e.file.substr(0, 100));
            e.xxh64 = *sum;
            if (e.file.find('/') != std::string::npos || e.file.empty() || e.file[0] == '.' ||
                e.file.find('\0') != std::string::npos || e.file.size() > 255) {
                throw error("{}: shard file name {} must be a plain name in the folder", path,
                            nlohmann::json(e.file.substr(0, 300)).dump());
            }
            // A name listed twice would be read twice an epoch, and the shard it stands in
            // for never: such a manifest was not written by kiln data.
            if (!names.insert(e.file).second)
                throw error("{} lists shard {} twice", path, e.file);
            m.shards.push_back(e);
        }
    } catch (const nlohmann::json::exception& e) {
        throw error("{}: missing or malformed key: {}", path, e.what());
    }
    if (m.token_bytes == 2 && m.vocab_size > 65536)
        throw error("{}: vocab_size {} does not fit 2-byte tokens", path, m.vocab_size);
    if (m.seq_len == 0)
        throw error("{}: seq_len is 0", path);
    if (m.shards.empty())
        throw error("{}: lists no shards", path);
    return m;
}

void write_manifest(const std::string& dir, const Manifest& m) {
    nlohmann::ordered_json j;
    j["format"] = "kiln-shards";
    j["version"] = 1;
    j["seq_len"] = m.seq_len;
    j["vocab_size"] = m.vocab_size;
    j["token_bytes"] = m.token_bytes;
    j["tokenizer"] = m.tokenizer;
    j["sequences"] = m.sequences();
    j["tokens"] = m.sequences() * m.seq_len;
    j["dropped_tokens"] = m.dropped_tokens;
    j["sources"] = m.sources;
    j["add_eos"] = m.add_eos;
    j["tail"] = m.tail;
    j["shards"] = nlohmann::json::array();
    for (const auto& s : m.shards) {
        j["shards"].push_back({{"file", s.file},
                               {"sequences", s.sequences},
                               {"tokens", s.sequences * m.seq_len},
                               {"xxh64", fmt::format("{:016x}", s.xxh64)}});
    }
    fs::write_file_atomic(dir + "/manifest.json", j.dump(2) + "\n");
}

ShardSet::ShardSet(const std::string& dir, int64_t vocab_size) : dir_(dir) {
    manifest_ = read_manifest(dir);
    if (manifest_.vocab_size != vocab_size) {
        throw error("{}/manifest.json: data set has vocab_size {} but model.vocab_size is {}", dir,
                    manifest_.vocab_size, vocab_size);
    }
    for (const auto& s : manifest_.shards) {
        std::string path = dir + "/" + s.file;
        fs::MappedFile f(path);
        ShardHeader h = parse_shard_header(f.data(), f.size(), path);
        if (h.seq_len != manifest_.seq_len || h.token_bytes != manifest_.token_bytes ||
            h.n_seqs != s.sequences) {
            throw error("{}: header ({} rows of {} x {}-byte tokens) disagrees with manifest.json",
                        path, h.n_seqs, h.seq_len, h.token_bytes);
        }
        first_row_.push_back(rows_);
        rows_ += static_cast<int64_t>(s.sequences);
        files_.push_back(std::move(f));
    }
    if (rows_ == 0)
        throw error("{}: the data set has no sequences", dir);
}

void ShardSet::read_row(int64_t index, int32_t* out) const {
    KILN_CHECK(index >= 0 && index < rows_, "row {} of {}", index, rows_);
    size_t s =
        std::upper_bound(first_row_.begin(), first_row_.end(), index) - first_row_.begin() - 1;
    const uint8_t* base = files_[s].data() + kShardHeaderBytes +
                          (index - first_row_[s]) * manifest_.seq_len * manifest_.token_bytes;
    for (uint32_t t = 0; t < manifest_.seq_len; t++) {
        uint32_t v = 0;
        std::memcpy(&v, base + t * manifest_.token_bytes, manifest_.token_bytes);
        if (v >= uint64_t(manifest_.vocab_size)) {
            throw error("{}/{}: token id {} at row {} is outside the vocabulary of {}", dir_,
                        manifest_.shards[s].file, v, index - first_row_[s], manifest_.vocab_size);
        }
        out[t] = static_cast<int32_t>(v);
    }
}

void ShardSet::verify() const {
    for (size_t s = 0; s < files_.size(); s++) {
        uint64_t sum = fs::xxh64(files_[s].data(), files_[s].size());
        if (sum != manifest_.shards[s].xxh64) {
            throw error("{}: checksum {:016x} does not match manifest.json ({:016x})",
                        files_[s].path(), sum, manifest_.shards[s].xxh64);
        }
    }
}

SyntheticSource::SyntheticSource(int64_t seq_len, int64_t vocab_size, uint64_t seed, int64_t rows)
    : seq_len_(seq_len), vocab_size_(vocab_size), rows_(rows), seed_(seed) {}

void SyntheticSource::read_row(int64_t index, int32_t* out) const {
    uint64_t h = XXH64(&index, sizeof index, seed_);
    int64_t range = std::min<int64_t>(vocab_size_, 1024);
    int64_t value = static_cast<int64_t>(h % range);
    int64_t stride = 1 + static_cast<int64_t>((h >> 32) % 7);
    for (int64_t t = 0; t < seq_len_; t++) {
        out[t] = static_cast<int32_t>(value);
        value = (value + stride) % range;
    }
}

std::unique_ptr<TokenSource> open_source(const std::string& source, int64_t seq_len,
                                         int64_t vocab_size, uint64_t seed) {
    if (source == "synthetic") {
        return std::make_unique<SyntheticSource>(seq_len, vocab_size, seed);
    }
    if (!std::filesystem::is_directory(source)) {
        throw error(
            "data.source={}: no such folder (give a folder made by kiln data, or "
            "synthetic)",
            source);
    }
    auto set = std::make_unique<ShardSet>(source, vocab_size);
    if (set->seq_len() != seq_len) {
        throw error("{}/manifest.json: data set has seq_len {} but train.seq_len is {}", source,
                    set->seq_len(), seq_len);
    }
    return set;
}

}  // namespace kiln::data
