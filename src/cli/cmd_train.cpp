// kiln train [--config FILE.yaml] [--set key=value ...]
#include <cmath>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "train/trainer.h"

namespace kiln::cli {

std::string resolve_config(train::RunConfig& config, const ConfigOptions& options,
                           bool for_this_machine) {
    ConfigSchema schema;
    train::build_schema(schema, config);
    if (!options.file.empty())
        schema.load_yaml_file(options.file);
    for (const auto& s : options.sets)
        schema.add_override(s);
    schema.apply();
    config.validate();
    if (for_this_machine)
        config.resolve();
    log::init(0, log::parse_level(config.log_level));
    return schema.to_yaml();
}

void add_config_options(CLI::App& app, ConfigOptions& options, train::RunConfig defaults) {
    app.add_option("--config", options.file, "YAML file of config keys")->check(CLI::ExistingFile);
    app.add_option("--set", options.sets, "override one key: --set train.lr=3e-4 (repeatable)")
        ->allow_extra_args(false);
    app.add_flag("--check", options.check,
                 "check the config, print it resolved (every key), and stop");
    ConfigSchema schema;
    train::build_schema(schema, defaults);
    app.footer("Config keys (KEY = default; nested YAML or --set a.b=c):\n" + schema.help());
}

void add_kernel_options(CLI::App& app, std::string& precision, std::string& backend) {
    app.add_option("--precision", precision,
                   "matrix products: auto (bf16 where the CPU has native bf16), bf16, fp32")
        ->check(CLI::IsMember({"auto", "fp32", "bf16"}))
        ->capture_default_str();
    app.add_option("--backend", backend,
                   "kernels: cpu, or cuda (GPU 0 of those CUDA_VISIBLE_DEVICES shows); any "
                   "checkpoint, whatever backend trained it")
        ->check(CLI::IsMember({"cpu", "cuda"}))
        ->capture_default_str();
}

void check_flag(const std::string& flag, double value, double lo, double hi,
                const std::string& expected) {
    if (!(std::isfinite(value) && value >= lo && value <= hi))
        throw error("{} {} is not {}", flag, value, expected);
}

bool checked_only(const ConfigOptions& options, const std::string& yaml) {
    if (options.check)
        std::printf("%s", yaml.c_str());
    return options.check;
}

// The CUDA backend's switches that are not config keys: they pick an implementation or a
// diagnosis, not what is trained.
constexpr const char* kCudaEnvironment =
    "\nEnvironment, with train.backend=cuda:\n"
    "  KILN_CUDA_ATTENTION=cudnn  fused bf16 attention through cuDNN 9 (loaded when asked for; a "
    "shape it refuses runs kiln's own kernels, said in the log) instead of kiln's own kernels "
    "(kiln, the default)\n"
    "  KILN_CUDA_PROFILE=FILE     each op's device time, summed per op into FILE\n"
    "  KILN_CUDA_SYNC=1           wait after every kernel, to name the op whose kernel failed\n";

Action add_train(CLI::App& app) {
    auto o = std::make_shared<ConfigOptions>();
    add_config_options(app, *o);
    app.footer(app.get_footer() + kCudaEnvironment);
    return [o] {
        train::RunConfig config;
        std::string yaml = resolve_config(config, *o);
        if (checked_only(*o, yaml))
            return 0;
        train::TrainResult r = train::train(config, yaml);
        if (r.already_finished) {
            std::printf(
                "nothing to train: %s is already at step %lld = train.steps; checkpoint %s "
                "(raise train.steps to train further)\n",
                r.run_dir.c_str(), static_cast<long long>(r.steps), r.checkpoint.c_str());
            return 0;
        }
        const std::string kept = r.checkpoint.empty() ? "no checkpoint (train.checkpoint_every=-1)"
                                                      : "checkpoint " + r.checkpoint;
        std::printf("trained %lld steps: loss %.4f -> %.4f; %s\n", static_cast<long long>(r.steps),
                    r.first_loss, r.last_loss, kept.c_str());
        return 0;
    };
}

}  // namespace kiln::cli
