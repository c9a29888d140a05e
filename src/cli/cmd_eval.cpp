// kiln eval --checkpoint DIR --data DIR
#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "train/evaluate.h"

namespace kiln::cli {

Action add_eval(CLI::App& app) {
    struct Options {
        std::string checkpoint, data, precision = "auto", backend = "cpu";
        int64_t max_rows = 0, batch = 8;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--checkpoint", o->checkpoint, "checkpoint folder, or a run folder (its latest)")
        ->required();
    app.add_option("--data", o->data, "shard folder made by kiln data")->required();
    app.add_option("--max-rows", o->max_rows, "evaluate at most this many sequences (0: all)");
    app.add_option("--batch", o->batch, "sequences per forward pass")->check(CLI::PositiveNumber);
    add_kernel_options(app, o->precision, o->backend);
    return [o] {
        train::EvalResult r = train::evaluate(o->checkpoint, o->data, o->max_rows, o->precision,
                                              o->batch, o->backend);
        nlohmann::ordered_json j;
        j["loss"] = r.loss;
        j["perplexity"] = std::exp(r.loss);
        j["tokens"] = r.tokens;
        j["rows"] = r.rows;
        std::printf("%s\n", j.dump().c_str());
        return 0;
    };
}

}  // namespace kiln::cli
