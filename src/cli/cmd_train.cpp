// kiln train [--config FILE.yaml] [--set key=value ...]
#include <memory>

#include "cli/commands.h"
#include "core/log.h"
#include "train/trainer.h"

namespace kiln::cli {

Action add_train(CLI::App& app) {
    struct Options {
        std::string config_file;
        std::vector<std::string> sets;
    };
    auto o = std::make_shared<Options>();
    app.add_option("--config", o->config_file, "YAML file of config keys")
        ->check(CLI::ExistingFile);
    app.add_option("--set", o->sets, "override one key: --set train.lr=3e-4 (repeatable)")
        ->allow_extra_args(false);
    {
        train::RunConfig defaults;
        ConfigSchema schema;
        train::build_schema(schema, defaults);
        app.footer("Config keys (KEY = default):\n" + schema.help());
    }
    return [o] {
        train::RunConfig config;
        ConfigSchema schema;
        train::build_schema(schema, config);
        if (!o->config_file.empty()) schema.load_yaml_file(o->config_file);
        for (const auto& s : o->sets) schema.add_override(s);
        schema.apply();
        config.validate();
        log::init(0, log::parse_level(config.log_level));
        train::TrainResult r = train::train(config, schema.to_yaml());
        std::printf("trained %lld steps: loss %.4f -> %.4f; checkpoint %s\n",
                    static_cast<long long>(r.steps), r.first_loss, r.last_loss,
                    r.checkpoint.c_str());
        return 0;
    };
}

}  // namespace kiln::cli
