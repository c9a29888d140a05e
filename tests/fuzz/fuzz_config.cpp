// Fuzzes the config loader as `kiln train --config FILE --check` runs it: a YAML document through
// ConfigSchema::load_yaml_text (nesting, aliases, value counts bounded), applied to the whole
// schema of a run (train::build_schema), then RunConfig::validate's cross-key checks. An accepted
// config must print (to_yaml, the run's config.yaml) as YAML that loads back to the same config.
#include "core/config.h"
#include "fuzz.h"
#include "train/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    using namespace kiln;
    const std::string text(reinterpret_cast<const char*>(data), size);
    train::RunConfig config;
    ConfigSchema schema;
    train::build_schema(schema, config);
    std::string yaml;
    const bool ok = fuzz::accepted([&] {
        schema.load_yaml_text(text, "fuzz.yaml");
        schema.apply();
        config.validate();
        yaml = schema.to_yaml();
    });
    if (!ok)
        return 0;
    train::RunConfig again;
    ConfigSchema reload;
    train::build_schema(reload, again);
    try {
        reload.load_yaml_text(yaml, "config.yaml");
        reload.apply();
        again.validate();
    } catch (const Error& e) {
        fuzz::finding(std::string("the resolved config.yaml does not load back: ") + e.what());
    }
    if (reload.to_yaml() != yaml)
        fuzz::finding("the resolved config.yaml loads back to another config:\n" + yaml);
    return 0;
}
