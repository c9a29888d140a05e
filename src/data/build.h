#pragma once
// `kiln data`: corpus -> tokenizer -> packed shards + manifest. A reader thread, encoder threads
// and the packer overlap; large documents are encoded in segments cut where the tokenizer cannot
// merge (just before a '\n'), with the ids of the whole; tokens are packed in corpus order, so
// the output is identical for any thread count. Memory stays bounded on corpora of any size
// (data.batch_bytes of text read ahead, one shard in flight). Each document becomes BOS + tokens
// (+ EOS), concatenated and cut into seq_len rows; the short tail is dropped (counted) or padded
// with EOS. Shards are written atomically one by one and manifest.json last: a folder whose
// build was interrupted has no manifest and is not a data set; rerunning rebuilds it.
#include <cstdint>
#include <string>
#include <vector>

#include "data/corpus.h"
#include "data/shard.h"

namespace kiln {
class ConfigSchema;
}

namespace kiln::data {

struct DataConfig {
    std::string source = "synthetic";  // training input: a shard folder or `synthetic`
    std::string tokenizer;             // the run's tokenizer; when set, shards must match it
    bool verify = true;                // check shard checksums before training
    int64_t seq_len = 4096;            // tokens per stored sequence (kiln data)
    bool add_eos = true;
    std::string tail = "drop";       // drop | pad
    int64_t shard_tokens = 1 << 25;  // target tokens per shard (rounded down to whole rows)
    std::string text_field = "text";
    bool skip_bad_lines = false;
    int64_t max_line_bytes = 64 << 20;
    int64_t seed = 1;               // builtin corpora
    int64_t batch_bytes = 4 << 20;  // text read ahead of the packer, at most

    CorpusOptions corpus_options() const;
};

void register_keys(ConfigSchema& schema, DataConfig& config);

class Tokenizer;

struct BuildResult {
    Manifest manifest;
    CorpusStats stats;
    int64_t tokens = 0;   // tokens produced (before cutting into rows)
    bool reused = false;  // the folder already held this data set
};

// Builds the data set in out_dir. With `force` false, a complete data set of the same recipe
// there is reused, and one of another recipe is an error (nothing is overwritten).
BuildResult build_dataset(const std::vector<std::string>& corpus, const Tokenizer& tokenizer,
                          const std::string& out_dir, const DataConfig& config, bool force);

// Writes up to max_bytes of the corpus as lines (documents split at newlines, empty lines
// dropped) to `path`, for tokenizer training. Returns the bytes written.
int64_t write_training_lines(const std::vector<std::string>& corpus, const DataConfig& config,
                             const std::string& path, int64_t max_bytes);

// Checks a data set completely: manifest, headers, sizes, checksums, token range. Throws Error
// naming the first bad file; returns the manifest.
Manifest verify_dataset(const std::string& dir);

}  // namespace kiln::data
