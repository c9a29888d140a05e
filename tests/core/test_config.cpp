#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <vector>

#include "core/config.h"
#include "core/error.h"
#include "core/fs.h"
#include "fixture.h"

namespace kiln {
namespace {

struct Sample {
    int64_t n = 4;
    double lr = 0.5;
    std::string name = "a";
    bool flag = false;
    std::string preset = "none";
};

void build(ConfigSchema& s, Sample& c) {
    s.add("train.n", &c.n, "a count", [&c] { return c.n > 0 ? "" : "must be positive"; });
    s.add("train.lr", &c.lr, "a rate");
    s.add("run.name", &c.name, "a name");
    s.add("run.flag", &c.flag, "a switch");
    s.add("model.preset", &c.preset, "sets n", {}, [&c] { c.n = 100; });
    s.set_first("model.preset");
}

using kiln::testing::message_of;

TEST(Config, DefaultsYamlAndOverridesInOrder) {
    Sample c;
    ConfigSchema s;
    build(s, c);
    s.load_yaml_text("train:\n  n: 7\n  lr: 3e-4\nrun: {name: b}\n", "x.yaml");
    s.add_override("train.n=9");
    s.apply();
    EXPECT_EQ(c.n, 9);
    EXPECT_DOUBLE_EQ(c.lr, 3e-4);
    EXPECT_EQ(c.name, "b");
    EXPECT_FALSE(c.flag);
}

TEST(Config, PresetAppliesFirstWhateverTheOrder) {
    Sample c;
    ConfigSchema s;
    build(s, c);
    s.add_override("train.n=5");
    s.add_override("model.preset=big");
    s.apply();
    EXPECT_EQ(c.n, 5);  // the explicit key wins over the preset's value
}

TEST(Config, ErrorsNameKeyValueAndSource) {
    Sample c;
    ConfigSchema s;
    build(s, c);
    s.add_override("train.nn=3");
    std::string m = message_of([&] { s.apply(); });
    EXPECT_NE(m.find("unknown config key 'train.nn'"), std::string::npos) << m;

    ConfigSchema s2;
    build(s2, c);
    s2.load_yaml_text("train: {n: -2}", "bad.yaml");
    m = message_of([&] { s2.apply(); });
    EXPECT_NE(m.find("bad.yaml"), std::string::npos) << m;
    EXPECT_NE(m.find("train.n=-2"), std::string::npos) << m;
    EXPECT_NE(m.find("must be positive"), std::string::npos) << m;

    ConfigSchema s3;
    build(s3, c);
    s3.add_override("train.lr=fast");
    m = message_of([&] { s3.apply(); });
    EXPECT_NE(m.find("train.lr=fast is not a finite number"), std::string::npos) << m;

    ConfigSchema s4;
    build(s4, c);
    m = message_of([&] { s4.load_yaml_text("train: [1, 2", "broken.yaml"); });
    EXPECT_NE(m.find("broken.yaml is not valid YAML"), std::string::npos) << m;

    m = message_of([&] { s4.add_override("novalue"); });
    EXPECT_NE(m.find("expected KEY=VALUE"), std::string::npos) << m;
}

// The hint for an unknown key: a known key with the same last component (a key in the wrong
// section), else the nearest within two slips of typing, else none.
TEST(Config, UnknownKeyHintsTheNearestKnownOne) {
    const std::vector<std::string> keys = {"train.steps", "train.lr", "model.dim", "efficiency"};
    EXPECT_EQ(closest_key("model.steps", keys), "train.steps");
    EXPECT_EQ(closest_key("train.stesp", keys), "train.steps");
    EXPECT_EQ(closest_key("efficency", keys), "efficiency");
    EXPECT_EQ(closest_key("train.learning_rate", keys), "");

    Sample c;
    ConfigSchema s;
    build(s, c);
    s.add_override("run.nmae=x");
    std::string m = message_of([&] { s.apply(); });
    EXPECT_NE(m.find("unknown config key 'run.nmae' (did you mean 'run.name'?)"), std::string::npos)
        << m;
}

TEST(Config, ResolvedYamlRoundTrips) {
    Sample c;
    ConfigSchema s;
    build(s, c);
    s.add_override("run.flag=true");
    s.add_override("train.lr=0.125");
    s.apply();
    std::string yaml = s.to_yaml();
    Sample d;
    ConfigSchema t;
    build(t, d);
    t.load_yaml_text(yaml, "resolved");
    t.apply();
    EXPECT_EQ(d.flag, true);
    EXPECT_DOUBLE_EQ(d.lr, 0.125);
    EXPECT_EQ(d.n, c.n);
    EXPECT_NE(s.help().find("train.lr = 0.5"), std::string::npos);  // defaults
}

TEST(Fs, AtomicWriteReplacesWholeFile) {
    kiln::testing::TempDir dir;
    fs::write_file_atomic(dir / "a.txt", std::string("first"));
    fs::write_file_atomic(dir / "a.txt", std::string("second"));
    EXPECT_EQ(fs::read_file(dir / "a.txt"), "second");
    EXPECT_FALSE(fs::exists(dir / "a.txt.tmp"));
    EXPECT_THROW(fs::read_file(dir / "missing"), Error);
}

// Large files take the direct path (O_DIRECT through an aligned staging buffer, with a tail that
// is not a whole block); where the file system refuses direct I/O (tmpfs may) the buffered one.
// Either way every byte lands, in order, and commit() returns the checksum of the whole.
TEST(Fs, LargeFileKeepsEveryByteOnTheDirectPath) {
    std::vector<char> data((size_t(20) << 20) + 1237);
    uint64_t x = 88172645463325252ull;
    for (char& c : data) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        c = static_cast<char>(x);
    }
    kiln::testing::TempDir disk;
    std::vector<std::string> folders = {disk.path};
    if (fs::exists("/dev/shm"))
        folders.push_back("/dev/shm");
    for (const auto& folder : folders) {
        std::string path = folder + "/kiln-direct-" + std::to_string(::getpid()) + ".bin";
        fs::AtomicWriter w(path, data.size());
        // Pieces that straddle the staging buffer and leave it unaligned.
        const size_t cuts[] = {0, 3, (size_t(9) << 20) + 5, (size_t(17) << 20), data.size()};
        for (size_t i = 0; i + 1 < std::size(cuts); i++)
            w.write(data.data() + cuts[i], cuts[i + 1] - cuts[i]);
        EXPECT_EQ(w.commit(), fs::xxh64(data.data(), data.size())) << folder;
        EXPECT_TRUE(fs::read_file(path) == std::string(data.begin(), data.end())) << folder;
        EXPECT_FALSE(fs::exists(path + ".tmp")) << folder;
        std::remove(path.c_str());
    }
}

}  // namespace
}  // namespace kiln
