#include "data/build.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <thread>

#include "core/config.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/threads.h"
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
    s.add("data.batch_bytes", &c.batch_bytes,
          "text read ahead of the packer, at most (kiln data's memory bound)",
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

    void add(const std::vector<uint32_t>& tokens) {
        const size_t full = size_t(rows_per_shard_) * seq_len_;
        for (size_t i = 0; i < tokens.size();) {
            size_t n = std::min(tokens.size() - i, full - buffer_.size());
            buffer_.insert(buffer_.end(), tokens.begin() + std::ptrdiff_t(i),
                           tokens.begin() + std::ptrdiff_t(i + n));
            i += n;
            if (buffer_.size() == full)
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

// Text for one encoder: documents and parts of documents back to back, and the tokens they
// become (BOS + ids + EOS per document).
struct Work {
    struct Segment {
        size_t begin, end;  // in text
        bool first, last;   // starts, ends its document
    };
    std::string text;
    std::vector<Segment> segments;
    std::vector<uint32_t> tokens;
    int64_t read_bytes = 0;  // corpus bytes read when this work was complete
    int64_t documents = 0;   // documents that start here
    bool encoded = false;
};

// The reader, the encoders and the packer overlap. A reader thread cuts the corpus into Work of
// about work_bytes: a document longer than segment_bytes goes to the encoder in segments cut
// just before a '\n' (where the tokenizer allows it: ids do not change), so one large document
// keeps every encoder busy. Encoder threads tokenize; the caller takes the Work back in corpus
// order, so the output does not depend on the thread count. At most `ahead_limit` bytes of text
// (or one Work, when a line or an uncut document is longer) are read and not yet taken, which
// bounds memory on corpora of any size.
class Pipeline {
public:
    Pipeline(Corpus& reader, const Tokenizer& tokenizer, bool add_eos, int64_t ahead_limit,
             int encoders)
        : reader_(reader),
          tokenizer_(tokenizer),
          add_eos_(add_eos),
          ahead_limit_(ahead_limit),
          work_bytes_(size_t(std::clamp<int64_t>(ahead_limit / (4 * encoders), 1, 256 << 10))),
          part_bytes_(size_t(std::clamp<int64_t>(ahead_limit / 4, 1, 1 << 20))) {
        reader_thread_ = std::thread([this] { guarded([this] { read(); }); });
        for (int i = 0; i < encoders; i++)
            encoders_.emplace_back([this] { guarded([this] { encode(); }); });
    }
    ~Pipeline() {
        {
            std::lock_guard<std::mutex> lock(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        reader_thread_.join();
        for (auto& t : encoders_)
            t.join();
    }
    // The next Work in corpus order, encoded; null at the end. Rethrows a thread's error.
    std::unique_ptr<Work> next() {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] {
            return error_ || (!queue_.empty() && queue_.front()->encoded) ||
                   (read_all_ && queue_.empty());
        });
        if (error_)
            std::rethrow_exception(error_);
        if (queue_.empty())
            return nullptr;
        std::unique_ptr<Work> w = std::move(queue_.front());
        queue_.pop_front();
        ahead_ -= int64_t(w->text.size());
        lock.unlock();
        cv_.notify_all();
        return w;
    }

    // Text handed to the encoder at once. SentencePiece's BPE slows down as the text grows: on
    // English books, a line (or 64 bytes) at a time encodes 600K tokens/s per thread, 4 KB
    // 510K, 16 KB 450K, a whole 4.4 MB book 124K.
    static constexpr size_t segment_bytes = 64;

private:
    struct Stopped {};

    template <typename Fn>
    void guarded(Fn&& fn) {
        try {
            fn();
        } catch (const Stopped&) {
        } catch (...) {
            std::lock_guard<std::mutex> lock(mu_);
            if (!error_)
                error_ = std::current_exception();
            stop_ = true;
            cv_.notify_all();
        }
    }

    void read() {
        const bool split = tokenizer_.splits_at_newlines();
        work_ = std::make_unique<Work>();
        std::string part, whole;
        bool first = true, last = true;
        while (reader_.next_part(part, first, last, part_bytes_)) {
            if (!split) {  // no safe cut: documents go whole, however large
                if (!(first && last)) {
                    if (first)
                        whole.clear();
                    whole += part;
                    if (!last)
                        continue;
                    part = std::move(whole);
                }
                add(part, true, true);
                continue;
            }
            for (size_t begin = 0; begin < part.size();) {
                size_t end = part.size();
                if (end - begin > segment_bytes)
                    end = std::min(end, part.find('\n', begin + segment_bytes));
                add(std::string_view(part).substr(begin, end - begin), first && begin == 0,
                    last && end == part.size());
                begin = end;
            }
        }
        if (!work_->segments.empty())
            push();
        {
            std::lock_guard<std::mutex> lock(mu_);
            read_all_ = true;
        }
        cv_.notify_all();
    }

    void add(std::string_view text, bool first, bool last) {
        size_t begin = work_->text.size();
        work_->text.append(text);
        work_->segments.push_back({begin, work_->text.size(), first, last});
        work_->documents += first ? 1 : 0;
        if (work_->text.size() >= work_bytes_)
            push();
    }

    void push() {
        work_->read_bytes = reader_.bytes_read();
        int64_t size = int64_t(work_->text.size());
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || ahead_ < ahead_limit_; });
        if (stop_)
            throw Stopped{};
        ahead_ += size;
        todo_.push_back(work_.get());
        queue_.push_back(std::move(work_));
        lock.unlock();
        cv_.notify_all();
        work_ = std::make_unique<Work>();
    }

    void encode() {
        const uint32_t bos = uint32_t(tokenizer_.bos_id()), eos = uint32_t(tokenizer_.eos_id());
        while (true) {
            Work* w = nullptr;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [&] { return stop_ || !todo_.empty() || read_all_; });
                if (stop_ || todo_.empty())
                    return;
                w = todo_.front();
                todo_.pop_front();
            }
            for (const Work::Segment& s : w->segments) {
                std::string_view text(w->text.data() + s.begin, s.end - s.begin);
                if (s.first)
                    w->tokens.push_back(bos);
                for (int id : tokenizer_.encode_part(text, s.first))
                    w->tokens.push_back(uint32_t(id));
                if (s.last && add_eos_)
                    w->tokens.push_back(eos);
            }
            {
                std::lock_guard<std::mutex> lock(mu_);
                w->encoded = true;
            }
            cv_.notify_all();
        }
    }

    Corpus& reader_;
    const Tokenizer& tokenizer_;
    const bool add_eos_;
    const int64_t ahead_limit_;
    const size_t work_bytes_;
    const size_t part_bytes_;     // of a large .txt document, read at once
    std::unique_ptr<Work> work_;  // being filled by the reader

    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::unique_ptr<Work>> queue_;  // read and not yet taken, in corpus order
    std::deque<Work*> todo_;                   // not yet encoded
    int64_t ahead_ = 0;                        // text bytes in queue_
    bool read_all_ = false, stop_ = false;
    std::exception_ptr error_;
    std::thread reader_thread_;
    std::vector<std::thread> encoders_;
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
    const int64_t total_bytes = corpus_bytes(files);
    int64_t documents = 0;
    {
        Pipeline pipeline(reader, tokenizer, config.add_eos, config.batch_bytes,
                          std::max(1, num_threads()));
        auto start = std::chrono::steady_clock::now();
        while (std::unique_ptr<Work> w = pipeline.next()) {
            packer.add(w->tokens);
            result.tokens += int64_t(w->tokens.size());
            documents += w->documents;
            double rate = double(result.tokens) / std::max(seconds_since(start), 1e-9);
            progress.update(w->read_bytes,
                            fmt::format("{:.1f} of {:.1f} MB, {} docs, {} tokens, {} tokens/s",
                                        double(w->read_bytes) / 1e6, double(total_bytes) / 1e6,
                                        human_count(double(documents)),
                                        human_count(double(result.tokens)), human_count(rate)));
        }
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
    bool first = true, last = true;  // parts cut before a '\n' split no line
    while (written < max_bytes && reader.next_part(text, first, last, 1 << 20)) {
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
