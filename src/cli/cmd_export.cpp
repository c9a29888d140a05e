// kiln export --checkpoint DIR --format hf --out DIR [--dtype float32|bfloat16] [--force]
// kiln export --checkpoint DIR --format gguf --out FILE.gguf [--dtype f32|f16|bf16|q8_0] [--force]
// kiln export --inspect FILE.gguf
#include <chrono>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "export/gguf.h"
#include "export/gguf_export.h"
#include "export/hf.h"

namespace kiln::cli {

Action add_export(CLI::App& app) {
    struct Options {
        std::string checkpoint, format = "hf", out, dtype, tokenizer, name, inspect;
        bool force = false;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--checkpoint", o->checkpoint,
                   "checkpoint folder, or a run folder (its latest)");
    app.add_option("--format", o->format, "hf (Hugging Face folder) or gguf (llama.cpp file)")
        ->capture_default_str();
    app.add_option("--out", o->out, "output folder (hf) or file (gguf)");
    app.add_option("--dtype", o->dtype,
                   "hf: float32 (default) or bfloat16; gguf: f32 (default), f16, bf16 or q8_0");
    app.add_option("--tokenizer", o->tokenizer,
                   "tokenizer.model to ship (default: the run's data.tokenizer, where it names "
                   "one)")
        ->check(CLI::ExistingFile);
    app.add_option("--name", o->name, "gguf: general.name (default kiln-<preset>-step<N>)");
    app.add_flag("--force", o->force,
                 "replace existing output files (gguf: the file; hf: the folder's files)");
    app.add_option("--inspect", o->inspect,
                   "check a GGUF file and print its metadata and tensor table");
    return [o] {
        if (!o->inspect.empty()) {
            exporter::GgufFile file(o->inspect);
            std::fputs(exporter::describe(file).c_str(), stdout);
            return 0;
        }
        if (o->checkpoint.empty() || o->out.empty())
            throw error("kiln export needs --checkpoint DIR and --out PATH (or --inspect FILE)");
        const std::string tokenizer =
            o->tokenizer.empty() ? run_data_key(o->checkpoint, "tokenizer") : o->tokenizer;
        if (o->format == "hf") {
            exporter::export_hf(o->checkpoint, o->out, o->dtype.empty() ? "float32" : o->dtype,
                                tokenizer, o->force);
            std::printf("exported %s to %s (model.safetensors, config.json%s)\n",
                        o->checkpoint.c_str(), o->out.c_str(),
                        tokenizer.empty() ? "" : ", the tokenizer");
            return 0;
        }
        if (o->format != "gguf")
            throw error("--format {} is not hf or gguf", o->format);
        exporter::GgufExportOptions g;
        g.dtype = o->dtype.empty() ? "f32" : o->dtype;
        g.tokenizer = tokenizer;
        g.name = o->name;
        g.data_fingerprint = exporter::data_fingerprint(run_data_key(o->checkpoint, "source"));
        g.force = o->force;
        const auto t0 = std::chrono::steady_clock::now();
        exporter::GgufExportResult r = exporter::export_gguf(o->checkpoint, o->out, g);
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("exported %s (step %lld) to %s: %s, %.1f MiB in %.2f s\n",
                    o->checkpoint.c_str(), static_cast<long long>(r.step), o->out.c_str(),
                    g.dtype.c_str(), double(r.bytes) / (1 << 20), seconds);
        return 0;
    };
}

}  // namespace kiln::cli
