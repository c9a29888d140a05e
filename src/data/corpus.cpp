#include "data/corpus.h"

#include <glob.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"

namespace kiln::data {
namespace {

namespace stdfs = std::filesystem;

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A byte stream over a plain, gzip or zstd file.
class ByteStream {
public:
    virtual ~ByteStream() = default;
    virtual size_t read(char* buf, size_t n) = 0;  // 0 at the end; throws Error on damage
    virtual int64_t consumed() const = 0;          // input bytes consumed so far
};

class PlainStream : public ByteStream {
public:
    explicit PlainStream(const std::string& path)
        : path_(path), f_(std::fopen(path.c_str(), "rb")) {
        if (!f_)
            throw error("cannot open {}: {}", path, std::strerror(errno));
    }
    ~PlainStream() override { std::fclose(f_); }
    size_t read(char* buf, size_t n) override {
        size_t got = std::fread(buf, 1, n, f_);
        if (got == 0 && std::ferror(f_))
            throw error("cannot read {}", path_);
        consumed_ += int64_t(got);
        return got;
    }
    int64_t consumed() const override { return consumed_; }

private:
    std::string path_;
    std::FILE* f_;
    int64_t consumed_ = 0;
};

// zlib is lenient where a corpus reader must not be: it reads a file without the gzip magic
// as plain bytes ("transparent" mode), and a stream that stops short (no end of the deflate
// data, or no trailer) as a normal end, saying so only through gzerror's Z_BUF_ERROR. Both
// are refused here, so that a damaged download is never tokenized as if it were whole.
class GzipStream : public ByteStream {
public:
    explicit GzipStream(const std::string& path) : path_(path) {
        unsigned char magic[2] = {0, 0};
        {
            PlainStream file(path);
            if (file.read(reinterpret_cast<char*>(magic), 2) != 2 || magic[0] != 0x1f ||
                magic[1] != 0x8b)
                throw error("{} is not valid gzip: it does not start with the gzip magic 1f 8b",
                            path);
        }
        f_ = gzopen(path.c_str(), "rb");
        if (!f_)
            throw error("cannot open {}", path);
        gzbuffer(f_, 1 << 17);
    }
    ~GzipStream() override { gzclose(f_); }
    size_t read(char* buf, size_t n) override {
        int got = gzread(f_, buf, static_cast<unsigned>(std::min<size_t>(n, 1 << 30)));
        int code = Z_OK;
        const char* why = gzerror(f_, &code);
        if (got < 0)
            throw error("{} is not valid gzip: {}", path_, why);
        if (code == Z_BUF_ERROR)  // "unexpected end of file": the stream stopped short
            throw error("{} is truncated gzip data", path_);
        return size_t(got);
    }
    int64_t consumed() const override { return gzoffset(f_); }

private:
    std::string path_;
    gzFile f_ = nullptr;
};

class ZstdStream : public ByteStream {
public:
    explicit ZstdStream(const std::string& path)
        : file_(path), path_(path), dctx_(ZSTD_createDCtx()) {
        in_buf_.resize(ZSTD_DStreamInSize());
    }
    ~ZstdStream() override { ZSTD_freeDCtx(dctx_); }
    size_t read(char* buf, size_t n) override {
        ZSTD_outBuffer out{buf, n, 0};
        while (out.pos == 0) {
            if (in_.pos == in_.size) {
                size_t got = file_.read(in_buf_.data(), in_buf_.size());
                if (got == 0) {
                    if (last_ret_ != 0)
                        throw error("{} is truncated zstd data", path());
                    return 0;
                }
                in_ = {in_buf_.data(), got, 0};
            }
            last_ret_ = ZSTD_decompressStream(dctx_, &out, &in_);
            if (ZSTD_isError(last_ret_)) {
                throw error("{} is not valid zstd: {}", path(), ZSTD_getErrorName(last_ret_));
            }
        }
        return out.pos;
    }
    int64_t consumed() const override { return file_.consumed(); }
    std::string path() const { return path_; }

private:
    PlainStream file_;
    std::string path_;
    ZSTD_DCtx* dctx_;
    std::vector<char> in_buf_;
    ZSTD_inBuffer in_{nullptr, 0, 0};
    size_t last_ret_ = 0;
};

std::unique_ptr<ByteStream> open_stream(const std::string& path) {
    if (ends_with(path, ".gz"))
        return std::make_unique<GzipStream>(path);
    if (ends_with(path, ".zst"))
        return std::make_unique<ZstdStream>(path);
    return std::make_unique<PlainStream>(path);
}

bool is_jsonl(const std::string& path) {
    return ends_with(path, ".jsonl") || ends_with(path, ".jsonl.gz") ||
           ends_with(path, ".jsonl.zst");
}

bool is_text(const std::string& path) {
    return ends_with(path, ".txt") || ends_with(path, ".txt.gz") || ends_with(path, ".txt.zst");
}

}  // namespace

// One open input: a stream and the state of reading it.
struct Corpus::Source {
    std::string path;
    std::unique_ptr<ByteStream> stream;  // null for builtin corpora
    bool jsonl = false;
    bool done = false;
    int64_t line = 0;
    std::string buffer;  // read-ahead
    size_t pos = 0;
    int64_t builtin_next = 0, builtin_count = 0;
    bool started = false;  // .txt: the document's first part was returned
    std::string carry;     // .txt: bytes read past the last cut

    // Reads the next part of a .txt document into `out`: the text up to the last '\n' within
    // part_bytes, else up to the first '\n' past it, else to the end of the file (`last`). The
    // '\n' starts the next part; what was read past the cut waits in `carry`.
    void read_part(std::string& out, bool& last, size_t part_bytes) {
        constexpr size_t block = 1 << 20;
        out.swap(carry);
        carry.clear();
        size_t scanned = 0;  // bytes past part_bytes already searched for a '\n'
        while (true) {
            if (part_bytes != std::string::npos && out.size() > part_bytes) {
                size_t cut = out.rfind('\n', part_bytes);
                if (cut == 0 || cut == std::string::npos) {
                    cut = out.find('\n', std::max(part_bytes + 1, scanned));
                    scanned = out.size();
                }
                if (cut != 0 && cut != std::string::npos) {
                    carry.assign(out, cut, std::string::npos);
                    out.resize(cut);
                    last = false;
                    return;
                }
            }
            size_t had = out.size();
            out.resize(had + block);
            size_t got = stream->read(out.data() + had, block);
            out.resize(had + got);
            if (got == 0) {
                done = true;
                last = true;
                return;
            }
        }
    }

    // Reads the next line into `out` (without the newline); false at the end.
    bool read_line(std::string& out, int64_t max_bytes) {
        out.clear();
        while (true) {
            size_t nl = buffer.find('\n', pos);
            out.append(buffer, pos, nl == std::string::npos ? std::string::npos : nl - pos);
            if (int64_t(out.size()) > max_bytes) {
                throw error("{}:{}: line is longer than data.max_line_bytes={}", path, line + 1,
                            max_bytes);
            }
            if (nl != std::string::npos) {
                pos = nl + 1;
                line++;
                return true;
            }
            buffer.clear();
            pos = 0;
            buffer.resize(1 << 20);
            size_t got = stream->read(buffer.data(), buffer.size());
            buffer.resize(got);
            if (got == 0) {
                if (out.empty())
                    return false;
                line++;
                return true;
            }
        }
    }
};

std::vector<std::string> expand_corpus(const std::vector<std::string>& paths) {
    std::vector<std::string> files;
    for (const auto& p : paths) {
        if (p.rfind("builtin:", 0) == 0) {
            files.push_back(p);
            continue;
        }
        std::vector<std::string> found;
        if (stdfs::is_directory(p)) {
            for (const auto& e : stdfs::recursive_directory_iterator(p)) {
                std::string f = e.path().string();
                if (e.is_regular_file() && (is_jsonl(f) || is_text(f)))
                    found.push_back(f);
            }
        } else if (stdfs::is_regular_file(p)) {
            found.push_back(p);
        } else if (p.find_first_of("*?[") != std::string::npos) {
            glob_t g;
            if (::glob(p.c_str(), 0, nullptr, &g) == 0) {
                for (size_t i = 0; i < g.gl_pathc; i++)
                    found.push_back(g.gl_pathv[i]);
            }
            globfree(&g);
        }
        if (found.empty()) {
            throw error("corpus path {} matches no .txt/.jsonl file (optionally .gz or .zst)", p);
        }
        std::sort(found.begin(), found.end());
        for (auto& f : found) {
            if (!is_jsonl(f) && !is_text(f)) {
                throw error(
                    "corpus file {}: unknown format (expected .txt or .jsonl, optionally "
                    ".gz or .zst)",
                    f);
            }
            files.push_back(std::move(f));
        }
    }
    return files;
}

namespace {
// "builtin:stories" or "builtin:stories:N" (N documents).
int64_t builtin_documents(const std::string& name) {
    const std::string base = "builtin:stories";
    if (name == base)
        return 20000;
    if (name.rfind(base + ":", 0) == 0) {
        try {
            size_t used = 0;
            std::string n = name.substr(base.size() + 1);
            int64_t v = std::stoll(n, &used);
            if (used == n.size() && v > 0)
                return v;
        } catch (const std::exception&) {
        }
    }
    throw error("corpus {} is not a built-in corpus (use builtin:stories or builtin:stories:N)",
                name);
}
}  // namespace

int64_t corpus_bytes(const std::vector<std::string>& files) {
    int64_t total = 0;
    for (const auto& f : files) {
        total +=
            f.rfind("builtin:", 0) == 0 ? builtin_documents(f) * 600 : int64_t(stdfs::file_size(f));
    }
    return total;
}

Corpus::Corpus(std::vector<std::string> files, CorpusOptions options)
    : files_(std::move(files)), options_(std::move(options)) {}

Corpus::~Corpus() = default;

int64_t Corpus::bytes_read() const {
    return finished_bytes_ + (source_ && source_->stream ? source_->stream->consumed() : 0);
}

bool Corpus::open_next_file() {
    if (source_) {
        finished_bytes_ +=
            source_->stream ? source_->stream->consumed() : source_->builtin_count * 600;
        source_.reset();
    }
    if (next_file_ >= files_.size())
        return false;
    auto s = std::make_unique<Source>();
    s->path = files_[next_file_++];
    if (s->path.rfind("builtin:", 0) == 0) {
        s->builtin_count = builtin_documents(s->path);
    } else {
        s->stream = open_stream(s->path);
        s->jsonl = is_jsonl(s->path);
    }
    source_ = std::move(s);
    return true;
}

bool Corpus::next(std::string& text) {
    bool first = true, last = true;
    return next_part(text, first, last, std::string::npos);
}

bool Corpus::next_part(std::string& text, bool& first, bool& last, size_t part_bytes) {
    while (true) {
        first = last = true;
        if (!source_ || source_->done) {
            if (!open_next_file())
                return false;
        }
        Source& s = *source_;
        if (!s.stream) {  // builtin
            if (s.builtin_next >= s.builtin_count) {
                s.done = true;
                continue;
            }
            text = builtin_story(options_.seed, s.builtin_next++);
        } else if (s.jsonl) {
            std::string line;
            if (!s.read_line(line, options_.max_line_bytes)) {
                s.done = true;
                continue;
            }
            if (line.find_first_not_of(" \t\r") == std::string::npos)
                continue;
            std::string why;
            try {
                auto j = nlohmann::json::parse(line);
                auto it = j.is_object() ? j.find(options_.text_field) : j.end();
                if (it == j.end() || !it->is_string()) {
                    why = "has no string field '" + options_.text_field + "' (data.text_field)";
                } else {
                    text = it->get<std::string>();
                }
            } catch (const nlohmann::json::exception& e) {
                why = "is not valid JSON";
                // nlohmann rejects invalid UTF-8 inside strings too: repair and retry once.
                std::string repaired = line;
                int64_t n = repair_utf8(repaired);
                if (n > 0) {
                    try {
                        auto j = nlohmann::json::parse(repaired);
                        auto it = j.find(options_.text_field);
                        if (it != j.end() && it->is_string()) {
                            text = it->get<std::string>();
                            stats_.replaced_utf8 += n;
                            why.clear();
                        }
                    } catch (const nlohmann::json::exception&) {
                    }
                }
            }
            if (!why.empty()) {
                if (options_.skip_bad_lines) {
                    stats_.bad_lines++;
                    continue;
                }
                throw error("{}:{}: line {} (set data.skip_bad_lines=true to skip such lines)",
                            s.path, s.line, why);
            }
        } else {  // .txt: the whole file is one document
            first = !s.started;
            s.started = true;
            s.read_part(text, last, part_bytes);
        }
        // A cut before a '\n' splits no UTF-8 sequence, valid or not: parts repair as the whole.
        stats_.replaced_utf8 += repair_utf8(text);
        if (text.empty()) {  // only a document can be empty, never a part of one
            stats_.empty_documents++;
            continue;
        }
        if (first)
            stats_.documents++;
        stats_.bytes += int64_t(text.size());
        return true;
    }
}

int64_t repair_utf8(std::string& text) {
    // Fast path: valid text is left untouched.
    auto valid_at = [&](size_t i, size_t& len) {
        unsigned char c = text[i];
        if (c < 0x80)
            return len = 1, true;
        int n = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
        if (n == 0 || i + n > text.size())
            return false;
        uint32_t cp = c & (0xFF >> (n + 1));
        for (int k = 1; k < n; k++) {
            unsigned char d = text[i + k];
            if ((d & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (d & 0x3F);
        }
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        len = size_t(n);
        return true;
    };
    size_t i = 0, len = 0;
    while (i < text.size() && valid_at(i, len))
        i += len;
    if (i == text.size())
        return 0;
    std::string out(text, 0, i);
    int64_t replaced = 0;
    while (i < text.size()) {
        if (valid_at(i, len)) {
            out.append(text, i, len);
            i += len;
        } else {
            out.append("\xEF\xBF\xBD");
            replaced++;
            i++;
            while (i < text.size() && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80)
                i++;
        }
    }
    text = std::move(out);
    return replaced;
}

std::string builtin_story(uint64_t seed, int64_t index) {
    static const std::array<const char*, 16> names = {"Lily", "Tom",  "Mia",  "Ben", "Sara", "Max",
                                                      "Anna", "Leo",  "Emma", "Sam", "Zoe",  "Jack",
                                                      "Nora", "Finn", "Ruby", "Owen"};
    static const std::array<const char*, 12> animals = {"dog",    "cat",  "bird",  "fox",
                                                        "rabbit", "duck", "bear",  "frog",
                                                        "mouse",  "owl",  "horse", "fish"};
    static const std::array<const char*, 12> places = {
        "the park", "the garden", "the forest",    "the beach",  "the river", "the farm",
        "the hill", "the school", "the old house", "the market", "the lake",  "the meadow"};
    static const std::array<const char*, 12> adjectives = {"little", "big",   "happy", "sleepy",
                                                           "brave",  "shy",   "red",   "tiny",
                                                           "kind",   "funny", "quiet", "clever"};
    static const std::array<const char*, 12> things = {"ball",  "kite",  "box",  "hat",
                                                       "cake",  "book",  "boat", "flower",
                                                       "stone", "apple", "key",  "drum"};
    static const std::array<const char*, 8> feelings = {"happy", "sad",   "excited", "scared",
                                                        "proud", "tired", "curious", "surprised"};
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(index));
    auto pick = [&](const auto& list) { return list[rng() % list.size()]; };
    const char* hero = pick(names);
    const char* friend_name = pick(names);
    const char* animal = pick(animals);
    const char* adjective = pick(adjectives);
    const char* thing = pick(things);
    const char* place = pick(places);
    std::string s =
        fmt::format("Once upon a time, there was a {} {} named {}. ", adjective, animal, hero);
    s += fmt::format("{} liked to play in {} with a {}. ", hero, place, thing);
    int events = 3 + int(rng() % 5);
    for (int e = 0; e < events; e++) {
        switch (rng() % 6) {
            case 0:
                s += fmt::format("One day, {} lost the {} near {}. ", hero, thing, pick(places));
                break;
            case 1:
                s += fmt::format("{} met {}, who had a {} {}. ", hero, friend_name,
                                 pick(adjectives), pick(things));
                break;
            case 2:
                s += fmt::format("{} felt {} and said, \"I want to find my {}!\" ", hero,
                                 pick(feelings), thing);
                break;
            case 3:
                s += fmt::format("They walked to {} and looked under a {} {}. ", pick(places),
                                 pick(adjectives), pick(things));
                break;
            case 4:
                s += fmt::format("{} saw a {} {} and smiled. ", friend_name, pick(adjectives),
                                 pick(animals));
                break;
            default:
                s += fmt::format("It was {} o'clock, and the sky was {}. ", 1 + rng() % 12,
                                 rng() % 2 ? "blue" : "grey");
                break;
        }
    }
    s += fmt::format("At last, {} found the {} and felt {}. The end.", hero, thing, pick(feelings));
    return s;
}

}  // namespace kiln::data
