#pragma once
// A gloo transport for ranks on one host. gloo's own collective algorithms run on it unchanged;
// what differs from gloo's TCP transport is how a message moves between two processes:
//
//   - Control: each ordered pair of ranks has a ring of small messages in memory both processes
//     map (a memfd the receiver makes and the sender opens through /proc/<pid>/fd).
//   - Payload: copied once, process to process, with process_vm_readv/writev. Over TCP loopback
//     every byte is copied twice and walks the TCP stack on cores that are also computing.
//
// gloo has two buffer APIs, and each keeps its contract:
//   - A bound buffer (the original API: a send writes into the peer's receive buffer of the same
//     slot) is complete when send() returns: the receive buffer announced its address when it
//     was made, and the sender copies into it. gloo's halving-doubling reduce-scatter rewrites a
//     sent region before the peer answers, so a later copy would read the rewrite.
//   - An unbound buffer's send announces its address; the receiver copies it once it has posted
//     the matching receive and answers, which completes the send (waitSend).
// Progress is made by whichever thread waits: a waiting rank reads its rings and copies what has
// arrived. A wait that outlasts the context's timeout, or whose peer process has exited, throws
// Error.
#include <gloo/transport/device.h>

#include <memory>
#include <string>

namespace kiln::dist {

class TcpStore;

// Whether every rank of the job can reach every other through this transport: one host, one PID
// namespace, and permission to read each other's memory. Every rank of the job must call it;
// all get the same answer, and `why` the first reason against (empty when reachable). Where
// Yama's ptrace_scope is 1, ranks may read each other only once each has allowed every process
// of its user to (PR_SET_PTRACER_ANY): that is done when `widen_ptrace`, with a warning, and is
// otherwise a reason against.
bool shm_reachable(TcpStore& store, int rank, int size, bool widen_ptrace, std::string* why);

// The device whose contexts connect their pairs through shared memory.
std::shared_ptr<gloo::transport::Device> make_shm_device();

}  // namespace kiln::dist
