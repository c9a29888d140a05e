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
// newlines, read from the protobuf wire format (the library exposes only the serialized proto).
struct ModelSpec {
    int model_type = 1;                 // TrainerSpec.model_type (3): UNIGRAM=1 BPE=2 WORD=3 CHAR=4
    bool whitespace_as_suffix = false;  // TrainerSpec.treat_whitespace_as_suffix (24)
    bool charsmap = false;              // NormalizerSpec.precompiled_charsmap (2) non-empty
    bool remove_extra_whitespaces = true;  // NormalizerSpec.remove_extra_whitespaces (4)
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
        if (field == 2) {  // TrainerSpec
            s.ok &= for_each_field(bytes, [&](int f, int w, uint64_t v, std::string_view) {
                if (w == 0 && f == 3)
                    s.model_type = int(v);
                if (w == 0 && f == 24)
                    s.whitespace_as_suffix = v != 0;
            });
        } else if (field == 3) {  // NormalizerSpec
            s.ok &= for_each_field(bytes, [&](int f, int w, uint64_t v, std::string_view b) {
                if (w == 2 && f == 2)
                    s.charsmap = !b.empty();
                if (w == 0 && f == 4)
                    s.remove_extra_whitespaces = v != 0;
            });
        }
    });
    return s;
}

}  // namespace

std::string tokenizer_identity(const std::string& model_path) {
    return fmt::format("xxh64:{:016x}", fs::xxh64_file(model_path));
}

Tokenizer::Tokenizer(const std::string& model_path)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
    if (!fs::exists(model_path))
        throw error("tokenizer {} does not exist", model_path);
    auto status = sp_->Load(model_path);
    if (!status.ok()) {
        throw error("{} is not a SentencePiece model: {}", model_path, status.ToString());
    }
    identity_ = tokenizer_identity(model_path);

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
    if (splits_)
        dummy_prefix_.assign(nl.begin(), nl.end() - 1);
}

Tokenizer::~Tokenizer() = default;

std::vector<int> Tokenizer::encode(std::string_view text) const {
    std::vector<int> ids;
    auto status = sp_->Encode(text, &ids);
    KILN_CHECK(status.ok(), "SentencePiece encode failed: {}", status.ToString());
    return ids;
}

std::vector<int> Tokenizer::encode_part(std::string_view text, bool first) const {
    if (first)
        return encode(text);
    KILN_CHECK(splits_ && !text.empty() && text[0] == '\n',
               "encode_part: a document is cut only just before a newline");
    std::vector<int> ids = encode(text);
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
