// Corpus readers, the tokenizer, packing and the loader, on data the tests make; plus the real
// Llama-2 tokenizer against spm_encode when ../shared/data is present.
#include <gtest/gtest.h>
#include <omp.h>
#include <sys/stat.h>
#include <zlib.h>
#include <zstd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "data/build.h"
#include "data/corpus.h"
#include "data/sampler.h"
#include "data/tokenizer.h"
#include "fixture.h"

namespace kiln::data {
namespace {

using kiln::testing::TempDir;

void write(const std::string& path, const std::string& bytes) {
    std::ofstream(path, std::ios::binary) << bytes;
}

void write_gz(const std::string& path, const std::string& bytes) {
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, bytes.data(), unsigned(bytes.size()));
    gzclose(f);
}

void write_zst(const std::string& path, const std::string& bytes) {
    std::string out(ZSTD_compressBound(bytes.size()), '\0');
    out.resize(ZSTD_compress(out.data(), out.size(), bytes.data(), bytes.size(), 3));
    write(path, out);
}

std::vector<std::string> read_all(const std::vector<std::string>& paths, CorpusOptions o = {},
                                  CorpusStats* stats = nullptr) {
    Corpus c(expand_corpus(paths), o);
    std::vector<std::string> docs;
    std::string t;
    while (c.next(t))
        docs.push_back(t);
    if (stats)
        *stats = c.stats();
    return docs;
}

using kiln::testing::message_of;

TEST(Corpus, FormatsFoldersAndOrder) {
    TempDir dir;
    std::filesystem::create_directories(dir / "c/sub");
    write(dir / "c/b.txt", "second file\nstill the same document");
    write(dir / "c/a.jsonl", "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 3}\n");
    write_gz(dir / "c/sub/c.jsonl.gz", "{\"text\": \"three\"}\n{\"text\": \"four\"}");
    write_zst(dir / "c/sub/d.txt.zst", "five");
    write(dir / "c/ignored.csv", "x");
    auto docs = read_all({dir / "c"});
    EXPECT_EQ(docs, (std::vector<std::string>{"one", "two", "second file\nstill the same document",
                                              "three", "four", "five"}));
    EXPECT_EQ(read_all({dir / "c/sub/*.jsonl.gz"}), (std::vector<std::string>{"three", "four"}));
    CorpusOptions o;
    o.text_field = "content";
    write(dir / "x.jsonl", "{\"content\": \"six\"}\n");
    EXPECT_EQ(read_all({dir / "x.jsonl"}, o), std::vector<std::string>{"six"});
    EXPECT_NE(message_of([&] { expand_corpus({dir / "nothing*.txt"}); }).find("matches no"),
              std::string::npos);
}

TEST(Corpus, BadInputIsNamedOrCounted) {
    TempDir dir;
    write(dir / "bad.jsonl",
          "{\"text\": \"ok\"}\n{\"text\": broken\n{\"other\": 1}\n{\"text\": \"end\"}\n");
    std::string m = message_of([&] { read_all({dir / "bad.jsonl"}); });
    EXPECT_NE(m.find("bad.jsonl:2: line is not valid JSON"), std::string::npos) << m;
    CorpusOptions skip;
    skip.skip_bad_lines = true;
    CorpusStats stats;
    EXPECT_EQ(read_all({dir / "bad.jsonl"}, skip, &stats), (std::vector<std::string>{"ok", "end"}));
    EXPECT_EQ(stats.bad_lines, 2);
    write(dir / "field.jsonl", "{\"body\": \"x\"}\n");
    m = message_of([&] { read_all({dir / "field.jsonl"}); });
    EXPECT_NE(m.find("field.jsonl:1: line has no string field 'text'"), std::string::npos) << m;
    // Invalid UTF-8 is replaced and counted, in .txt and inside JSON strings.
    write(dir / "u.txt", std::string("caf\xC3\xA9 \xFF\xFE ok \xE2\x82", 14));
    write(dir / "u.jsonl", std::string("{\"text\": \"a\xC0\xAF b\"}\n"));
    auto docs = read_all({dir / "u.txt", dir / "u.jsonl"}, {}, &stats);
    EXPECT_EQ(docs[0], "caf\xC3\xA9 \xEF\xBF\xBD\xEF\xBF\xBD ok \xEF\xBF\xBD");
    EXPECT_EQ(docs[1], "a\xEF\xBF\xBD b");  // a bad lead byte and its continuation: one
    EXPECT_EQ(stats.replaced_utf8, 4);
    // Empty files are skipped and counted; an over-long line names its file and line.
    write(dir / "empty.txt", "");
    EXPECT_TRUE(read_all({dir / "empty.txt"}, {}, &stats).empty());
    EXPECT_EQ(stats.empty_documents, 1);
    write(dir / "long.jsonl",
          "{\"text\": \"a\"}\n{\"text\": \"" + std::string(5000, 'x') + "\"}\n");
    CorpusOptions small;
    small.max_line_bytes = 1000;
    m = message_of([&] { read_all({dir / "long.jsonl"}, small); });
    EXPECT_NE(m.find("long.jsonl:2: line is longer than data.max_line_bytes=1000"),
              std::string::npos)
        << m;
    write(dir / "trunc.jsonl.zst", "not zstd at all");
    EXPECT_NE(message_of([&] { read_all({dir / "trunc.jsonl.zst"}); }).find("not valid zstd"),
              std::string::npos);
}

// zlib reads a cut .gz as far as it goes and anything without the gzip magic as plain bytes:
// both must end the read with a sentence naming the file, never a quiet prefix or garbage.
TEST(Corpus, TruncatedOrFakeGzipIsRefused) {
    TempDir dir;
    std::string text;
    for (int i = 0; i < 400; i++)
        text += builtin_story(3, i) + "\n";
    write_gz(dir / "whole.txt.gz", text);
    const std::string gz = fs::read_file(dir / "whole.txt.gz");
    ASSERT_GT(gz.size(), 4000u);
    EXPECT_EQ(read_all({dir / "whole.txt.gz"}), std::vector<std::string>{text});
    write(dir / "cut.txt.gz", gz.substr(0, gz.size() / 8));
    std::string m = message_of([&] { read_all({dir / "cut.txt.gz"}); });
    EXPECT_NE(m.find("cut.txt.gz is truncated gzip data"), std::string::npos) << m;
    write(dir / "trailer.txt.gz", gz.substr(0, gz.size() - 4));  // the length field gone
    m = message_of([&] { read_all({dir / "trailer.txt.gz"}); });
    EXPECT_NE(m.find("trailer.txt.gz is truncated gzip data"), std::string::npos) << m;
    std::string lines;
    for (int i = 0; i < 400; i++)
        lines += nlohmann::json({{"text", builtin_story(4, i)}}).dump() + "\n";
    write_gz(dir / "lines.jsonl.gz", lines);
    const std::string gz_lines = fs::read_file(dir / "lines.jsonl.gz");
    write(dir / "cut.jsonl.gz", gz_lines.substr(0, gz_lines.size() / 2));
    m = message_of([&] { read_all({dir / "cut.jsonl.gz"}); });
    EXPECT_NE(m.find("cut.jsonl.gz is truncated gzip data"), std::string::npos) << m;
    std::mt19937 rng(7);
    std::string noise(5000, '\0');
    for (char& c : noise)
        c = char(rng());
    noise[0] = 'x';  // never the magic by chance
    write(dir / "x.txt.gz", noise);
    m = message_of([&] { read_all({dir / "x.txt.gz"}); });
    EXPECT_NE(m.find("x.txt.gz is not valid gzip"), std::string::npos) << m;
    write(dir / "plain.txt.gz", "plain text, never compressed\n");
    m = message_of([&] { read_all({dir / "plain.txt.gz"}); });
    EXPECT_NE(m.find("plain.txt.gz is not valid gzip"), std::string::npos) << m;
    write(dir / "empty.txt.gz", "");
    m = message_of([&] { read_all({dir / "empty.txt.gz"}); });
    EXPECT_NE(m.find("empty.txt.gz is not valid gzip"), std::string::npos) << m;
}

// A folder given as the tokenizer is named as such, not as a stream error without a path.
TEST(Corpus, TokenizerThatIsAFolderIsNamed) {
    TempDir dir;
    std::string m = message_of([&] { Tokenizer t(dir.path); });
    EXPECT_NE(m.find("tokenizer " + dir.path + " is a folder, not a tokenizer model"),
              std::string::npos)
        << m;
    ASSERT_EQ(::mkfifo((dir / "fifo.model").c_str(), 0644), 0);
    m = message_of([&] { Tokenizer t(dir / "fifo.model"); });  // refused, not waited on
    EXPECT_NE(m.find("fifo.model is not a regular file"), std::string::npos) << m;
}

TEST(Corpus, BuiltinStoriesAreDeterministic) {
    EXPECT_EQ(builtin_story(1, 42), builtin_story(1, 42));
    EXPECT_NE(builtin_story(1, 42), builtin_story(2, 42));
    auto docs = read_all({"builtin:stories:10"});
    EXPECT_EQ(docs.size(), 10u);
    EXPECT_EQ(docs[3], builtin_story(1, 3));
    EXPECT_THROW(read_all({"builtin:novels"}), Error);
}

// A tokenizer trained once for the tests below.
class Trained : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        dir_ = new TempDir;
        DataConfig c;
        std::string lines = *dir_ / "lines.txt";
        write_training_lines({"builtin:stories:3000"}, c, lines, 1 << 30);
        train_tokenizer(lines, *dir_ / "t.model", {400, 2});
    }
    static void TearDownTestSuite() { delete dir_; }
    static std::string model() { return *dir_ / "t.model"; }
    static TempDir* dir_;
};
TempDir* Trained::dir_ = nullptr;

TEST_F(Trained, Llama2StyleTokenizer) {
    Tokenizer t(model());
    EXPECT_EQ(t.vocab_size(), 400);
    EXPECT_EQ(t.bos_id(), 1);
    EXPECT_EQ(t.eos_id(), 2);
    // Byte fallback: text never seen in training round-trips; digits are split.
    std::string text = "Lily found 2024 apples, ünïcode ✓.";
    EXPECT_EQ(t.decode(t.encode(text)), text);
    auto ids = t.encode("12");
    EXPECT_EQ(ids.size(), 3u);  // "▁", "1", "2"
    EXPECT_THROW(t.decode({400}), Error);
    EXPECT_THROW(Tokenizer("/nonexistent.model"), Error);
}

TEST_F(Trained, PackingSemanticsAndThreadIndependence) {
    Tokenizer t(model());
    TempDir out;
    DataConfig c;
    c.seq_len = 64;
    c.shard_tokens = 64 * 50;  // several shards
    std::vector<std::string> corpus = {"builtin:stories:400"};
    BuildResult a = build_dataset(corpus, t, out / "a", c, false);
    // Expected stream: per document BOS + ids + EOS, concatenated, cut into rows of 64.
    std::vector<uint32_t> stream;
    Corpus reader(expand_corpus(corpus), c.corpus_options());
    std::string doc;
    while (reader.next(doc)) {
        stream.push_back(1);
        for (int id : t.encode(doc))
            stream.push_back(uint32_t(id));
        stream.push_back(2);
    }
    ASSERT_EQ(a.manifest.sequences(), stream.size() / 64);
    EXPECT_EQ(a.manifest.dropped_tokens, stream.size() % 64);
    EXPECT_GT(a.manifest.shards.size(), 2u);
    ShardSet set(out / "a", 400);
    std::vector<int32_t> row(64);
    for (int64_t r = 0; r < set.rows(); r += 17) {
        set.read_row(r, row.data());
        for (int i = 0; i < 64; i++)
            ASSERT_EQ(uint32_t(row[i]), stream[r * 64 + i]) << r;
    }
    // Same bytes with one thread as with two; pad keeps the tail.
    omp_set_num_threads(1);
    BuildResult b = build_dataset(corpus, t, out / "b", c, false);
    omp_set_num_threads(2);
    for (size_t s = 0; s < a.manifest.shards.size(); s++) {
        EXPECT_EQ(a.manifest.shards[s].xxh64, b.manifest.shards[s].xxh64);
    }
    c.tail = "pad";
    BuildResult p = build_dataset(corpus, t, out / "p", c, false);
    EXPECT_EQ(p.manifest.sequences(), (stream.size() + 63) / 64);
    EXPECT_EQ(p.manifest.dropped_tokens, 0u);
}

TEST_F(Trained, RebuildReusesRefusesAndNeverLies) {
    Tokenizer t(model());
    TempDir out;
    DataConfig c;
    c.seq_len = 32;
    std::vector<std::string> corpus = {"builtin:stories:200"};
    build_dataset(corpus, t, out / "d", c, false);
    EXPECT_TRUE(build_dataset(corpus, t, out / "d", c, false).reused);
    c.seq_len = 48;
    EXPECT_NE(message_of([&] {
                  build_dataset(corpus, t, out / "d", c, false);
              }).find("already holds a data set made from other inputs"),
              std::string::npos);
    EXPECT_EQ(read_manifest(out / "d").seq_len, 32u);  // untouched
    BuildResult forced = build_dataset(corpus, t, out / "d", c, true);
    EXPECT_EQ(read_manifest(out / "d").seq_len, 48u);
    EXPECT_FALSE(forced.reused);
    // A tampered shard is named by verify.
    {
        std::fstream f(out / "d/shard-00000.bin", std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(100);
        f.put(char(7));
    }
    EXPECT_NE(message_of([&] { verify_dataset(out / "d"); }).find("shard-00000.bin: checksum"),
              std::string::npos);
    // A corpus too small for one sequence is an error, and leaves no manifest.
    c.seq_len = 100000;
    EXPECT_THROW(build_dataset(corpus, t, out / "e", c, false), Error);
    EXPECT_FALSE(fs::exists(out / "e/manifest.json"));
}

// The real Llama-2 tokenizer gives exactly spm_encode's ids on real English text.
TEST(RealData, Llama2TokenizerMatchesSpmEncode) {
    std::string shared = kiln::testing::source_dir() + "/../shared/data";
    std::string model = shared + "/llama2-tokenizer.model";
    if (!fs::exists(model))
        GTEST_SKIP() << "shared data not present";
    if (kiln::testing::run("command -v spm_encode >/dev/null") != 0)
        GTEST_SKIP() << "no spm_encode";
    TempDir dir;
    // 400 lines of Shakespeare and of WikiText.
    std::string cmd = "(head -n 200 " + shared + "/tinyshakespeare.txt; head -n 200 " + shared +
                      "/wikitext-2/test.txt) > " + (dir / "in.txt") + " && spm_encode --model " +
                      model + " --output_format=id < " + (dir / "in.txt") + " > " +
                      (dir / "ids.txt");
    ASSERT_EQ(kiln::testing::run(cmd), 0);
    Tokenizer t(model);
    EXPECT_EQ(t.vocab_size(), 32000);
    std::ifstream text(dir / "in.txt"), ids(dir / "ids.txt");
    std::string line, want;
    int lines = 0;
    while (std::getline(text, line) && std::getline(ids, want)) {
        std::string got;
        for (int id : t.encode(line))
            got += (got.empty() ? "" : " ") + std::to_string(id);
        ASSERT_EQ(got, want) << "line " << lines << ": " << line;
        lines++;
    }
    EXPECT_EQ(lines, 400);
}

// Large documents are encoded in parts cut just before a '\n'. The ids must be those of the
// whole document: encode_part at every cut, or at any subset of them, gives encode(text).
std::vector<int> encode_cut(const Tokenizer& t, std::string_view text, size_t every) {
    std::vector<int> ids;
    size_t begin = 0, newlines = 0;
    while (begin < text.size()) {
        size_t end = begin;
        while (true) {
            end = text.find('\n', end + 1);
            if (end == std::string_view::npos || ++newlines % every == 0)
                break;
        }
        end = std::min(end, text.size());
        std::vector<int> part = t.encode_part(text.substr(begin, end - begin), begin == 0);
        ids.insert(ids.end(), part.begin(), part.end());
        begin = end;
    }
    return ids;
}

// `sp` encodes with SentencePiece, `own` with kiln's encoder: both give SentencePiece's ids for
// the whole text, and for the text cut at newlines.
void expect_cuts_keep_ids(const Tokenizer& sp, const Tokenizer& own, const std::string& text,
                          const std::string& what) {
    const std::vector<int> whole = sp.encode(text);
    ASSERT_TRUE(own.encode(text) == whole) << what << ", kiln's encoder";
    for (size_t every : {1, 2, 7}) {
        for (const Tokenizer* t : {&sp, &own}) {
            std::vector<int> cut = encode_cut(*t, text, every);
            ASSERT_EQ(cut.size(), whole.size()) << what << ", a cut at every " << every;
            ASSERT_TRUE(cut == whole) << what << ", a cut at every " << every << " newlines";
        }
    }
}

void use_own(Tokenizer& t) {
    EXPECT_TRUE(t.use_encoder(Tokenizer::Encoder::kiln));
}

// Text shapes that stress the cut: what the corpus reader repairs (invalid UTF-8) is tested raw.
std::vector<std::pair<std::string, std::string>> awkward_texts() {
    std::mt19937_64 rng(7);
    const std::vector<std::string> atoms = {
        "the",  "Lily", " ",    "  ",   "\t", "\n",   "\n\n", "\r\n", " \n",           "\n ",
        "ünï",  "✓",    "日本", "😀",    "12", "2024", ",",    ".",    "\xff",          "\xe2\x96",
        "\xc3", "▁",    "<s>",  "\x01", "--", "  \n", "a",    "\n\t", "\xe2\x96\x81\n"};
    auto random_text = [&](size_t n) {
        std::string s;
        while (s.size() < n)
            s += atoms[rng() % atoms.size()];
        return s;
    };
    std::vector<std::pair<std::string, std::string>> texts;
    texts.push_back({"random atoms", random_text(20000)});
    std::string valid = random_text(20000);  // without invalid UTF-8, which SentencePiece encodes
    repair_utf8(valid);
    texts.push_back({"random valid atoms", valid});
    std::string edges = "\n\nLily\n \n";
    edges += random_text(300);
    edges += "\n\n";
    texts.push_back({"leading and trailing newlines", edges});
    texts.push_back({"only newlines", "\n\n\n\n"});
    texts.push_back({"a newline", "\n"});
    texts.push_back({"one word", "word"});
    std::string words;
    for (int i = 0; i < 4000; i++)
        words += builtin_story(3, i % 50).substr(0, 10 + i % 30) + (i % 3 ? " " : "");
    texts.push_back({"a long line", words});
    std::string crlf, tabs;
    for (int i = 0; i < 300; i++) {
        crlf += builtin_story(1, i) + "\r\n";
        tabs += '\t';
        tabs += builtin_story(2, i);
        tabs += "\t\n\t";
    }
    texts.push_back({"CRLF lines", crlf});
    texts.push_back({"tabs", tabs});
    texts.push_back({"long lines", words + "\n" + words + "\n\n" + words});
    return texts;
}

TEST_F(Trained, CutsAtNewlinesKeepTheIds) {
    Tokenizer t(model()), own(model());
    use_own(own);
    ASSERT_TRUE(t.splits_at_newlines());
    for (const auto& [what, text] : awkward_texts())
        expect_cuts_keep_ids(t, own, text, what);
    std::string stories;
    for (int i = 0; i < 200; i++)
        stories += builtin_story(1, i) + (i % 4 ? "\n" : "\n\n");
    expect_cuts_keep_ids(t, own, stories, "stories");
    for (int i = 0; i < 2000; i++) {
        std::string story = builtin_story(9, i).substr(0, size_t(i % 200));
        ASSERT_EQ(own.encode(story), t.encode(story)) << story;
    }
}

// The same model file with one setting changed: a cut is no longer safe, or no longer known to
// be, so documents must be encoded whole. Protobuf merges a repeated message field, so a field
// appended to the file overrides the model's own.
TEST_F(Trained, ModelsWithoutSafeCutsAreEncodedWhole) {
    std::string bytes = fs::read_file(model());
    const std::pair<std::string, std::string> variants[] = {
        // normalizer_spec { remove_extra_whitespaces: true }
        {"whitespace removal", std::string("\x1a\x02\x20\x01", 4)},
        // trainer_spec { model_type: UNIGRAM }
        {"unigram", std::string("\x12\x02\x18\x01", 4)},
        // pieces { piece: "\n" type: USER_DEFINED }
        {"a newline piece", std::string("\x0a\x05\x0a\x01\n\x18\x04", 7)},
    };
    TempDir dir;
    std::string text;
    for (int i = 0; i < 300; i++)
        text += builtin_story(4, i) + "\n";
    write(dir / "doc.txt", text);
    for (const auto& [what, extra] : variants) {
        write(dir / "m.model", bytes + extra);
        Tokenizer t(dir / "m.model");
        EXPECT_FALSE(t.splits_at_newlines()) << what;
        EXPECT_FALSE(t.use_encoder(Tokenizer::Encoder::kiln)) << what;
        DataConfig c;
        c.seq_len = 16;
        c.tail = "pad";
        c.batch_bytes = 1000;
        BuildResult r = build_dataset({dir / "doc.txt"}, t, dir / "out", c, true);
        EXPECT_EQ(r.tokens, int64_t(t.encode(text).size()) + 2) << what;
    }
    write(dir / "m.model", bytes);
    EXPECT_TRUE(Tokenizer(dir / "m.model").splits_at_newlines());
}

// A .txt document comes in parts cut before a '\n', bounded in size where newlines allow; the
// parts make up the document exactly, invalid UTF-8 repaired as in the whole.
TEST(Corpus, LargeTextDocumentsComeInParts) {
    TempDir dir;
    std::string text;
    for (int i = 0; i < 3000; i++)
        text += builtin_story(5, i) + (i % 100 == 0 ? "\xff\xe2\x96\n" : "\n");
    text += std::string(3 << 20, 'x');  // a 3 MB line at the end
    text += "\nend";
    write(dir / "a.txt", text);
    write(dir / "b.txt", std::string(10 << 20, 'y'));  // a 10 MB line, no newline at all
    write(dir / "c.txt", "");
    write(dir / "d.txt", "\n\nshort\n");
    write_zst(dir / "e.txt.zst", text);
    CorpusStats whole_stats;
    std::vector<std::string> whole = read_all({dir.path}, {}, &whole_stats);
    ASSERT_EQ(whole.size(), 4u);

    Corpus c(expand_corpus({dir.path}), {});
    std::vector<std::string> docs;
    std::vector<std::vector<size_t>> sizes;
    std::string part;
    bool first = false, last = true;
    while (c.next_part(part, first, last, 100000)) {
        if (first) {
            ASSERT_TRUE(docs.empty() || sizes.back().size() > 0);
            docs.emplace_back();
            sizes.emplace_back();
        } else {
            ASSERT_EQ(part[0], '\n');
        }
        docs.back() += part;
        sizes.back().push_back(part.size());
        if (!last) {  // (the bound is on bytes read: a repair makes 1 invalid byte 3)
            ASSERT_TRUE(part.size() <= 100100 || part.find('\n', 1) == std::string::npos);
        }
    }
    EXPECT_EQ(docs, whole);
    EXPECT_GT(sizes[0].size(), 10u);
    EXPECT_EQ(sizes[1], std::vector<size_t>{10u << 20});
    EXPECT_EQ(c.stats().documents, whole_stats.documents);
    EXPECT_EQ(c.stats().bytes, whole_stats.bytes);
    EXPECT_EQ(c.stats().replaced_utf8, whole_stats.replaced_utf8);
    EXPECT_EQ(c.stats().replaced_utf8, 2 * 30 * 2);  // a.txt and e.txt.zst
    EXPECT_EQ(c.stats().empty_documents, 1);
    // Tokenizer training reads the same parts: its lines are the document's.
    int64_t wrote = write_training_lines({dir / "a.txt"}, DataConfig{}, dir / "lines", 1 << 30);
    std::string want;
    for (size_t at = 0, nl; at < whole[0].size(); at = nl + 1) {
        nl = std::min(whole[0].find('\n', at), whole[0].size());
        if (nl > at)
            want += whole[0].substr(at, nl - at) + "\n";
    }
    EXPECT_EQ(fs::read_file(dir / "lines"), want);
    EXPECT_EQ(wrote, int64_t(want.size()));
}

// The pipeline on large documents: shards hold BOS + encode(whole document) + EOS, the same for
// 1 and 2 threads and for any read-ahead bound (which also bounds the parts read at once).
TEST_F(Trained, LargeDocumentsPackAsIfEncodedWhole) {
    Tokenizer t(model()), own(model());
    use_own(own);
    TempDir dir;
    std::string big, line;
    for (int i = 0; i < 600; i++)
        big += builtin_story(6, i) + (i % 7 ? "\n" : "\r\n\n");
    for (int i = 0; i < 300; i++)
        line += builtin_story(7, i) + " ";  // a line without a newline
    write(dir / "a.txt", big);
    write(dir / "b.jsonl", "{\"text\": \"short one\"}\n{\"text\": \"two\\nlines\"}\n");
    write(dir / "c.txt", line);
    write(dir / "d.txt", "\n" + big.substr(0, 100000));
    std::vector<uint32_t> stream;
    for (const std::string& doc : read_all({dir.path})) {
        stream.push_back(1);
        for (int id : t.encode(doc))
            stream.push_back(uint32_t(id));
        stream.push_back(2);
    }
    DataConfig c;
    c.seq_len = 128;
    c.tail = "pad";
    c.shard_tokens = 128 * 1000;
    std::vector<std::string> sums;
    for (auto [threads, ahead] : {std::pair{1, 4 << 20}, {2, 4 << 20}, {2, 5000}, {3, 1}}) {
        omp_set_num_threads(threads);
        c.batch_bytes = ahead;
        BuildResult r = build_dataset({dir.path}, threads == 2 ? own : t, dir / "out", c, true);
        EXPECT_EQ(r.tokens, int64_t(stream.size()));
        ShardSet set(dir / "out", 400);
        std::vector<int32_t> row(128);
        for (int64_t i = 0; i < set.rows(); i++) {
            set.read_row(i, row.data());
            for (int k = 0; k < 128 && size_t(i * 128 + k) < stream.size(); k++)
                ASSERT_EQ(uint32_t(row[k]), stream[i * 128 + k])
                    << threads << " threads, row " << i;
        }
        std::string s;
        for (const auto& e : r.manifest.shards)
            s += std::to_string(e.xxh64) + " ";
        sums.push_back(s);
    }
    omp_set_num_threads(2);
    for (const auto& s : sums)
        EXPECT_EQ(s, sums[0]);
}

// A reader's error ends the build with its sentence, never a crash or a hang.
TEST_F(Trained, ReaderErrorsEndTheBuild) {
    Tokenizer t(model());
    TempDir dir;
    std::string good;
    for (int i = 0; i < 5000; i++)
        good += nlohmann::json({{"text", builtin_story(8, i)}}).dump() + "\n";
    write(dir / "a.jsonl", good + "{\"text\": broken\n" + good);
    DataConfig c;
    c.seq_len = 64;
    c.batch_bytes = 10000;
    std::string m = message_of([&] { build_dataset({dir / "a.jsonl"}, t, dir / "out", c, true); });
    EXPECT_NE(m.find("a.jsonl:5001: line is not valid JSON"), std::string::npos) << m;
    EXPECT_FALSE(fs::exists(dir / "out/manifest.json"));
}

// Every file of ../shared/data with the real Llama-2 tokenizer: cuts keep the ids.
TEST(RealData, Llama2CutsAtNewlinesKeepTheIds) {
    std::string shared = kiln::testing::source_dir() + "/../shared/data";
    std::string model = shared + "/llama2-tokenizer.model";
    if (!fs::exists(model))
        GTEST_SKIP() << "shared data not present";
    Tokenizer t(model), own(model);
    use_own(own);
    ASSERT_TRUE(t.splits_at_newlines());
    // "\nHello" is <0x0A> then "Hello" without the dummy prefix's "▁".
    std::vector<int> ids = t.encode_part("\nHello world", false);
    EXPECT_EQ(ids.front(), 13);
    EXPECT_EQ(ids.size() + 1, t.encode("\nHello world").size());
    for (const auto& [what, text] : awkward_texts())
        expect_cuts_keep_ids(t, own, text, what);
    std::vector<std::string> files;
    for (const auto& e : std::filesystem::recursive_directory_iterator(shared)) {
        if (e.path().extension() == ".txt")
            files.push_back(e.path().string());
    }
    std::sort(files.begin(), files.end());
    ASSERT_GE(files.size(), 15u);
    std::vector<std::string> failed(files.size());
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t i = 0; i < files.size(); i++) {
        std::string text = fs::read_file(files[i]);  // raw bytes: invalid UTF-8 kept
        std::vector<int> whole = t.encode(text);
        if (encode_cut(t, text, 1) != whole || encode_cut(own, text, 1) != whole ||
            own.encode(text) != whole)
            failed[i] = files[i];
    }
    for (const auto& f : failed)
        EXPECT_EQ(f, "");
}

TEST(Sampler, EverySequenceOncePerEpochForOneTwoThreeRanks) {
    const int64_t rows = 97, B = 4;  // rows not a multiple of anything
    for (int64_t dp : {1, 2, 3}) {
        Sampler s(rows, 11);
        std::vector<int> seen(rows, 0);
        int64_t consumed = 0;
        for (int64_t step = 0; consumed < 3 * rows; step++) {
            for (int64_t r = 0; r < dp; r++) {
                for (int64_t row : s.micro_batch(step, 1, 0, r, dp, B)) {
                    if (consumed++ < 3 * rows)
                        seen[row]++;
                }
            }
        }
        for (int64_t r = 0; r < rows; r++)
            EXPECT_EQ(seen[r], 3) << "dp " << dp << " row " << r;
        // Resuming mid-epoch (a fresh sampler at step 20) gives the same rows.
        Sampler resumed(rows, 11);
        EXPECT_EQ(resumed.micro_batch(20, 1, 0, dp - 1, dp, B),
                  s.micro_batch(20, 1, 0, dp - 1, dp, B));
    }
}

}  // namespace
}  // namespace kiln::data
