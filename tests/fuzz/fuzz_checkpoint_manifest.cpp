// Fuzzes a checkpoint's manifest.json as kiln train (resume), eval, sample and export read it:
// checkpoint::Checkpoint opens it, checks every field against the model it describes and the
// files it names, then load() assembles the weights and moments into a layout. The folder holds
// real rank files of a tiny model, written by the trainer's own writer (RankWriter, commit):
//   rank-00000.safetensors                    one rank (TP 1, DP 1)
//   tp2-rank-00000/00001.safetensors          two tensor-parallel ranks (TP 2)
// With KILN_FUZZ_WRITE_SEEDS=DIR set, the manifests that commit() writes for them go to DIR.
#include <vector>

#include "checkpoint/checkpoint.h"
#include "fuzz.h"

namespace {

using namespace kiln;
namespace stdfs = std::filesystem;

model::LlamaConfig tiny() {
    model::LlamaConfig c;
    c.preset = "fuzz";
    c.dim = 8;
    c.n_layers = 1;
    c.n_heads = 2;
    c.n_kv_heads = 2;
    c.vocab_size = 16;
    c.multiple_of = 8;
    c.max_seq_len = 16;
    return c;
}

std::string dir() {
    static const std::string d = fuzz::scratch_dir() + "/checkpoint";
    return d;
}

// Writes a checkpoint of tiny() over `tp` tensor-parallel ranks; returns its folder.
std::string write_checkpoint(const std::string& root, int tp) {
    const checkpoint::RunDir run{root};
    const model::LlamaConfig config = tiny();
    checkpoint::prepare_temporary_dir(run, 1);
    std::vector<checkpoint::RankFile> files;
    for (int r = 0; r < tp; r++) {
        const model::Layout layout(config, tp, r);
        std::vector<float> values(size_t(layout.total()));
        for (size_t i = 0; i < values.size(); i++)
            values[i] = 0.001f * float(i) + float(r);
        checkpoint::RankWriter writer;
        writer.stage(layout, {r, tp, tp, r, 1, 0},
                     {values.data(), values.data(), values.data(), 0, layout.total()});
        writer.start(run, 1);
        files.push_back(writer.finish());
    }
    return checkpoint::commit(run, config, {1, 1, 2.5}, {0, tp, tp, 0, 1, 0}, false, files, 0);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    const char* seeds = std::getenv("KILN_FUZZ_WRITE_SEEDS");
    const std::string one = write_checkpoint(fuzz::scratch_dir() + "/run1", 1);
    const std::string two = write_checkpoint(fuzz::scratch_dir() + "/run2", 2);
    stdfs::create_directories(dir());
    stdfs::copy_file(one + "/rank-00000.safetensors", dir() + "/rank-00000.safetensors");
    for (int r = 0; r < 2; r++) {
        const std::string name = fmt::format("rank-{:05d}.safetensors", r);
        stdfs::copy_file(two + "/" + name, dir() + "/tp2-" + name);
    }
    if (seeds != nullptr) {
        stdfs::copy_file(one + "/manifest.json", std::string(seeds) + "/tp1.json",
                         stdfs::copy_options::overwrite_existing);
        std::string text = fs::read_file(two + "/manifest.json");
        for (size_t at = 0; (at = text.find("\"rank-", at)) != std::string::npos; at += 5)
            text.insert(at + 1, "tp2-");
        fuzz::write_bytes(std::string(seeds) + "/tp2.json", text.data(), text.size());
    }
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
    fuzz::write_bytes(dir() + "/manifest.json", bytes, size);
    fuzz::accepted([&] {
        const checkpoint::Checkpoint ckpt(dir());
        for (int tp : {1, 2}) {
            if (!fuzz::accepted([&] { ckpt.config().validate(tp); }))
                continue;
            const model::Layout layout(ckpt.config(), tp, tp - 1);
            std::vector<float> params(size_t(layout.total())), m(params.size()), v(params.size());
            ckpt.load(layout, params.data(), m.data(), v.data(), 0, layout.total());
        }
    });
    return 0;
}
