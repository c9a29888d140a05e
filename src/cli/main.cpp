// kiln: pretrain Llama-2-family models end to end. The subcommand table lives here; each
// subcommand is in cmd_<name>.cpp. Only this file catches kiln::Error: it prints the one
// sentence and exits non-zero.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <map>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"

int main(int argc, char** argv) {
    CLI::App app{
        "kiln: pretrain Llama-2-family language models from raw text to a Hugging Face "
        "checkpoint, in one C++ program."};
    app.require_subcommand(1);
    app.set_version_flag("--version", "kiln 0.1.0");
    std::map<CLI::App*, kiln::cli::Action> actions;
    struct Entry {
        const char* name;
        const char* help;
        kiln::cli::Action (*add)(CLI::App&);
    };
    const Entry table[] = {
        {"data", "corpus -> tokenizer -> packed, verified token shards (+ `data verify DIR`)",
         kiln::cli::add_data},
        {"tokenizer", "train a SentencePiece tokenizer, or encode/decode with one",
         kiln::cli::add_tokenizer},
        {"compile",
         "check a config: memory plan per rank, a dry run that fills the plan cache, tokens/s "
         "and time forecast",
         kiln::cli::add_compile},
        {"plan", "forecast memory, step time and MFU of a model on a cluster; pick a layout",
         kiln::cli::add_plan},
        {"train", "pretrain: one process, or one rank of a data/tensor-parallel job",
         kiln::cli::add_train},
        {"launch", "start N local ranks of a command as one gang (distributed training)",
         kiln::cli::add_launch},
        {"eval", "mean loss and perplexity of a checkpoint on a shard folder, as JSON",
         kiln::cli::add_eval},
        {"sample", "generate text from a checkpoint (continues --prompt)", kiln::cli::add_sample},
        {"export", "checkpoint -> Hugging Face folder or llama.cpp GGUF file; --inspect a GGUF",
         kiln::cli::add_export},
        {"serve", "head node: dashboard, jobs API with a gang-admission queue, /metrics (:8265)",
         kiln::cli::add_serve},
        {"submit", "submit a job to the head node (kiln submit -n 2 -- kiln train ...)",
         kiln::cli::add_submit},
        {"status", "jobs on the head node: state, age, run time, why they ended",
         kiln::cli::add_status},
        {"logs", "a job's output (-f follows it until the job ends)", kiln::cli::add_logs},
        {"stop", "stop a job on the head node", kiln::cli::add_stop},
        {"run",
         "the embedded default: built-in stories -> tokenizer -> shards -> tiny -> HF + GGUF",
         kiln::cli::add_run},
    };
    for (const auto& e : table) {
        CLI::App* sub = app.add_subcommand(e.name, e.help);
        actions[sub] = e.add(*sub);
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e);
    } catch (const kiln::Error& e) {
        std::fprintf(stderr, "kiln: %s\n", e.what());
        return 2;
    }
    kiln::log::init(0, kiln::log::Level::info);
    try {
        for (auto& [sub, action] : actions) {
            if (sub->parsed())
                return action();
        }
    } catch (const kiln::Error& e) {
        std::fprintf(stderr, "kiln: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        // A library's own exception (a peer rank's connection dropping, say).
        std::fprintf(stderr, "kiln: stopped: %s\n", e.what());
        return 1;
    }
    return 1;
}
