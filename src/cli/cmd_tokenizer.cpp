// kiln tokenizer train --corpus PATH... --vocab-size N --out FILE.model [--force]
// kiln tokenizer encode|decode --tokenizer MODEL     (stdin -> stdout)
#include <iostream>
#include <memory>
#include <sstream>

#include "cli/commands.h"
#include "core/error.h"
#include "data/build.h"
#include "data/tokenizer.h"

namespace kiln::cli {

void train_tokenizer_on(const std::vector<std::string>& corpus, const data::DataConfig& config,
                        int vocab_size, int threads, const std::string& out, bool force);

Action add_tokenizer(CLI::App& app) {
    struct Options {
        std::vector<std::string> corpus;
        std::string out, model;
        int vocab_size = 32000, threads = 0;
        bool force = false;
    };
    auto o = std::make_shared<Options>();
    app.require_subcommand(1);
    CLI::App* train =
        app.add_subcommand("train", "train a Llama-2-style BPE tokenizer on a corpus");
    train->add_option("--corpus", o->corpus, "files, folders, globs or builtin:stories[:N]")
        ->required();
    train->add_option("--vocab-size", o->vocab_size, "pieces in the vocabulary")
        ->check(CLI::Range(100, 1 << 20))
        ->capture_default_str();
    train->add_option("--out", o->out, "the .model file to write")->required();
    train->add_option("--threads", o->threads, "training threads (0: all cores)");
    train->add_flag("--force", o->force,
                    "replace an existing --out file (data sets encoded with it no longer match)");
    CLI::App* encode = app.add_subcommand("encode", "text on stdin -> one line of ids per line");
    CLI::App* decode = app.add_subcommand("decode", "lines of ids on stdin -> text");
    for (CLI::App* sub : {encode, decode}) {
        sub->add_option("--tokenizer", o->model, "SentencePiece tokenizer.model")->required();
    }
    return [o, train, encode] {
        if (train->parsed()) {
            train_tokenizer_on(o->corpus, data::DataConfig{}, o->vocab_size, o->threads, o->out,
                               o->force);
            return 0;
        }
        data::Tokenizer tok(o->model);
        std::string line;
        int64_t line_no = 0;
        while (std::getline(std::cin, line)) {
            line_no++;
            if (encode->parsed()) {
                auto ids = tok.encode(line);
                for (size_t i = 0; i < ids.size(); i++)
                    std::cout << (i ? " " : "") << ids[i];
                std::cout << '\n';
            } else {
                std::vector<int> ids;
                std::istringstream in(line);
                std::string word;
                while (in >> word) {
                    try {
                        size_t used = 0;
                        ids.push_back(std::stoi(word, &used));
                        if (used != word.size())
                            throw std::invalid_argument(word);
                    } catch (const std::exception&) {
                        throw error("stdin line {}: '{}' is not a token id", line_no, word);
                    }
                }
                std::cout << tok.decode(ids) << '\n';
            }
        }
        return 0;
    };
}

}  // namespace kiln::cli
