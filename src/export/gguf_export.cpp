#include "export/gguf_export.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdio>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "core/fs.h"
#include "data/tokenizer.h"
#include "export/gguf.h"
#include "model/layout.h"

namespace kiln::exporter {

namespace {

// llama.cpp's name for a kiln parameter, and the heads whose rows turn in pairs (0: none).
struct Target {
    std::string name;
    int64_t rotary_heads = 0;
};

Target target_of(const std::string& kiln_name, const model::LlamaConfig& c) {
    if (kiln_name == "tok_embeddings")
        return {"token_embd.weight"};
    if (kiln_name == "norm")
        return {"output_norm.weight"};
    if (kiln_name == "output")
        return {"output.weight"};
    int layer = -1;
    char rest[64] = {};
    KILN_CHECK(std::sscanf(kiln_name.c_str(), "layers.%d.%63s", &layer, rest) == 2,
               "unexpected parameter name {}", kiln_name);
    const std::string part = rest;
    const std::string blk = fmt::format("blk.{}.", layer);
    if (part == "attention_norm")
        return {blk + "attn_norm.weight"};
    if (part == "attention.wq")
        return {blk + "attn_q.weight", c.n_heads};
    if (part == "attention.wk")
        return {blk + "attn_k.weight", c.n_kv_heads};
    if (part == "attention.wv")
        return {blk + "attn_v.weight"};
    if (part == "attention.wo")
        return {blk + "attn_output.weight"};
    if (part == "ffn_norm")
        return {blk + "ffn_norm.weight"};
    if (part == "feed_forward.w1")
        return {blk + "ffn_gate.weight"};
    if (part == "feed_forward.w3")
        return {blk + "ffn_up.weight"};
    if (part == "feed_forward.w2")
        return {blk + "ffn_down.weight"};
    KILN_CHECK(false, "no GGUF name for parameter {}", kiln_name);
    return {};
}

// llama.cpp's general.file_type (its llama_ftype) for the bulk of the tensors.
uint32_t file_type(GgmlType t) {
    switch (t) {
        case GgmlType::f32:
            return 0;
        case GgmlType::f16:
            return 1;
        case GgmlType::q8_0:
            return 7;
        case GgmlType::bf16:
            return 32;
    }
    return 0;
}

// llama.cpp's token types (llama_token_type).
int32_t token_type(data::Tokenizer::PieceKind k) {
    switch (k) {
        case data::Tokenizer::PieceKind::normal:
            return 1;
        case data::Tokenizer::PieceKind::unknown:
            return 2;
        case data::Tokenizer::PieceKind::control:
            return 3;
        case data::Tokenizer::PieceKind::unused:
            return 5;
        case data::Tokenizer::PieceKind::byte:
            return 6;
    }
    return 1;
}

void set_tokenizer(GgufWriter& w, const data::Tokenizer& tok) {
    const int n = tok.vocab_size();
    std::vector<GgufValue> tokens, scores, types;
    tokens.reserve(n), scores.reserve(n), types.reserve(n);
    for (int id = 0; id < n; id++) {
        tokens.push_back(GgufValue::string(tok.piece(id)));
        scores.push_back(GgufValue::float32(tok.score(id)));
        GgufValue t;
        t.type = GgufType::i32;
        t.i = token_type(tok.kind(id));
        types.push_back(t);
    }
    w.set("tokenizer.ggml.model", GgufValue::string("llama"));
    w.set("tokenizer.ggml.tokens", GgufValue::array(GgufType::string, std::move(tokens)));
    w.set("tokenizer.ggml.scores", GgufValue::array(GgufType::f32, std::move(scores)));
    w.set("tokenizer.ggml.token_type", GgufValue::array(GgufType::i32, std::move(types)));
    w.set("tokenizer.ggml.bos_token_id", GgufValue::uint32(uint32_t(tok.bos_id())));
    w.set("tokenizer.ggml.eos_token_id", GgufValue::uint32(uint32_t(tok.eos_id())));
    w.set("tokenizer.ggml.unknown_token_id", GgufValue::uint32(uint32_t(tok.unk_id())));
    w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(true));
    w.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(false));
    // SentencePiece's add_dummy_prefix, seen in how it encodes one letter.
    const std::vector<int> a = tok.encode("a");
    const bool prefix = !a.empty() && tok.piece(a[0]).rfind("\xe2\x96\x81", 0) == 0;
    w.set("tokenizer.ggml.add_space_prefix", GgufValue::boolean(prefix));
}

}  // namespace

void permute_rotary_rows(const float* in, float* out, int64_t n_heads, int64_t head_dim,
                         int64_t cols) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < n_heads; h++)
        for (int64_t i = 0; i < 2; i++)
            for (int64_t j = 0; j < half; j++) {
                const float* src = in + (h * head_dim + i * half + j) * cols;
                std::copy(src, src + cols, out + (h * head_dim + 2 * j + i) * cols);
            }
}

void unpermute_rotary_rows(const float* in, float* out, int64_t n_heads, int64_t head_dim,
                           int64_t cols) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < n_heads; h++)
        for (int64_t i = 0; i < 2; i++)
            for (int64_t j = 0; j < half; j++) {
                const float* src = in + (h * head_dim + 2 * j + i) * cols;
                std::copy(src, src + cols, out + (h * head_dim + i * half + j) * cols);
            }
}

std::string data_fingerprint(const std::string& data_source) {
    if (data_source == "synthetic")
        return "synthetic";
    const std::string manifest = data_source + "/manifest.json";
    if (data_source.empty() || !fs::exists(manifest))
        return "";
    return fmt::format("xxh64:{:016x}", fs::xxh64_file(manifest));
}

GgufExportResult export_gguf(const std::string& checkpoint_dir, const std::string& out_path,
                             const GgufExportOptions& options) {
    const std::optional<GgmlType> dtype = ggml_type_from_name(options.dtype);
    if (!dtype)
        throw error("--dtype {} is not one of f32, f16, bf16, q8_0", options.dtype);
    fs::check_replaceable(out_path, options.force);
    if (options.tokenizer.empty())
        throw error(
            "{}: its run names no tokenizer (data.tokenizer in config.yaml), and a GGUF file "
            "must hold one; give --tokenizer MODEL",
            checkpoint_dir);
    checkpoint::Checkpoint ck(checkpoint_dir);
    const model::LlamaConfig& c = ck.config();
    data::Tokenizer tok(options.tokenizer);
    if (tok.vocab_size() != c.vocab_size)
        throw error("tokenizer {} has {} pieces but the checkpoint's model has {}",
                    options.tokenizer, tok.vocab_size(), c.vocab_size);

    GgufWriter w;
    w.set("general.architecture", GgufValue::string("llama"));
    w.set("general.name",
          GgufValue::string(options.name.empty()
                                ? fmt::format("kiln-{}-step{}", c.preset, ck.state().step)
                                : options.name));
    w.set("general.file_type", GgufValue::uint32(file_type(*dtype)));
    if (*dtype == GgmlType::q8_0)
        w.set("general.quantization_version", GgufValue::uint32(2));
    w.set("llama.context_length", GgufValue::uint32(uint32_t(c.max_seq_len)));
    w.set("llama.embedding_length", GgufValue::uint32(uint32_t(c.dim)));
    w.set("llama.block_count", GgufValue::uint32(uint32_t(c.n_layers)));
    w.set("llama.feed_forward_length", GgufValue::uint32(uint32_t(c.ffn_dim())));
    w.set("llama.attention.head_count", GgufValue::uint32(uint32_t(c.n_heads)));
    w.set("llama.attention.head_count_kv", GgufValue::uint32(uint32_t(c.n_kv_heads)));
    w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::float32(float(c.norm_eps)));
    w.set("llama.rope.freq_base", GgufValue::float32(float(c.rope_theta)));
    w.set("llama.rope.dimension_count", GgufValue::uint32(uint32_t(c.head_dim())));
    w.set("llama.vocab_size", GgufValue::uint32(uint32_t(c.vocab_size)));
    set_tokenizer(w, tok);
    w.set("kiln.training.step", GgufValue::uint64(uint64_t(ck.state().step)));
    w.set("kiln.training.loss", GgufValue::float32(float(ck.state().loss)));
    w.set("kiln.tokenizer.fingerprint", GgufValue::string(tok.identity()));
    if (!options.data_fingerprint.empty())
        w.set("kiln.data.fingerprint", GgufValue::string(options.data_fingerprint));

    // The whole model's layout names every tensor and its full shape; each one is gathered from
    // the checkpoint's shards, reordered if rotary, encoded and written before the next.
    const model::Layout whole(c);
    std::vector<GgmlType> types;
    for (const auto& p : whole.params()) {
        const int64_t cols = p.full_shape.back();
        GgmlType t = p.full_shape.size() == 1 ? GgmlType::f32 : *dtype;
        if (t == GgmlType::q8_0 && cols % kQ8Block != 0)
            t = GgmlType::f16;  // q8_0 needs rows of whole 32-value blocks
        std::vector<int64_t> dims(p.full_shape.rbegin(), p.full_shape.rend());  // ggml order
        w.add_tensor(target_of(p.name, c).name, dims, t);
        types.push_back(t);
    }
    w.open(out_path);
    std::vector<float> full, reordered;
    std::vector<uint8_t> encoded;
    for (size_t k = 0; k < whole.params().size(); k++) {
        const model::ParamInfo& p = whole.params()[k];
        const Target target = target_of(p.name, c);
        full.resize(size_t(p.numel));
        ck.read_tensor(p, full.data());
        const float* values = full.data();
        if (target.rotary_heads > 0) {
            reordered.resize(full.size());
            permute_rotary_rows(full.data(), reordered.data(), target.rotary_heads, c.head_dim(),
                                p.full_shape[1]);
            values = reordered.data();
        }
        encoded.resize(size_t(ggml_bytes(types[k], p.numel)));
        encode_values(types[k], values, p.numel, encoded.data());
        w.write_tensor(target.name, encoded.data(), encoded.size());
    }
    GgufExportResult result;
    result.step = ck.state().step;
    result.bytes = w.commit();
    return result;
}

std::string describe(const GgufFile& f) {
    std::string out = fmt::format("{}: GGUF version {}, {} bytes, alignment {}, data at {}\n",
                                  f.path(), f.version(), f.size(), f.alignment(), f.data_offset());
    out += fmt::format("metadata ({} keys):\n", f.metadata().size());
    for (const auto& [key, value] : f.metadata())
        out += fmt::format("  {} = {}\n", key, value.to_string());
    out += fmt::format("tensors ({}):\n", f.tensors().size());
    out += fmt::format("  {:<28} {:<5} {:<20} {:>12} {:>12}\n", "name", "type", "dims", "offset",
                       "bytes");
    uint64_t total = 0;
    for (const auto& t : f.tensors()) {
        out += fmt::format("  {:<28} {:<5} {:<20} {:>12} {:>12}\n", t.name, ggml_type_name(t.type),
                           fmt::format("{}", fmt::join(t.dims, " x ")), t.offset, t.bytes);
        total += t.bytes;
    }
    out += fmt::format(
        "ok: every tensor aligned, sized by its type and dims, inside the file; {} "
        "bytes of tensor data\n",
        total);
    return out;
}

}  // namespace kiln::exporter
