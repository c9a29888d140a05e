#pragma once
// The tokenizer: SentencePiece. Loads any tokenizer.model (the real Llama-2 one gives exactly
// the ids spm_encode gives) and trains Llama-2-style models (BPE, byte fallback, digits split,
// <unk>=0 <s>=1 </s>=2, no normalization).
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace kiln::data {

class BpeEncoder;

class Tokenizer {
public:
    explicit Tokenizer(const std::string& model_path);  // throws Error naming the file
    ~Tokenizer();
    // Which implementation encodes: SentencePiece (the default, and the reference), or kiln's
    // own BPE encoder, which gives the same ids faster for the models it reproduces: those
    // splits_at_newlines() holds for, with byte fallback and no user-defined or unused pieces
    // (Llama-2's, and those kiln trains). For another model, asking for kiln's returns false
    // and SentencePiece stays. Text that is not valid UTF-8 always goes to SentencePiece.
    enum class Encoder { sentencepiece, kiln };
    bool use_encoder(Encoder encoder);
    // Thread-safe: several threads may encode at once.
    std::vector<int> encode(std::string_view text) const;
    // Whether a document may be encoded in parts cut just before a '\n' with the ids of the
    // whole: the model is BPE, normalizes nothing (no character map, no whitespace removal), no
    // piece holds a '\n' (so it becomes the byte token <0x0A>, which never merges), and the dummy
    // prefix leads a document. Llama-2's model and those kiln trains qualify; others are
    // encoded whole.
    bool splits_at_newlines() const { return splits_; }
    // The ids that `text` contributes to its document: `first` for the document's start (the same
    // as encode); otherwise `text` must begin with '\n' and gets no dummy prefix. Requires
    // splits_at_newlines() unless `first`.
    std::vector<int> encode_part(std::string_view text, bool first) const;
    std::string decode(const std::vector<int>& ids) const;  // throws Error on an id out of range
    int vocab_size() const;
    int bos_id() const;
    int eos_id() const;
    int unk_id() const;
    // The vocabulary as the model file holds it, for exports that ship it (GGUF). A user-defined
    // piece reads as normal: this SentencePiece library does not tell them apart.
    enum class PieceKind { normal, unknown, control, unused, byte };
    std::string piece(int id) const;  // e.g. "\xe2\x96\x81the" (U+2581 for a space), "<0x0A>"
    float score(int id) const;
    PieceKind kind(int id) const;
    // "xxh64:<16 hex>" of the model file: what a data set records and a run checks.
    const std::string& identity() const { return identity_; }

private:
    std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
    std::string identity_;
    bool splits_ = false;
    std::vector<int> dummy_prefix_;    // what encode("\n") puts before <0x0A>
    std::unique_ptr<BpeEncoder> bpe_;  // null for models it does not reproduce
    bool use_bpe_ = false;
};

// The identity (as Tokenizer::identity) of a model file without loading it.
std::string tokenizer_identity(const std::string& model_path);

struct TokenizerTraining {
    int vocab_size = 32000;
    int threads = 0;                    // 0: all cores
    int64_t max_sentences = 2'000'000;  // lines sampled from the corpus for training
};

// Trains a Llama-2-style BPE model on the text in `lines_file` (one sentence a line) and
// writes it atomically to out_path (a .model file). Throws Error with SentencePiece's reason.
void train_tokenizer(const std::string& lines_file, const std::string& out_path,
                     const TokenizerTraining& options);

}  // namespace kiln::data
