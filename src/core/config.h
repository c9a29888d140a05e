#pragma once
// Config mechanism: every key is registered once (name, help, target field, check); the same
// registry drives YAML files, `--set a.b=c`, `--help` and the resolved config.yaml. Unknown keys
// and values that fail their check are errors naming the key, the value and where it came from.
// The schema itself (which keys exist) lives with the modules that own the fields.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace kiln {

// The known key that `key` (unknown) most likely meant, for a "did you mean" hint: one with
// the same last path component, else the nearest within two typing slips; "" when none is.
std::string closest_key(const std::string& key, const std::vector<std::string>& keys);

class ConfigSchema {
public:
    static constexpr size_t kMaxConfigBytes = 1 << 20;  // a config file larger is refused

    using Target = std::variant<int64_t*, double*, std::string*, bool*>;
    // A check returns an empty string when the value is fine, else why it is not.
    using Check = std::function<std::string()>;

    // Registers `key` bound to `target`; the field's current value is the default.
    // `on_set` runs after the key is set (presets use it to fill other fields).
    void add(const std::string& key, Target target, const std::string& help, Check check = {},
             std::function<void()> on_set = {});

    // Keys applied before all others whatever order they come in (e.g. model.preset).
    void set_first(const std::string& key) { first_.push_back(key); }

    // Collects assignments; apply() sets them (first_ keys first, then in given order).
    void load_yaml_file(const std::string& path);
    void load_yaml_text(const std::string& text, const std::string& source);
    void add_override(const std::string& key_equals_value);  // "a.b=c" from --set
    void apply();

    std::string to_yaml() const;  // every key, resolved, as nested YAML
    std::string help() const;     // one line per key: name, default, help
    bool has(const std::string& key) const;
    std::string value_string(const std::string& key) const;

private:
    struct Entry {
        std::string key;
        Target target;
        std::string help;
        std::string default_value;
        Check check;
        std::function<void()> on_set;
    };
    struct Assignment {
        std::string key, value, source;
    };
    const Entry* find(const std::string& key) const;
    void set(const Entry& e, const std::string& value, const std::string& source);

    std::vector<Entry> entries_;
    std::vector<std::string> first_;
    std::vector<Assignment> pending_;
};

std::string format_value(const ConfigSchema::Target& t);

// The common checks, for ConfigSchema::add.
namespace check {
ConfigSchema::Check positive(const int64_t* v);
ConfigSchema::Check positive(const double* v);
ConfigSchema::Check at_least(const int64_t* v, int64_t min);
ConfigSchema::Check non_negative(const int64_t* v);
ConfigSchema::Check non_negative(const double* v);
ConfigSchema::Check unit_interval(const double* v);  // [0, 1)
ConfigSchema::Check one_of(const std::string* v, std::vector<std::string> options);
}  // namespace check

}  // namespace kiln
