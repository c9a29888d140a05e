#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <map>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"

namespace kiln {

std::string format_value(const ConfigSchema::Target& t) {
    return std::visit(
        [](auto* p) -> std::string {
            using T = std::remove_pointer_t<decltype(p)>;
            if constexpr (std::is_same_v<T, std::string>) {
                return *p;
            } else if constexpr (std::is_same_v<T, bool>) {
                return *p ? "true" : "false";
            } else if constexpr (std::is_same_v<T, double>) {
                return fmt::format("{}", *p);
            } else {
                return std::to_string(*p);
            }
        },
        t);
}

void ConfigSchema::add(const std::string& key, Target target, const std::string& help, Check check,
                       std::function<void()> on_set) {
    KILN_CHECK(find(key) == nullptr, "config key {} registered twice", key);
    entries_.push_back(
        {key, target, help, format_value(target), std::move(check), std::move(on_set)});
}

const ConfigSchema::Entry* ConfigSchema::find(const std::string& key) const {
    for (const auto& e : entries_) {
        if (e.key == key)
            return &e;
    }
    return nullptr;
}

bool ConfigSchema::has(const std::string& key) const {
    return find(key) != nullptr;
}

std::string ConfigSchema::value_string(const std::string& key) const {
    const Entry* e = find(key);
    KILN_CHECK(e != nullptr, "unknown config key {}", key);
    return format_value(e->target);
}

namespace {

// Edits (insert, delete, replace one byte) that turn `a` into `b`.
size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<size_t> row(b.size() + 1);
    for (size_t j = 0; j <= b.size(); j++)
        row[j] = j;
    for (size_t i = 1; i <= a.size(); i++) {
        size_t diagonal = row[0];
        row[0] = i;
        for (size_t j = 1; j <= b.size(); j++) {
            const size_t above = row[j];
            row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
            diagonal = above;
        }
    }
    return row[b.size()];
}

}  // namespace

std::string closest_key(const std::string& key, const std::vector<std::string>& keys) {
    // A known key sharing the last path component (a key in the wrong section), if any.
    std::string leaf = key.substr(key.rfind('.') + 1);
    for (const auto& k : keys) {
        if (k.substr(k.rfind('.') + 1) == leaf)
            return k;
    }
    // Else a typo: the nearest key within two edits (one for keys of four bytes or fewer, so
    // that short keys are not suggested for unrelated words).
    const size_t most = key.size() <= 4 ? 1 : 2;
    std::string best;
    size_t best_distance = most + 1;
    for (const auto& k : keys) {
        const size_t d = edit_distance(key, k);
        if (d < best_distance) {
            best = k;
            best_distance = d;
        }
    }
    return best;
}

namespace {

// A key or value from the input, for an error message: bytes below 0x20 (yaml-cpp's message may
// quote a newline or a NUL) are written as \xNN so that the message stays one line, and text
// past 200 bytes is cut (at a character's start) so that it stays short.
std::string printable(const std::string& text) {
    constexpr size_t kMaxBytes = 200;
    std::string out;
    for (size_t i = 0; i < text.size(); i++) {
        const auto u = static_cast<unsigned char>(text[i]);
        if (i >= kMaxBytes && (u & 0xc0) != 0x80)
            return out + "...";
        out += u < 0x20 || u == 0x7f ? fmt::format("\\x{:02x}", u) : std::string(1, text[i]);
    }
    return out;
}

// A config is a few hundred keys two levels deep: deeper nesting, or aliases that expand past
// kMaxValues (a "billion laughs" document), are refused before they cost memory or time.
constexpr int kMaxDepth = 8;
constexpr size_t kMaxValues = 4096;

// Nodes are counted, not only values: aliases of empty maps add no value yet cost a visit each.
void flatten(const YAML::Node& node, const std::string& prefix, const std::string& source,
             std::vector<std::pair<std::string, std::string>>& out, size_t& visited,
             int depth = 0) {
    if (depth > kMaxDepth)
        throw error("{}: key {} nests deeper than {} levels", source, printable(prefix), kMaxDepth);
    if (out.size() > kMaxValues || ++visited > kMaxValues)
        throw error("{} holds more than {} values or sections (aliases that repeat one?)", source,
                    kMaxValues);
    if (node.IsMap()) {
        for (const auto& kv : node) {
            if (!kv.first.IsScalar())
                throw error("{}: a key under {} is not a plain name", source,
                            prefix.empty() ? "the top" : prefix);
            std::string k = kv.first.Scalar();
            flatten(kv.second, prefix.empty() ? k : prefix + "." + k, source, out, visited,
                    depth + 1);
        }
    } else if (node.IsScalar()) {
        out.emplace_back(prefix, node.Scalar());
    } else if (node.IsNull()) {
        throw error("{}: key {} has no value", source, printable(prefix));
    } else {
        throw error("{}: key {} must be a single value, not a list", source, printable(prefix));
    }
}

}  // namespace

void ConfigSchema::load_yaml_text(const std::string& text, const std::string& source) {
    YAML::Node root;
    try {
        root = YAML::Load(text);
    } catch (const YAML::Exception& e) {
        throw error("{} is not valid YAML: {} (line {}, column {})", source, printable(e.msg),
                    e.mark.line + 1, e.mark.column + 1);
    }
    if (root.IsNull())
        return;
    if (!root.IsMap()) {
        throw error("{} must be a mapping of config keys", source);
    }
    std::vector<std::pair<std::string, std::string>> flat;
    size_t visited = 0;
    flatten(root, "", source, flat, visited);
    for (auto& [k, v] : flat)
        pending_.push_back({k, v, source});
}

void ConfigSchema::load_yaml_file(const std::string& path) {
    load_yaml_text(fs::read_file(path, kMaxConfigBytes), path);
}

void ConfigSchema::add_override(const std::string& key_equals_value) {
    auto eq = key_equals_value.find('=');
    if (eq == std::string::npos || eq == 0) {
        throw error("--set {}: expected KEY=VALUE, e.g. --set train.lr=3e-4", key_equals_value);
    }
    pending_.push_back({key_equals_value.substr(0, eq), key_equals_value.substr(eq + 1), "--set"});
}

void ConfigSchema::apply() {
    std::vector<std::string> keys;
    for (const auto& e : entries_)
        keys.push_back(e.key);
    for (const auto& a : pending_) {
        if (find(a.key) == nullptr) {
            std::string hint = closest_key(a.key, keys);
            throw error("{}: unknown config key '{}'{}", a.source, printable(a.key),
                        hint.empty() ? std::string(" (kiln CMD --help lists every key)")
                                     : fmt::format(" (did you mean '{}'?)", hint));
        }
    }
    std::stable_partition(pending_.begin(), pending_.end(), [&](const Assignment& a) {
        return std::find(first_.begin(), first_.end(), a.key) != first_.end();
    });
    for (const auto& a : pending_)
        set(*find(a.key), a.value, a.source);
    pending_.clear();
}

void ConfigSchema::set(const Entry& e, const std::string& value, const std::string& source) {
    auto bad = [&](const char* what) {
        return error("{}: {}={} is not {}", source, e.key, printable(value), what);
    };
    std::visit(
        [&](auto* p) {
            using T = std::remove_pointer_t<decltype(p)>;
            if constexpr (std::is_same_v<T, std::string>) {
                *p = value;
            } else if constexpr (std::is_same_v<T, bool>) {
                if (value == "true" || value == "1" || value == "yes" || value == "on") {
                    *p = true;
                } else if (value == "false" || value == "0" || value == "no" || value == "off") {
                    *p = false;
                } else {
                    throw bad("a boolean (true or false)");
                }
            } else if constexpr (std::is_same_v<T, double>) {
                char* end = nullptr;
                errno = 0;
                double d = std::strtod(value.c_str(), &end);
                if (value.empty() || *end != '\0' || errno != 0 || !std::isfinite(d)) {
                    throw bad("a finite number");
                }
                *p = d;
            } else {
                int64_t v = 0;
                auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
                if (ec != std::errc() || ptr != value.data() + value.size()) {
                    throw bad("an integer");
                }
                *p = v;
            }
        },
        e.target);
    if (e.check) {
        std::string why = e.check();
        if (!why.empty()) {
            throw error("{}: {}={} is invalid: {}", source, e.key, printable(value), why);
        }
    }
    if (e.on_set)
        e.on_set();
}

namespace {

// Keys in registration order, grouped into nested maps by their dotted path. (Children are a
// vector of Tree itself, which may be incomplete here; a pair holding one may not.)
struct Tree {
    std::string name;
    std::vector<std::pair<std::string, std::string>> leaves;
    std::vector<Tree> children;
    std::vector<std::string> order;  // "l:" + leaf or "c:" + child, as first seen

    void insert(const std::string& key, const std::string& value) {
        auto dot = key.find('.');
        if (dot == std::string::npos) {
            leaves.emplace_back(key, value);
            order.push_back("l:" + key);
            return;
        }
        std::string head = key.substr(0, dot);
        for (auto& child : children) {
            if (child.name == head)
                return child.insert(key.substr(dot + 1), value);
        }
        children.emplace_back();
        children.back().name = head;
        order.push_back("c:" + head);
        children.back().insert(key.substr(dot + 1), value);
    }

    void emit(YAML::Emitter& out) const {
        out << YAML::BeginMap;
        for (const auto& o : order) {
            std::string name = o.substr(2);
            out << YAML::Key << name << YAML::Value;
            if (o[0] == 'l') {
                for (const auto& [k, v] : leaves) {
                    if (k == name)
                        out << v;
                }
            } else {
                for (const auto& c : children) {
                    if (c.name == name)
                        c.emit(out);
                }
            }
        }
        out << YAML::EndMap;
    }
};

}  // namespace

std::string ConfigSchema::to_yaml() const {
    Tree root;
    for (const auto& e : entries_)
        root.insert(e.key, format_value(e.target));
    YAML::Emitter out;
    root.emit(out);
    return std::string(out.c_str()) + "\n";
}

std::string ConfigSchema::help() const {
    std::string s;
    size_t width = 0;
    for (const auto& e : entries_)
        width = std::max(width, e.key.size() + e.default_value.size() + 3);
    for (const auto& e : entries_) {
        std::string left = fmt::format("{} = {}", e.key, e.default_value);
        s += fmt::format("  {:<{}}  {}\n", left, width, e.help);
    }
    return s;
}

namespace check {

ConfigSchema::Check positive(const int64_t* v) {
    return [v] { return *v > 0 ? "" : "must be positive"; };
}
ConfigSchema::Check positive(const double* v) {
    return [v] { return *v > 0 ? "" : "must be positive"; };
}
ConfigSchema::Check at_least(const int64_t* v, int64_t min) {
    return [v, min] { return *v >= min ? std::string() : fmt::format("must be at least {}", min); };
}
ConfigSchema::Check non_negative(const int64_t* v) {
    return [v] { return *v >= 0 ? "" : "must be >= 0"; };
}
ConfigSchema::Check non_negative(const double* v) {
    return [v] { return *v >= 0 ? "" : "must be >= 0"; };
}
ConfigSchema::Check unit_interval(const double* v) {
    return [v] { return *v >= 0 && *v < 1 ? "" : "must be in [0, 1)"; };
}
ConfigSchema::Check one_of(const std::string* v, std::vector<std::string> options) {
    return [v, options] {
        for (const auto& o : options) {
            if (*v == o)
                return std::string();
        }
        std::string list;
        for (const auto& o : options)
            list += (list.empty() ? "" : ", ") + o;
        return "must be one of " + list;
    };
}

}  // namespace check
}  // namespace kiln
