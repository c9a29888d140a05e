#include "data/build.h"

#include <filesystem>
#include <fstream>

#include "core/config.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/tokenizer.h"

namespace kiln::data {
namespace stdfs = std::filesystem;

CorpusOptions DataConfig::corpus_options() const {
    CorpusOptions o;
    o.text_field = text_field;
    o.skip_bad_lines = skip_bad_lines;
    o.max_line_bytes = max_line_bytes;
    o.seed = static_cast<uint64_t>(seed);
    return o;
}

void register_keys(ConfigSchema& s, DataConfig& c) {
    s.add("data.source", &c.source,
          "training input: a shard folder made by `kiln data`, or synthetic");
    s.add("data.tokenizer", &c.tokenizer,
          "the run's tokenizer.model; when set, a shard folder made with another is refused");
    s.add("data.verify", &c.verify,
          "check every shard's checksum before training (reads the data set once)");
    s.add("data.seq_len", &c.seq_len, "tokens per stored sequence (kiln data)",
          check::at_least(&c.seq_len, 2));
    s.add("data.add_eos", &c.add_eos, "end every document with EOS (BOS always starts one)");
    s.add("data.tail", &c.tail, "drop | pad: the last sequence shorter than seq_len",
          check::one_of(&c.tail, {"drop", "pad"}));
    s.add("data.shard_tokens", &c.shard_tokens, "target tokens per shard file",
          check::positive(&c.shard_tokens));
    s.add("data.text_field", &c.text_field, "jsonl key holding a document's text");
    s.add("data.skip_bad_lines", &c.skip_bad_lines,
          "skip (and count) malformed jsonl lines instead of stopping");
    s.add("data.max_line_bytes", &c.max_line_bytes, "longest jsonl line accepted",
          check::positive(&c.max_line_bytes));
    s.add("data.seed", &c.seed, "seed of the built-in corpora");
    s.add("data.batch_bytes", &c.batch_bytes, "text tokenized per parallel batch",
          check::positive(&c.batch_bytes));
}

namespace {

// Accumulates the token stream into rows and rows into shards.
class Packer {
public:
    Packer(const std::string& dir, uint32_t seq_len, uint32_t token_bytes, int64_t shard_tokens)
        : dir_(dir),
          seq_len_(seq_len),
          token_bytes_(token_bytes),
          rows_per_shard_(std::max<int64_t>(1, shard_tokens / seq_len)) {}

    void add(const std::vector<int>& ids) {
        for (int id : ids) {
            buffer_.push_back(static_cast<uint32_t>(id));
            if (int64_t(buffer_.size()) == rows_per_shard_ * seq_len_)
                flush();
        }
    }
    // Pads or drops the short tail, writes the last shard; returns the manifest's shard list.
    std::vector<ShardEntry> finish(bool pad, uint32_t pad_id, uint64_t& dropped) {
        size_t partial = buffer_.size() % seq_len_;
        if (partial != 0) {
            if (pad) {
                buffer_.resize(buffer_.size() + (seq_len_ - partial), pad_id);
            } else {
                dropped = partial;
                buffer_.resize(buffer_.size() - partial);
            }
        }
        if (!buffer_.empty())
            flush();
        return std::move(shards_);
    }

private:
    void flush() {
        std::string name = fmt::format("shard-{:05d}.bin", shards_.size());
        uint64_t sum = write_shard(dir_ + "/" + name, buffer_, seq_len_, token_bytes_);
        shards_.push_back({name, buffer_.size() / seq_len_, sum});
        buffer_.clear();
    }
    std::string dir_;
    uint32_t seq_len_, token_bytes_;
    int64_t rows_per_shard_;
    std::vector<uint32_t> buffer_;
    std::vector<ShardEntry> shards_;
};

bool same_recipe(const Manifest& m, const Manifest& want) {
    return m.seq_len == want.seq_len && m.vocab_size == want.vocab_size &&
           m.tokenizer == want.tokenizer && m.sources == want.sources &&
           m.add_eos == want.add_eos && m.tail == want.tail;
}

}  // namespace

BuildResult build_dataset(const std::vector<std::string>& corpus, const Tokenizer& tokenizer,
                          const std::string& out_dir, const DataConfig& config, bool force) {
    const std::vector<std::string> files = expand_corpus(corpus);
    Manifest recipe;
    recipe.seq_len = static_cast<uint32_t>(config.seq_len);
    recipe.vocab_size = tokenizer.vocab_size();
    recipe.token_bytes = recipe.vocab_size <= 65535 ? 2 : 4;
    recipe.tokenizer = tokenizer.identity();
    recipe.sources = files;
    recipe.add_eos = config.add_eos;
    recipe.tail = config.tail;

    BuildResult result;
    const std::string manifest_path = out_dir + "/manifest.json";
    if (fs::exists(manifest_path) && !force) {
        Manifest old = read_manifest(out_dir);
        if (!same_recipe(old, recipe)) {
            throw error(
                "{} already holds a data set made from other inputs or settings; use "
                "another --out, or --force to replace it",
                out_dir);
        }
        verify_dataset(out_dir);
        result.manifest = old;
        result.reused = true;
        return result;
    }
    fs::make_dirs(out_dir);
    // The folder stops being a data set before any shard changes, and stale shards go.
    stdfs::remove(manifest_path);
    for (const auto& e : stdfs::directory_iterator(out_dir)) {
        std::string name = e.path().filename().string();
        if (name.rfind("shard-", 0) == 0)
            stdfs::remove(e.path());
    }

    Corpus reader(files, config.corpus_options());
    Packer packer(out_dir, recipe.seq_len, recipe.token_bytes, config.shard_tokens);
    Progress progress("data", corpus_bytes(files));
    const int bos = tokenizer.bos_id(), eos = tokenizer.eos_id();
    if (bos < 0 || (config.add_eos && eos < 0)) {
        throw error("tokenizer has no {} token, which packing needs", bos < 0 ? "BOS" : "EOS");
    }
    std::vector<std::string> batch;
    std::vector<std::vector<int>> encoded;
    bool more = true;
    while (more) {
        batch.clear();
        int64_t bytes = 0;
        std::string text;
        while (bytes < config.batch_bytes && (more = reader.next(text))) {
            bytes += int64_t(text.size());
            batch.push_back(std::move(text));
        }
        encoded.assign(batch.size(), {});
#pragma omp parallel for schedule(dynamic, 1)
        for (size_t i = 0; i < batch.size(); i++) {
            std::vector<int> ids = tokenizer.encode(batch[i]);
            ids.insert(ids.begin(), bos);
            if (config.add_eos)
                ids.push_back(eos);
            encoded[i] = std::move(ids);
        }
        for (const auto& ids : encoded) {
            packer.add(ids);
            result.tokens += int64_t(ids.size());
        }
        progress.update(reader.bytes_read(),
                        fmt::format("{} docs, {} tokens", human_count(reader.stats().documents),
                                    human_count(double(result.tokens))));
    }
    recipe.shards =
        packer.finish(config.tail == "pad", static_cast<uint32_t>(eos), recipe.dropped_tokens);
    result.stats = reader.stats();
    if (recipe.shards.empty()) {
        throw error("the corpus yields {} tokens, fewer than one sequence of data.seq_len={}",
                    result.tokens, config.seq_len);
    }
    write_manifest(out_dir, recipe);
    progress.finish(fmt::format(
        "{} docs, {} tokens -> {} sequences of {} in {} shards ({} tokens dropped, {} invalid "
        "UTF-8 replaced, {} bad lines skipped)",
        result.stats.documents, result.tokens, recipe.sequences(), recipe.seq_len,
        recipe.shards.size(), recipe.dropped_tokens, result.stats.replaced_utf8,
        result.stats.bad_lines));
    result.manifest = recipe;
    return result;
}

int64_t write_training_lines(const std::vector<std::string>& corpus, const DataConfig& config,
                             const std::string& path, int64_t max_bytes) {
    Corpus reader(expand_corpus(corpus), config.corpus_options());
    std::ofstream out(path, std::ios::binary);
    if (!out)
        throw error("cannot write {}", path);
    int64_t written = 0;
    std::string text;
    while (written < max_bytes && reader.next(text)) {
        size_t start = 0;
        while (start < text.size()) {
            size_t nl = text.find('\n', start);
            size_t end = nl == std::string::npos ? text.size() : nl;
            if (end > start && text.find_first_not_of(" \t\r", start) < end) {
                out.write(text.data() + start, std::streamsize(end - start));
                out.put('\n');
                written += int64_t(end - start + 1);
            }
            start = end + 1;
        }
    }
    if (written == 0)
        throw error("the corpus has no text to train a tokenizer on");
    return written;
}

Manifest verify_dataset(const std::string& dir) {
    Manifest m = read_manifest(dir);
    ShardSet set(dir, m.vocab_size);
    set.verify();
    std::vector<int32_t> row(set.seq_len());
    for (int64_t r = 0; r < set.rows(); r++)
        set.read_row(r, row.data());  // token range
    return m;
}

}  // namespace kiln::data
