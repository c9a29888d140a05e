// Fuzzes the tokenizer with arbitrary bytes, as kiln data and kiln tokenizer encode feed it any
// document: Tokenizer::encode with a Llama-2-style model (BPE, byte fallback) trained at start
// by train_tokenizer on the built-in stories (as the tests make one) and lines of other scripts.
// Every id must lie in the vocabulary, and decoding the ids must succeed.
#include <fstream>

#include "data/build.h"
#include "data/tokenizer.h"
#include "fuzz.h"

namespace {

using namespace kiln;

const data::Tokenizer* tokenizer = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    const std::string lines = fuzz::scratch_dir() + "/lines.txt";
    data::write_training_lines({"builtin:stories:2000"}, data::DataConfig{}, lines, 1 << 30);
    {
        std::ofstream out(lines, std::ios::app);
        const char* words[] = {"the",    "cat",   "sat",  "on",     "a",     "mat",    "and",
                               "dog",    "ran",   "away", "from",   "home",  "1234",   "9",
                               "naïve",  "café",  "über", "日本語", "emoji", "🙂",   "tab\t",
                               "quotes", "\"x\"", "<s>",  "</s>",   "end.",  "comma,", "-"};
        const size_t n = sizeof words / sizeof words[0];
        for (size_t i = 0; i < 3000; i++) {
            for (size_t w = 0; w < 8; w++)
                out << words[(i * 7 + w * 13 + i / 5) % n] << (w < 7 ? " " : "\n");
        }
    }
    const std::string model = fuzz::scratch_dir() + "/t.model";
    data::train_tokenizer(lines, model, {400, 1});
    static const data::Tokenizer t(model);
    tokenizer = &t;
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(bytes), size);
    fuzz::accepted([&] {
        const std::vector<int> ids = tokenizer->encode(text);
        for (int id : ids) {
            if (id < 0 || id >= tokenizer->vocab_size())
                fuzz::finding("encode gave an id outside the vocabulary");
        }
        (void)tokenizer->decode(ids);
    });
    return 0;
}
