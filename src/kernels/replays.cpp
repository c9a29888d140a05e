#include "kernels/replays.h"

#include "core/error.h"
#include "core/log.h"

namespace kiln::kernels {

Replays::Replays(const Kernels& k, bool on, bool required)
    : k_(k), on_(on && k.record != nullptr), required_(required) {}

Replays::~Replays() {
    for (auto& [key, e] : entries_) {
        if (e.graph)
            k_.release(e.graph);
    }
}

void Replays::run(int key, const std::function<void()>& work) {
    if (!on_) {
        work();
        return;
    }
    Entry& e = entries_[key];
    if (e.graph) {
        k_.replay(e.graph);
        return;
    }
    if (e.runs++ == 0) {
        work();
        return;
    }
    try {
        e.graph = k_.record(work);
    } catch (const Error& failed) {
        if (required_)
            throw;
        log::warn("kernels", "{}; from now on it runs as called, as with train.graphs=false",
                  failed.what());
        on_ = false;
        work();  // nothing of it ran while it was being recorded
        return;
    }
    k_.replay(e.graph);
}

int Replays::recorded() const {
    int n = 0;
    for (const auto& [key, e] : entries_)
        n += e.graph ? 1 : 0;
    return n;
}

}  // namespace kiln::kernels
