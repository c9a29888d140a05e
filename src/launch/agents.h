#pragma once
// The agents of one gang on several hosts (`kiln launch --nnodes N`): each host's agent runs its
// local ranks, and the agents keep each other informed over one TCP connection per host to the
// agent of node 0 (the coordinator, at --master-addr, port --agent-port). Lines of text:
//   member -> coordinator: "hello R", "ready", "beat", "failed WHY", "interrupted WHY",
//                          "done ok" | "done failed"
//   coordinator -> member: "go ATTEMPT", "beat", "stop WHY", "stop! WHY" (interrupted),
//                          "result ok" | "result failed WHY" | "result interrupted WHY"
// Every agent beats once a second; one that hears nothing from the other side for
// --hang-timeout seconds counts it as failed (a host that died or a network partition), stops its
// own ranks, and the gang restarts when every host is back (up to --max-failures times).
#include <memory>
#include <string>

namespace kiln::launch {

struct LaunchOptions;

struct Outcome {
    bool ok = false;
    bool interrupted = false;  // Ctrl-C somewhere: no restart
    std::string reason;        // for !ok: one line
};

class Peers {
public:
    virtual ~Peers() = default;
    // Before each attempt: waits until every host's agent is ready, and returns the attempt
    // number they agree on (the coordinator's). Throws Error when a host does not join in time.
    virtual int begin(int attempt) = 0;
    // While ranks run, called every 100 ms or so: beats, reads the others' news. Returns "" or
    // why this host must stop its ranks (a rank failed elsewhere, or a host went silent).
    virtual std::string poll() = 0;
    virtual bool interrupted() const = 0;  // the reason poll() gave was an interruption
    // This host's ranks failed (or were interrupted): the others must stop theirs.
    virtual void failed(const std::string& why, bool interrupted) = 0;
    // After this host's ranks ended: the whole gang's outcome.
    virtual Outcome end(bool local_ok) = 0;
};

// The coordinator for node 0, a member for the others; nullptr for one host.
std::unique_ptr<Peers> make_peers(const LaunchOptions& o);

}  // namespace kiln::launch
