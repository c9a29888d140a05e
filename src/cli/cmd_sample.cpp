// kiln sample --checkpoint DIR [--prompt TEXT] [--tokens N] [--samples N] ...
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "data/tokenizer.h"
#include "train/sample.h"

namespace kiln::cli {

std::string run_data_key(const std::string& checkpoint, const std::string& key) {
    namespace stdfs = std::filesystem;
    stdfs::path p = stdfs::absolute(checkpoint).lexically_normal();
    if (p.filename().empty())
        p = p.parent_path();
    for (stdfs::path run : {p, p.parent_path().parent_path()}) {
        std::string config = (run / "config.yaml").string();
        if (!fs::exists(config))
            continue;
        YAML::Node y = YAML::LoadFile(config);
        if (y["data"] && y["data"][key]) {
            std::string value = y["data"][key].as<std::string>();
            if (!value.empty())
                return value;
        }
    }
    return "";
}

std::string run_tokenizer(const std::string& checkpoint) {
    std::string t = run_data_key(checkpoint, "tokenizer");
    if (t.empty())
        throw error(
            "{}: cannot tell which tokenizer its run used (no data.tokenizer in its run's "
            "config.yaml); give --tokenizer MODEL",
            checkpoint);
    return t;
}

Action add_sample(CLI::App& app) {
    struct Options {
        std::string checkpoint, tokenizer, prompt, precision = "auto", backend = "cpu";
        int samples = 1;
        bool ids = false;
        train::SampleOptions sample;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--checkpoint", o->checkpoint, "checkpoint folder, or a run folder (its latest)")
        ->required();
    app.add_option("--tokenizer", o->tokenizer, "tokenizer model (default: the run's)");
    app.add_option("--prompt", o->prompt, "text to continue (default: none, from BOS)");
    app.add_option("--tokens", o->sample.tokens, "new tokens per sample")
        ->check(CLI::Range(1, 100000))
        ->capture_default_str();
    app.add_option("--samples", o->samples, "how many samples")
        ->check(CLI::Range(1, 1000))
        ->capture_default_str();
    app.add_option("--temperature", o->sample.temperature, "softmax temperature (0: greedy)")
        ->capture_default_str();
    app.add_option("--top-k", o->sample.top_k, "draw among the k likeliest (0: all)")
        ->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    app.add_option("--seed", o->sample.seed, "random seed")->capture_default_str();
    app.add_flag("--ids", o->ids, "print the new tokens' ids instead of text");
    add_kernel_options(app, o->precision, o->backend);
    return [o] {
        check_flag("--temperature", o->sample.temperature, 0, 100,
                   "a temperature from 0 (greedy) to 100");
        train::Sampler sampler(o->checkpoint, o->precision, o->backend);
        std::string model = o->tokenizer.empty() ? run_tokenizer(o->checkpoint) : o->tokenizer;
        data::Tokenizer tok(model);
        if (tok.vocab_size() != sampler.vocab_size())
            throw error("tokenizer {} has {} pieces but the checkpoint's model has {}", model,
                        tok.vocab_size(), sampler.vocab_size());
        for (int s = 0; s < o->samples; s++) {
            train::SampleOptions opt = o->sample;
            opt.seed = o->sample.seed + uint64_t(s);
            if (o->ids) {
                std::vector<int32_t> prompt = {tok.bos_id()};
                for (int id : tok.encode(o->prompt))
                    prompt.push_back(id);
                const size_t given = prompt.size();
                std::vector<int32_t> all = sampler.continue_(prompt, opt, tok.eos_id());
                for (size_t k = given; k < all.size(); k++)
                    std::printf("%s%d", k > given ? " " : "", all[k]);
                std::printf("\n");
            } else {
                std::printf("%s\n", sampler.text(tok, o->prompt, opt).c_str());
            }
            if (s + 1 < o->samples)
                std::printf("---\n");
        }
        return 0;
    };
}

}  // namespace kiln::cli
