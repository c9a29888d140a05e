#pragma once
// Export a checkpoint as a GGUF file that llama.cpp's `llama` architecture loads: the
// hyperparameters, the run's SentencePiece vocabulary, and every weight under llama.cpp's name,
// with the rows of Q and K reordered for llama.cpp's rotary pairing. Reads any DP x TP
// checkpoint one tensor at a time. The mapping: docs/formats.md.
#include <cstdint>
#include <string>

namespace kiln::exporter {

class GgufFile;

struct GgufExportOptions {
    std::string dtype = "f32";     // f32, f16, bf16, q8_0 (norms stay f32 in every one)
    std::string tokenizer;         // the run's tokenizer.model; required
    std::string name;              // general.name; "" gives "kiln-<preset>-step<N>"
    std::string data_fingerprint;  // kiln.data.fingerprint; "" leaves it out
    bool force = false;            // replace an existing file
};

struct GgufExportResult {
    int64_t step = 0;
    uint64_t bytes = 0;  // the file's size
};

// Writes out_path atomically (out_path.tmp, then rename): a failure leaves no file and any
// old one untouched. Throws Error in one sentence for an unknown dtype, a missing tokenizer,
// a tokenizer that does not fit the model, an existing out_path without `force`, or one that is
// not a regular file (a FIFO, a device, a link) with it.
GgufExportResult export_gguf(const std::string& checkpoint_dir, const std::string& out_path,
                             const GgufExportOptions& options);

// What identifies a run's training data: "xxh64:<16 hex>" of a data set's manifest.json (which
// holds every shard's checksum and the tokenizer's), "synthetic", or "" when the folder is gone.
std::string data_fingerprint(const std::string& data_source);

// Rows of a Q or K weight (n_heads * head_dim rows of `cols`) from kiln's rotary pairing
// (Hugging Face's: dimension i of a head turns with i + head_dim/2) to llama.cpp's (2j with
// 2j+1): out row h*D + 2j + i = in row h*D + i*D/2 + j. unpermute_rotary_rows is its inverse.
void permute_rotary_rows(const float* in, float* out, int64_t n_heads, int64_t head_dim,
                         int64_t cols);
void unpermute_rotary_rows(const float* in, float* out, int64_t n_heads, int64_t head_dim,
                           int64_t cols);

// `kiln export --inspect`: the metadata and the tensor table, as text.
std::string describe(const GgufFile& file);

}  // namespace kiln::exporter
