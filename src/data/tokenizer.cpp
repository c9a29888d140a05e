#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <thread>
#include <unordered_map>

#include "core/error.h"
#include "core/fs.h"
#include "data/shard.h"

namespace kiln::data {

namespace {

// The few fields of SentencePiece's ModelProto that decide whether a document may be cut at
// newlines, and whether kiln's encoder reproduces the model, read from the protobuf wire format
// (the library exposes only the serialized proto).
struct ModelSpec {
    int model_type = 1;                 // TrainerSpec.model_type (3): UNIGRAM=1 BPE=2 WORD=3 CHAR=4
    bool whitespace_as_suffix = false;  // TrainerSpec.treat_whitespace_as_suffix (24)
    bool byte_fallback = false;         // TrainerSpec.byte_fallback (35)
    bool charsmap = false;              // NormalizerSpec.precompiled_charsmap (2) non-empty
    bool add_dummy_prefix = true;       // NormalizerSpec.add_dummy_prefix (3)
    bool remove_extra_whitespaces = true;  // NormalizerSpec.remove_extra_whitespaces (4)
    bool escape_whitespaces = true;        // NormalizerSpec.escape_whitespaces (5)
    int special_pieces = 0;                // pieces (1) of type USER_DEFINED (4) or UNUSED (5)
    bool ok = true;                        // the bytes parsed
};

// Calls fn(field, wire_type, varint, bytes) for each field of one message; false on bad bytes.
template <typename Fn>
bool for_each_field(std::string_view m, Fn&& fn) {
    size_t i = 0;
    auto varint = [&](uint64_t& v) {
        v = 0;
        for (int shift = 0; shift < 64 && i < m.size(); shift += 7) {
            auto b = static_cast<unsigned char>(m[i++]);
            v |= uint64_t(b & 0x7F) << shift;
            if ((b & 0x80) == 0)
                return true;
        }
        return false;
    };
    while (i < m.size()) {
        uint64_t key = 0, v = 0;
        if (!varint(key))
            return false;
        std::string_view bytes;
        switch (key & 7) {
            case 0:
                if (!varint(v))
                    return false;
                break;
            case 1:
                i += 8;
                break;
            case 2:
                if (!varint(v) || v > m.size() - i)
                    return false;
                bytes = m.substr(i, v);
                i += v;
                break;
            case 5:
                i += 4;
                break;
            default:
                return false;
        }
        if (i > m.size())
            return false;
        fn(int(key >> 3), int(key & 7), v, bytes);
    }
    return true;
}

ModelSpec read_spec(const std::string& proto) {
    ModelSpec s;
    s.ok = for_each_field(proto, [&](int field, int wire, uint64_t, std::string_view bytes) {
        if (wire != 2)
            return;
        if (field == 1) {  // SentencePiece
            s.ok &= for_each_field(bytes, [&](int f, int w, uint64_t v, std::string_view) {
                if (w == 0 && f == 3 && (v == 4 || v == 5))
                    s.special_pieces++;
            });
        } else if (field == 2) {  // TrainerSpec
            s.ok &= for_each_field(bytes, [&](int f, int w, uint64_t v, std::string_view) {
                if (w == 0 && f == 3)
                    s.model_type = int(v);
                if (w == 0 && f == 24)
                    s.whitespace_as_suffix = v != 0;
                if (w == 0 && f == 35)
                    s.byte_fallback = v != 0;
            });
        } else if (field == 3) {  // NormalizerSpec
            s.ok &= for_each_field(bytes, [&](int f, int w, uint64_t v, std::string_view b) {
                if (w == 2 && f == 2)
                    s.charsmap = !b.empty();
                if (w == 0 && f == 3)
                    s.add_dummy_prefix = v != 0;
                if (w == 0 && f == 4)
                    s.remove_extra_whitespaces = v != 0;
                if (w == 0 && f == 5)
                    s.escape_whitespaces = v != 0;
            });
        }
    });
    return s;
}

// The length of the valid UTF-8 character at s[i] (as repair_utf8 judges it), 0 if invalid.
inline size_t utf8_length(std::string_view s, size_t i) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80)
        return 1;
    size_t n = (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size())
        return 0;
    uint32_t cp = c & (0xFF >> (n + 1));
    for (size_t k = 1; k < n; k++) {
        auto d = static_cast<unsigned char>(s[i + k]);
        if ((d & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (d & 0x3F);
    }
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

inline uint32_t pack_char(std::string_view s, size_t i, size_t n) {
    uint32_t key = 0;
    for (size_t k = 0; k < n; k++)
        key = (key << 8) | static_cast<unsigned char>(s[i + k]);
    return key;
}

}  // namespace

// kiln's own encoder for the BPE models kiln cuts (no normalization, byte fallback, no
// user-defined or unused pieces): SentencePiece's segmentation exactly (each character a
// symbol, ' ' as U+2581, the dummy prefix; the adjacent pair whose concatenation is the
// best-scoring piece merges first, the leftmost on a tie; characters outside the vocabulary
// become byte tokens), with the vocabulary in flat tables and no allocation per call.
class BpeEncoder {
public:
    // Null when the model is not one this encoder reproduces.
    static std::unique_ptr<BpeEncoder> make(const sentencepiece::SentencePieceProcessor& sp,
                                            const ModelSpec& spec) {
        if (!spec.ok || spec.model_type != 2 || spec.whitespace_as_suffix || !spec.byte_fallback ||
            spec.charsmap || spec.remove_extra_whitespaces || !spec.escape_whitespaces ||
            spec.special_pieces != 0)
            return nullptr;
        auto e = std::unique_ptr<BpeEncoder>(new BpeEncoder);
        e->dummy_prefix_ = spec.add_dummy_prefix;
        const int n = sp.GetPieceSize();
        auto normal = [&](int id) {
            return id >= 0 && id < n && !sp.IsUnknown(id) && !sp.IsControl(id) && !sp.IsByte(id) &&
                   !sp.IsUnused(id);
        };
        auto id_of = [&](std::string_view piece) {
            int id = sp.PieceToId(piece);
            return normal(id) && sp.IdToPiece(id) == piece ? id : -1;
        };
        for (int b = 0; b < 256; b++) {
            e->byte_id_[b] = sp.PieceToId(fmt::format("<0x{:02X}>", b));
            if (e->byte_id_[b] < 0 || !sp.IsByte(e->byte_id_[b]))
                return nullptr;
        }
        e->space_id_ = id_of("\xe2\x96\x81");
        if (e->space_id_ < 0)
            return nullptr;
        std::fill(std::begin(e->ascii_), std::end(e->ascii_), -1);
        size_t pairs = 0;
        for (int id = 0; id < n; id++) {
            if (!normal(id))
                continue;
            const std::string piece = sp.IdToPiece(id);
            size_t chars = 0;
            for (size_t i = 0, len; i < piece.size(); i += len, chars++) {
                len = utf8_length(piece, i);
                if (len == 0)
                    return nullptr;
                if (id_of(piece.substr(i, len)) < 0)
                    return nullptr;  // a piece no merge of characters can reach
                pairs += i > 0;
            }
            if (chars == 1) {
                if (piece.size() == 1)
                    e->ascii_[static_cast<unsigned char>(piece[0])] = id;
                else
                    e->chars_[pack_char(piece, 0, piece.size())] = id;
            }
        }
        size_t slots = 1;
        while (slots < 2 * pairs + 16)
            slots <<= 1;
        e->table_.assign(slots, Merge{});
        e->mask_ = slots - 1;
        for (int id = 0; id < n; id++) {
            if (!normal(id))
                continue;
            const std::string piece = sp.IdToPiece(id);
            for (size_t k = utf8_length(piece, 0); k < piece.size(); k += utf8_length(piece, k)) {
                int a = id_of(std::string_view(piece).substr(0, k));
                int b = id_of(std::string_view(piece).substr(k));
                if (a >= 0 && b >= 0)
                    e->insert(a, b, id, sp.GetScore(id));
            }
        }
        return e;
    }

    // Appends the ids of `text`; false (nothing appended) when `text` is not valid UTF-8.
    bool encode(std::string_view text, bool dummy_prefix, std::vector<int>& out) const {
        if (text.empty())
            return true;
        if (text.size() >= (uint64_t(1) << 32))
            return false;
        thread_local std::vector<Symbol> symbols;
        thread_local std::vector<Candidate> heap;
        if (symbols.capacity() > (size_t(1) << 20)) {  // a huge line: keep no such buffers
            symbols = {};
            heap = {};
        }
        symbols.clear();
        heap.clear();
        if (dummy_prefix && dummy_prefix_)
            symbols.push_back({space_id_, 0, 0});
        for (size_t i = 0; i < text.size();) {
            auto c = static_cast<unsigned char>(text[i]);
            if (c < 0x80) {
                symbols.push_back({c == ' ' ? space_id_ : ascii_[c], uint32_t(i), 1});
                i++;
                continue;
            }
            size_t len = utf8_length(text, i);
            if (len == 0)
                return false;  // SentencePiece's own replacement rules apply
            auto it = chars_.find(pack_char(text, i, len));
            symbols.push_back({it == chars_.end() ? -1 : it->second, uint32_t(i), uint32_t(len)});
            i += len;
        }
        const int count = int(symbols.size());
        for (int i = 0; i < count; i++) {
            symbols[i].prev = i - 1;
            symbols[i].next = i + 1 < count ? i + 1 : -1;
        }
        auto consider = [&](int left) {
            int right = left < 0 ? -1 : symbols[left].next;
            if (left < 0 || right < 0)
                return;
            if (const Merge* m = find(symbols[left].id, symbols[right].id)) {
                heap.push_back({m->score, left, right, symbols[right].id, m->merged});
                std::push_heap(heap.begin(), heap.end());
            }
        };
        for (int i = 0; i + 1 < count; i++)
            consider(i);
        while (!heap.empty()) {
            std::pop_heap(heap.begin(), heap.end());
            Candidate top = heap.back();
            heap.pop_back();
            Symbol& l = symbols[top.left];
            Symbol& r = symbols[top.right];
            // Stale: either side merged since (the left one would have absorbed this right one).
            if (l.id < 0 || r.id != top.right_id || l.next != top.right)
                continue;
            l.id = top.merged;
            l.next = r.next;
            if (r.next >= 0)
                symbols[r.next].prev = top.left;
            r.id = -2;  // gone
            consider(l.prev);
            consider(top.left);
        }
        for (int i = 0; i >= 0 && i < count; i = symbols[i].next) {
            const Symbol& s = symbols[i];
            if (s.id >= 0) {
                out.push_back(s.id);
            } else {
                for (uint32_t k = 0; k < s.len; k++)
                    out.push_back(byte_id_[static_cast<unsigned char>(text[s.begin + k])]);
            }
        }
        return true;
    }

private:
    struct Merge {
        uint64_t key = ~uint64_t(0);
        int merged = -1;
        float score = 0;
    };
    struct Symbol {
        int id;  // -1: a character outside the vocabulary; -2: merged into its left neighbour
        uint32_t begin, len;  // the character in the text (for byte fallback)
        int prev = -1, next = -1;
    };
    struct Candidate {
        float score;
        int left, right, right_id, merged;
        // The heap's top: the best score, then the leftmost pair.
        bool operator<(const Candidate& o) const {
            return score < o.score || (score == o.score && left > o.left);
        }
    };

    static uint64_t key(int a, int b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
    static uint64_t slot(uint64_t k) { return (k * 0x9E3779B97F4A7C15ull) >> 17; }
    void insert(int a, int b, int merged, float score) {
        uint64_t k = key(a, b);
        for (uint64_t i = slot(k) & mask_;; i = (i + 1) & mask_) {
            if (table_[i].key == k || table_[i].merged < 0) {
                table_[i] = {k, merged, score};
                return;
            }
        }
    }
    const Merge* find(int a, int b) const {
        if (a < 0 || b < 0)
            return nullptr;
        uint64_t k = key(a, b);
        for (uint64_t i = slot(k) & mask_;; i = (i + 1) & mask_) {
            if (table_[i].key == k)
                return &table_[i];
            if (table_[i].merged < 0)
                return nullptr;
        }
    }

    bool dummy_prefix_ = true;
    int space_id_ = -1;
    int byte_id_[256];
    int ascii_[128];
    std::unordered_map<uint32_t, int> chars_;  // a character's UTF-8 bytes -> its piece
    std::vector<Merge> table_;                 // (left id, right id) -> merged piece
    uint64_t mask_ = 0;
};

namespace {
std::string identity_of(uint64_t hash) {  // of the model file's bytes
    return fmt::format("xxh64:{:016x}", hash);
}
}  // namespace

std::string tokenizer_identity(const std::string& model_path) {
    return identity_of(fs::xxh64_file(model_path));
}

Tokenizer::Tokenizer(const std::string& model_path)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
    if (!fs::exists(model_path))
        throw error("tokenizer {} does not exist", model_path);
    if (std::filesystem::is_directory(model_path))
        throw error("tokenizer {} is a folder, not a tokenizer model", model_path);
    // Read through kiln's own mapping, not SentencePiece's stream, whose failures name no file
    // and which would wait on a FIFO: MappedFile refuses anything but a regular file by name.
    const fs::MappedFile file(model_path);
    auto status =
        sp_->LoadFromSerializedProto({reinterpret_cast<const char*>(file.data()), file.size()});
    if (!status.ok()) {
        throw error("{} is not a SentencePiece model: {}", model_path, status.ToString());
    }
    identity_ = identity_of(fs::xxh64(file.data(), file.size()));

    // A cut just before a '\n' changes no id when the normalizer leaves every character alone
    // and BPE can merge nothing across the '\n': no piece holds one, so it is the byte token
    // <0x0A>. The text after a cut then encodes as it does inside the document, once the dummy
    // prefix its encoding starts with is taken off.
    ModelSpec spec = read_spec(sp_->serialized_model_proto());
    bool newline_in_piece = false;
    for (int id = 0; id < vocab_size(); id++)
        newline_in_piece |= sp_->IdToPiece(id).find('\n') != std::string::npos;
    std::vector<int> nl = encode("\n");
    int nl_byte = sp_->PieceToId("<0x0A>");
    splits_ = spec.ok && spec.model_type == 2 && !spec.whitespace_as_suffix && !spec.charsmap &&
              !spec.remove_extra_whitespaces && !newline_in_piece && !nl.empty() &&
              nl.back() == nl_byte && sp_->IsByte(nl_byte);
    if (splits_) {
        dummy_prefix_.assign(nl.begin(), nl.end() - 1);
        bpe_ = BpeEncoder::make(*sp_, spec);
    }
}

bool Tokenizer::use_encoder(Encoder encoder) {
    use_bpe_ = encoder == Encoder::kiln && bpe_ != nullptr;
    return use_bpe_ == (encoder == Encoder::kiln);
}

Tokenizer::~Tokenizer() = default;

std::vector<int> Tokenizer::encode(std::string_view text) const {
    std::vector<int> ids;
    if (use_bpe_ && bpe_->encode(text, true, ids))
        return ids;
    auto status = sp_->Encode(text, &ids);
    KILN_CHECK(status.ok(), "SentencePiece encode failed: {}", status.ToString());
    return ids;
}

std::vector<int> Tokenizer::encode_part(std::string_view text, bool first) const {
    if (first)
        return encode(text);
    KILN_CHECK(splits_ && !text.empty() && text[0] == '\n',
               "encode_part: a document is cut only just before a newline");
    std::vector<int> ids;
    if (use_bpe_ && bpe_->encode(text, false, ids))
        return ids;
    ids = encode(text);
    KILN_CHECK(ids.size() > dummy_prefix_.size() &&
                   std::equal(dummy_prefix_.begin(), dummy_prefix_.end(), ids.begin()),
               "encode_part: the encoding does not start with the dummy prefix");
    ids.erase(ids.begin(), ids.begin() + std::ptrdiff_t(dummy_prefix_.size()));
    return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
    for (int id : ids) {
        if (id < 0 || id >= vocab_size()) {
            throw error("token id {} is outside the vocabulary of {}", id, vocab_size());
        }
    }
    std::string text;
    auto status = sp_->Decode(ids, &text);
    if (!status.ok())
        throw error("cannot decode: {}", status.ToString());
    return text;
}

int Tokenizer::vocab_size() const {
    return sp_->GetPieceSize();
}
int Tokenizer::bos_id() const {
    return sp_->bos_id();
}
int Tokenizer::eos_id() const {
    return sp_->eos_id();
}
int Tokenizer::unk_id() const {
    return sp_->unk_id();
}
std::string Tokenizer::piece(int id) const {
    return sp_->IdToPiece(id);
}
float Tokenizer::score(int id) const {
    return sp_->GetScore(id);
}
Tokenizer::PieceKind Tokenizer::kind(int id) const {
    if (sp_->IsUnknown(id))
        return PieceKind::unknown;
    if (sp_->IsControl(id))
        return PieceKind::control;
    if (sp_->IsByte(id))
        return PieceKind::byte;
    if (sp_->IsUnused(id))
        return PieceKind::unused;
    return PieceKind::normal;
}

namespace {

// SentencePiece's refusal in the words of kiln's options, without its source locations.
std::string training_fault(std::string message, const TokenizerTraining& o) {
    long long a = 0, b = 0;
    if (size_t at = message.find("Vocabulary size too high");
        at != std::string::npos &&
        std::sscanf(message.c_str() + at,
                    "Vocabulary size too high (%lld). Please set it to a "
                    "value <= %lld",
                    &a, &b) == 2)
        return fmt::format(
            "a vocabulary of {} pieces is more than this corpus yields (at most "
            "{}): ask for fewer pieces or give more text",
            a, b);
    if (size_t at = message.find("smaller than required_chars.");
        at != std::string::npos &&
        std::sscanf(message.c_str() + at, "smaller than required_chars. %lld vs %lld", &a, &b) == 2)
        return fmt::format(
            "a vocabulary of {} pieces cannot hold the {} characters and control "
            "pieces this corpus needs: ask for at least {}",
            o.vocab_size, b, b);
    if (size_t close = message.find("] ");
        message.rfind("Internal: ", 0) == 0 && close != std::string::npos)
        message = message.substr(close + 2);  // "Internal: ./src/x.cc(1) [check] what"
    return message;
}

}  // namespace

void train_tokenizer(const std::string& lines_file, const std::string& out_path,
                     const TokenizerTraining& o) {
    std::string prefix = out_path;
    if (prefix.size() > 6 && prefix.substr(prefix.size() - 6) == ".model") {
        prefix.resize(prefix.size() - 6);
    }
    std::string tmp_prefix = prefix + ".training";
    int threads =
        o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()));
    // Llama-2's own settings, as its tokenizer.model records them. (As a map: the string form
    // of Train prints its whole command line to stderr whatever the log level.)
    const std::unordered_map<std::string, std::string> args = {
        {"input", lines_file},
        {"model_prefix", tmp_prefix},
        {"model_type", "bpe"},
        {"vocab_size", std::to_string(o.vocab_size)},
        {"byte_fallback", "true"},
        {"split_digits", "true"},
        {"allow_whitespace_only_pieces", "true"},
        {"normalization_rule_name", "identity"},
        {"remove_extra_whitespaces", "false"},
        {"add_dummy_prefix", "true"},
        {"character_coverage", "0.99995"},
        {"max_sentence_length", "16384"},
        {"unk_id", "0"},
        {"bos_id", "1"},
        {"eos_id", "2"},
        {"pad_id", "-1"},
        {"input_sentence_size", std::to_string(o.max_sentences)},
        {"shuffle_input_sentence", "true"},
        {"num_threads", std::to_string(threads)},
        {"minloglevel", "2"},
    };
    auto status = sentencepiece::SentencePieceTrainer::Train(args);
    if (!status.ok()) {
        std::filesystem::remove(tmp_prefix + ".model");
        std::filesystem::remove(tmp_prefix + ".vocab");
        throw error("tokenizer training failed: {}", training_fault(status.message(), o));
    }
    std::filesystem::remove(tmp_prefix + ".vocab");
    fs::fsync_path(tmp_prefix + ".model");
    std::filesystem::rename(tmp_prefix + ".model", out_path);
}

}  // namespace kiln::data
