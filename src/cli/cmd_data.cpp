// kiln data --corpus PATH... --tokenizer MODEL|--train-tokenizer N --out DIR [--threads N]
//           [--force] [--config F] [--set data.seq_len=4096 ...]
// kiln data verify DIR
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/threads.h"
#include "data/build.h"
#include "data/tokenizer.h"

namespace kiln::cli {

// Trains a tokenizer on the corpus into `out` (a .model path); shared with kiln tokenizer train.
// An existing `out` is replaced only with `force`, and only if it is a regular file: every data
// set encoded with the old model would no longer match it.
void train_tokenizer_on(const std::vector<std::string>& corpus, const data::DataConfig& config,
                        int vocab_size, int threads, const std::string& out, bool force) {
    if (std::filesystem::is_directory(out))
        throw error(
            "--out {} is a folder; give the tokenizer file to write, e.g. {}/tokenizer.model", out,
            out);
    fs::check_replaceable(out, force);
    std::string lines = out + ".lines.tmp";
    int64_t bytes = data::write_training_lines(corpus, config, lines, int64_t(1) << 30);
    log::info("tokenizer", "training a {}-piece BPE tokenizer on {:.1f} MB of text", vocab_size,
              bytes / 1e6);
    try {
        data::train_tokenizer(lines, out, {vocab_size, threads});
    } catch (...) {
        std::filesystem::remove(lines);
        throw;
    }
    std::filesystem::remove(lines);
    log::info("tokenizer", "wrote {}", out);
}

Action add_data(CLI::App& app) {
    struct Options {
        std::vector<std::string> corpus;
        std::string tokenizer, out, verify_dir;
        int train_tokenizer = 0;
        int threads = 0;
        std::string encoder = "kiln";
        bool force = false;
        ConfigOptions config;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--corpus", o->corpus,
                   "files, folders or globs of .txt/.jsonl (.gz/.zst), or builtin:stories[:N]");
    app.add_option("--tokenizer", o->tokenizer, "SentencePiece tokenizer.model to encode with");
    app.add_option("--train-tokenizer", o->train_tokenizer,
                   "train a Llama-2-style tokenizer of this vocabulary size on the corpus first "
                   "(written to OUT/tokenizer.model)");
    app.add_option("--out", o->out, "output folder for shards and manifest.json");
    app.add_option("--threads", o->threads,
                   "encoder threads (0: all cores); a reader and the packer run beside them");
    app.add_option("--encoder", o->encoder,
                   "kiln (the same ids as SentencePiece, faster; SentencePiece for models it "
                   "does not reproduce) or sentencepiece")
        ->check(CLI::IsMember({"kiln", "sentencepiece"}));
    app.add_flag("--force", o->force, "replace a data set already in --out");
    add_config_options(app, o->config);
    CLI::App* verify = app.add_subcommand("verify",
                                          "check a data set: headers, sizes, checksums, "
                                          "token range");
    verify->add_option("dir", o->verify_dir, "data set folder")->required();
    verify->footer("");  // it reads no config: not data's list of keys
    return [o, verify] {
        train::RunConfig config;
        // Only data.* matters here: the products' precision is the training's to settle.
        std::string yaml = resolve_config(config, o->config, false);
        if (checked_only(o->config, yaml))
            return 0;
        if (verify->parsed()) {
            data::Manifest m = data::verify_dataset(o->verify_dir);
            std::printf("%s: ok: %llu sequences of %u tokens in %zu shards, vocab %lld, %s\n",
                        o->verify_dir.c_str(), static_cast<unsigned long long>(m.sequences()),
                        m.seq_len, m.shards.size(), static_cast<long long>(m.vocab_size),
                        m.tokenizer.c_str());
            return 0;
        }
        if (o->corpus.empty() || o->out.empty()) {
            throw error("kiln data needs --corpus and --out (or: kiln data verify DIR)");
        }
        if (o->tokenizer.empty() == (o->train_tokenizer == 0)) {
            throw error("kiln data needs exactly one of --tokenizer MODEL or --train-tokenizer N");
        }
        set_num_threads(o->threads);
        std::string model = o->tokenizer;
        if (o->train_tokenizer > 0) {
            model = o->out + "/tokenizer.model";
            if (std::filesystem::exists(model) && !o->force) {
                log::info("tokenizer", "reusing {} (--force retrains it)", model);
            } else {
                std::filesystem::create_directories(o->out);
                train_tokenizer_on(o->corpus, config.data, o->train_tokenizer, o->threads, model,
                                   o->force);
            }
        }
        data::Tokenizer tokenizer(model);
        if (o->encoder == "kiln" && !tokenizer.use_encoder(data::Tokenizer::Encoder::kiln)) {
            log::info("tokenizer",
                      "{} is not a model kiln's encoder reproduces exactly; encoding with "
                      "SentencePiece",
                      model);
        }
        data::BuildResult r =
            data::build_dataset(o->corpus, tokenizer, o->out, config.data, o->force);
        if (r.reused) {
            std::printf("%s already holds this data set (%llu sequences); nothing to do\n",
                        o->out.c_str(), static_cast<unsigned long long>(r.manifest.sequences()));
        }
        return 0;
    };
}

}  // namespace kiln::cli
