#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstring>
#include <fstream>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "fixture.h"

namespace kiln::data {
namespace {

std::string make_set(const kiln::testing::TempDir& dir, uint32_t token_bytes, int64_t vocab) {
    std::string d = dir / "set";
    std::filesystem::create_directories(d);
    Manifest m;
    m.seq_len = 4;
    m.vocab_size = vocab;
    m.token_bytes = token_bytes;
    std::vector<uint32_t> a = {1, 2, 3, 4, 5, 6, 7, 8}, b = {9, 10, 11, 12};
    if (token_bytes == 4)
        b[0] = 70000;
    m.shards.push_back(
        {"shard-00000.bin", 2, write_shard(d + "/shard-00000.bin", a, 4, token_bytes)});
    m.shards.push_back(
        {"shard-00001.bin", 1, write_shard(d + "/shard-00001.bin", b, 4, token_bytes)});
    write_manifest(d, m);
    return d;
}

using kiln::testing::message_of;

TEST(Shards, WriteReadVerify) {
    kiln::testing::TempDir dir;
    for (uint32_t width : {2u, 4u}) {
        int64_t vocab = width == 2 ? 100 : 80000;
        std::string d = make_set(dir, width, vocab);
        ShardSet set(d, vocab);
        EXPECT_EQ(set.rows(), 3);
        std::vector<int32_t> row(4);
        set.read_row(1, row.data());
        EXPECT_EQ(row, (std::vector<int32_t>{5, 6, 7, 8}));
        set.read_row(2, row.data());
        EXPECT_EQ(row[0], width == 2 ? 9 : 70000);
        set.verify();
        std::filesystem::remove_all(d);
    }
}

TEST(Shards, DetectsDamageAndMismatches) {
    kiln::testing::TempDir dir;
    std::string d = make_set(dir, 2, 100);
    EXPECT_NE(message_of([&] { ShardSet(d, 32000); }).find("vocab_size 100"), std::string::npos);
    {  // flip a token byte: sizes still agree, the checksum does not
        std::fstream f(d + "/shard-00000.bin", std::ios::in | std::ios::out | std::ios::binary);
        f.seekp(64);
        f.put(char(42));
    }
    ShardSet set(d, 100);
    EXPECT_NE(message_of([&] { set.verify(); }).find("shard-00000.bin: checksum"),
              std::string::npos);
    std::filesystem::resize_file(d + "/shard-00001.bin", 70);
    EXPECT_NE(message_of([&] { ShardSet(d, 100); }).find("shard-00001.bin: file is 70 bytes"),
              std::string::npos);
    EXPECT_NE(message_of([&] { ShardSet(dir / "nothing", 100); }).find("no manifest.json"),
              std::string::npos);
    EXPECT_NE(message_of([&] { open_source(dir / "nothing", 4, 100, 1); }).find("no such folder"),
              std::string::npos);
}

// A row count near 2^61 makes the promised size wrap to the file's real size: refused, never read
// past the end of the file.
TEST(Shards, ForgedRowCountDoesNotWrapTheSizeCheck) {
    kiln::testing::TempDir dir;
    std::string d = make_set(dir, 2, 100);
    std::string bytes = fs::read_file(d + "/shard-00000.bin");  // 64 + 2 rows x 4 x 2 = 80
    ASSERT_EQ(bytes.size(), 80u);
    const uint64_t forged = 2 + (uint64_t(1) << 61);  // x 8 bytes a row + 64 wraps to 80
    std::memcpy(bytes.data() + 24, &forged, 8);
    std::string why = message_of([&] {
        parse_shard_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "forged");
    });
    EXPECT_NE(why.find("forged: its header promises 2305843009213693954 rows"), std::string::npos)
        << why;
    fs::write_file_atomic(d + "/shard-00000.bin", bytes);
    EXPECT_NE(message_of([&] { ShardSet(d, 100); }).find("more than any file holds"),
              std::string::npos);
}

// Manifest fields are checked before anything is read by them; a FIFO in a shard's place is
// refused, not waited on.
TEST(Shards, BadManifestFieldsAreRefused) {
    kiln::testing::TempDir dir;
    std::string d = make_set(dir, 2, 100);
    const std::string good = fs::read_file(d + "/manifest.json");
    auto with = [&](const std::string& from, const std::string& to) {
        std::string text = good;
        size_t at = text.find(from);
        EXPECT_NE(at, std::string::npos) << from;
        fs::write_file_atomic(d + "/manifest.json", text.replace(at, from.size(), to));
        return message_of([&] { read_manifest(d); });
    };
    EXPECT_NE(
        with("\"vocab_size\": 100", "\"vocab_size\": -1").find("vocab_size -1 is not between"),
        std::string::npos);
    EXPECT_NE(with("\"vocab_size\": 100", "\"vocab_size\": 1e20").find("is not a whole number"),
              std::string::npos);
    EXPECT_NE(with("\"vocab_size\": 100", "\"vocab_size\": 70000").find("does not fit 2-byte"),
              std::string::npos);
    EXPECT_NE(with("\"shard-00000.bin\"", "\"shard\\u0000.bin\"").find("must be a plain name"),
              std::string::npos);
    std::string sum = good.substr(good.find("\"xxh64\": \"") + 10, 16);
    EXPECT_NE(with(sum, "xyz").find("xxh64 \"xyz\" of shard-00000.bin is not 16 hexadecimal"),
              std::string::npos);
    // A shard listed twice would be read twice an epoch while the one it displaced lies unused.
    std::string twice = with("\"shard-00001.bin\"", "\"shard-00000.bin\"");
    EXPECT_NE(twice.find(d + "/manifest.json lists shard shard-00000.bin twice"), std::string::npos)
        << twice;
    EXPECT_NE(message_of([&] { ShardSet(d, 100); }).find("lists shard shard-00000.bin twice"),
              std::string::npos);
    fs::write_file_atomic(d + "/manifest.json", good);
    std::filesystem::remove(d + "/shard-00001.bin");
    ASSERT_EQ(::mkfifo((d + "/shard-00001.bin").c_str(), 0644), 0);
    EXPECT_NE(message_of([&] { ShardSet(d, 100); }).find("shard-00001.bin is not a regular file"),
              std::string::npos);
}

TEST(Shards, TokenOutsideVocabularyIsReported) {
    kiln::testing::TempDir dir;
    std::string d = make_set(dir, 2, 10);  // rows hold ids up to 12
    ShardSet set(d, 10);
    std::vector<int32_t> row(4);
    EXPECT_NE(message_of([&] { set.read_row(2, row.data()); }).find("outside the vocabulary"),
              std::string::npos);
}

TEST(Sampler, DisjointAcrossRanksAndCoversEachEpoch) {
    Sampler s(40, 3);
    std::set<int64_t> seen;
    // 5 steps x 1 micro x 2 ranks x 4 rows = 40 = one epoch
    for (int64_t step = 0; step < 5; step++) {
        for (int64_t rank = 0; rank < 2; rank++) {
            for (int64_t r : s.micro_batch(step, 1, 0, rank, 2, 4)) {
                EXPECT_TRUE(seen.insert(r).second) << "row " << r << " dealt twice";
            }
        }
    }
    EXPECT_EQ(seen.size(), 40u);
    Sampler again(40, 3);
    EXPECT_EQ(again.micro_batch(3, 1, 0, 1, 2, 4), s.micro_batch(3, 1, 0, 1, 2, 4));
    EXPECT_NE(Sampler(40, 4).micro_batch(0, 1, 0, 0, 1, 8), s.micro_batch(0, 1, 0, 0, 1, 8));
}

TEST(Synthetic, DeterministicAndInRange) {
    SyntheticSource a(64, 500, 1), b(64, 500, 1);
    std::vector<int32_t> x(64), y(64);
    a.read_row(12345, x.data());
    b.read_row(12345, y.data());
    EXPECT_EQ(x, y);
    for (int32_t t : x)
        EXPECT_TRUE(t >= 0 && t < 500);
}

}  // namespace
}  // namespace kiln::data
