// Fuzzes a data set's manifest.json as kiln train, eval and data verify read it: verify_dataset
// (kiln data verify), then read_manifest and a ShardSet opened on it (every shard's header
// checked against the manifest), verify() (checksums) and reading every row. The folder holds two
// real shards the manifest may name:
//   shard-00000.bin   2-byte tokens, seq_len 4, 3 rows, ids 0..11
//   shard-00001.bin   4-byte tokens, seq_len 4, 2 rows, ids up to 70000
// With KILN_FUZZ_WRITE_SEEDS=DIR set, the manifests kiln data writes for them go to DIR.
#include <vector>

#include "data/build.h"
#include "data/shard.h"
#include "fuzz.h"

namespace {

using namespace kiln;

std::string dir() {
    static const std::string d = fuzz::scratch_dir() + "/data";
    return d;
}

void write_seed(const data::Manifest& m, const std::string& name) {
    const char* seeds = std::getenv("KILN_FUZZ_WRITE_SEEDS");
    if (seeds == nullptr)
        return;
    const std::string tmp = fuzz::scratch_dir() + "/seed";
    std::filesystem::create_directories(tmp);
    data::write_manifest(tmp, m);
    std::filesystem::copy_file(tmp + "/manifest.json", std::string(seeds) + "/" + name,
                               std::filesystem::copy_options::overwrite_existing);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    std::filesystem::create_directories(dir());
    std::vector<uint32_t> small, wide;
    for (uint32_t i = 0; i < 12; i++)
        small.push_back(i);
    for (uint32_t i = 0; i < 8; i++)
        wide.push_back(i * 10000);
    data::Manifest m;
    m.seq_len = 4;
    m.vocab_size = 16;
    m.token_bytes = 2;
    m.tokenizer = "xxh64:0123456789abcdef";
    m.sources = {"corpus.txt"};
    m.shards = {{"shard-00000.bin", 3, data::write_shard(dir() + "/shard-00000.bin", small, 4, 2)}};
    write_seed(m, "u16.json");
    m.vocab_size = 70001;
    m.token_bytes = 4;
    m.shards = {{"shard-00001.bin", 2, data::write_shard(dir() + "/shard-00001.bin", wide, 4, 4)}};
    write_seed(m, "u32.json");
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
    fuzz::write_bytes(dir() + "/manifest.json", bytes, size);
    fuzz::accepted([&] { data::verify_dataset(dir()); });
    fuzz::accepted([&] {
        const data::Manifest m = data::read_manifest(dir());
        data::ShardSet set(dir(), m.vocab_size);
        set.verify();
        std::vector<int32_t> row(size_t(set.seq_len()));
        for (int64_t r = 0; r < set.rows(); r++) {
            set.read_row(r, row.data());
            for (int32_t t : row) {
                if (t < 0 || t >= m.vocab_size)
                    fuzz::finding("a row holds a token id outside the vocabulary");
            }
        }
    });
    return 0;
}
