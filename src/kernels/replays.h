#pragma once
// Device work replayed from one recording (Kernels::record), so that a step's thousands of
// launches cost the host one. The caller names each piece of work by a key; the work must queue
// the same ops with the same pointers, sizes and scalars every time it runs under that key, and
// change nothing on the host that matters after it: a replay runs none of the caller's code, and
// a recording that fails runs the work again, as called.
//
// The first run of a key runs the work as it is: first uses set up what they need (a product's
// plan, a kernel's attributes) outside any recording. The second records it and replays the
// recording; later runs replay it. Where the table records nothing (the host tables), or
// recording is off, every run is the work itself.
#include <functional>
#include <map>

#include "kernels/table.h"

namespace kiln::kernels {

class Replays {
public:
    // `required`: a recording that fails is an Error; otherwise it is logged once and the work
    // runs unrecorded from then on.
    Replays(const Kernels& k, bool on, bool required);
    ~Replays();
    Replays(const Replays&) = delete;
    Replays& operator=(const Replays&) = delete;

    void run(int key, const std::function<void()>& work);
    bool on() const { return on_; }  // false: run() is the work itself
    int recorded() const;            // keys replayed from a recording

private:
    struct Entry {
        int runs = 0;
        void* graph = nullptr;
    };
    const Kernels& k_;
    bool on_;
    const bool required_;
    std::map<int, Entry> entries_;
};

}  // namespace kiln::kernels
