#pragma once
// Corpus readers: documents, in a stable order, from .txt (a file is a document) and .jsonl
// (a line is a document; its text field is configurable), each also as .gz and .zst; files,
// folders (recursive, sorted) and globs; and the built-in generated corpus `builtin:stories`.
// Invalid UTF-8 is replaced by U+FFFD and counted; bad lines fail or are skipped and counted.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace kiln::data {

struct CorpusOptions {
    std::string text_field = "text";    // jsonl key holding a document's text
    bool skip_bad_lines = false;        // malformed JSON / missing field: skip and count, or fail
    int64_t max_line_bytes = 64 << 20;  // longer lines end the command naming file:line
    uint64_t seed = 1;                  // builtin corpora
};

struct CorpusStats {
    int64_t documents = 0;
    int64_t bytes = 0;            // text bytes of the documents returned
    int64_t bad_lines = 0;        // skipped (skip_bad_lines)
    int64_t replaced_utf8 = 0;    // invalid UTF-8 sequences replaced by U+FFFD
    int64_t empty_documents = 0;  // skipped: nothing to tokenize
};

// Files (and builtin: entries) that `paths` name, in the order they will be read: each argument
// in turn, a folder's files sorted by path, a glob's matches sorted. Throws Error naming a path
// that matches nothing.
std::vector<std::string> expand_corpus(const std::vector<std::string>& paths);

// Sum of the sizes of the files (an estimate of the work; builtin entries count their size).
int64_t corpus_bytes(const std::vector<std::string>& files);

class Corpus {
public:
    Corpus(std::vector<std::string> files, CorpusOptions options);
    ~Corpus();
    // The next non-empty document, valid UTF-8; false at the end. Throws Error naming file:line.
    bool next(std::string& text);
    // The next part of a document: as next, but a .txt document longer than part_bytes comes in
    // parts, each but the last cut just before a '\n' (the next part starts with it), so that a
    // file of any size is read with bounded memory. `first` and `last` mark a document's first
    // and last part. A part runs past part_bytes to the next '\n' (or to the end of the file).
    bool next_part(std::string& text, bool& first, bool& last, size_t part_bytes);
    const CorpusStats& stats() const { return stats_; }
    int64_t bytes_read() const;  // input bytes consumed (compressed size for compressed files)

private:
    struct Source;
    bool open_next_file();
    std::vector<std::string> files_;
    CorpusOptions options_;
    CorpusStats stats_;
    size_t next_file_ = 0;
    std::unique_ptr<Source> source_;
    int64_t finished_bytes_ = 0;
};

// Replaces invalid UTF-8 sequences in place by U+FFFD; returns how many were replaced.
int64_t repair_utf8(std::string& text);

// The built-in corpus: simple generated stories (a grammar and word lists of our own), a
// deterministic function of (seed, index).
std::string builtin_story(uint64_t seed, int64_t index);

}  // namespace kiln::data
