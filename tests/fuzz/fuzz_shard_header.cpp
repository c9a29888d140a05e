// Fuzzes data::parse_shard_header, which every reader of a shard-NNNNN.bin calls on the mapped
// file (ShardSet, kiln data verify). An accepted header must describe exactly the bytes given.
#include "data/shard.h"
#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace kiln;
    data::ShardHeader h;
    if (!fuzz::accepted([&] { h = data::parse_shard_header(data, size, "shard-00000.bin"); }))
        return 0;
    const unsigned __int128 promised =
        (unsigned __int128)h.n_seqs * h.seq_len * h.token_bytes + data::kShardHeaderBytes;
    if (promised != size || (h.token_bytes != 2 && h.token_bytes != 4) || h.seq_len == 0)
        fuzz::finding("an accepted shard header does not describe its file");
    return 0;
}
