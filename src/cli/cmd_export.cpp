// kiln export --checkpoint DIR --format hf --out DIR
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "export/hf.h"

namespace kiln::cli {

Action add_export(CLI::App& app) {
    struct Options {
        std::string checkpoint, format = "hf", out, dtype = "float32", tokenizer;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--checkpoint", o->checkpoint, "checkpoint folder, or a run folder (its latest)")
        ->required();
    app.add_option("--format", o->format, "hf (Hugging Face folder)");
    app.add_option("--out", o->out, "output folder")->required();
    app.add_option("--dtype", o->dtype, "float32 or bfloat16 weights");
    app.add_option("--tokenizer", o->tokenizer, "tokenizer.model to ship in the folder")
        ->check(CLI::ExistingFile);
    return [o] {
        if (o->format != "hf") {
            throw error("--format {}: only hf is available in this build", o->format);
        }
        exporter::export_hf(o->checkpoint, o->out, o->dtype, o->tokenizer);
        std::printf("exported %s to %s (model.safetensors, config.json)\n", o->checkpoint.c_str(),
                    o->out.c_str());
        return 0;
    };
}

}  // namespace kiln::cli
