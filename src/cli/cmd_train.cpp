// kiln train [--config FILE.yaml] [--set key=value ...]
#include <memory>

#include "cli/commands.h"
#include "core/log.h"
#include "train/trainer.h"

namespace kiln::cli {

std::string resolve_config(train::RunConfig& config, const std::string& file,
                           const std::vector<std::string>& sets) {
    ConfigSchema schema;
    train::build_schema(schema, config);
    if (!file.empty())
        schema.load_yaml_file(file);
    for (const auto& s : sets)
        schema.add_override(s);
    schema.apply();
    config.validate();
    log::init(0, log::parse_level(config.log_level));
    return schema.to_yaml();
}

void add_config_options(CLI::App& app, std::string& file, std::vector<std::string>& sets,
                        train::RunConfig defaults) {
    app.add_option("--config", file, "YAML file of config keys")->check(CLI::ExistingFile);
    app.add_option("--set", sets, "override one key: --set train.lr=3e-4 (repeatable)")
        ->allow_extra_args(false);
    ConfigSchema schema;
    train::build_schema(schema, defaults);
    app.footer("Config keys (KEY = default; nested YAML or --set a.b=c):\n" + schema.help());
}

Action add_train(CLI::App& app) {
    struct Options {
        std::string config_file;
        std::vector<std::string> sets;
    };
    auto o = std::make_shared<Options>();
    add_config_options(app, o->config_file, o->sets);
    return [o] {
        train::RunConfig config;
        std::string yaml = resolve_config(config, o->config_file, o->sets);
        train::TrainResult r = train::train(config, yaml);
        std::printf("trained %lld steps: loss %.4f -> %.4f; checkpoint %s\n",
                    static_cast<long long>(r.steps), r.first_loss, r.last_loss,
                    r.checkpoint.c_str());
        return 0;
    };
}

}  // namespace kiln::cli
