#pragma once
// Collectives through a shared memory segment, for a group whose ranks all run on one host. The
// payload goes through memory instead of TCP loopback: on this project's 2-core machine one
// core moves about 1 GB/s each way through a loopback socket and 6.7 GB/s through memcpy.
// Results are the same on every rank, bit for bit (every rank sums the contributions in rank
// order), and the same whatever the rank count divides into.
#include <chrono>
#include <memory>
#include <string>

#include "core/collective.h"

namespace kiln::dist {

class TcpStore;

// Connects `size` ranks under `name` through a segment that rank 0 creates and the others
// open, agreed on through `store`. Returns nullptr on every rank of the group when they are not
// all on this host or the segment cannot be made (then the caller uses gloo); the reason is
// logged. A collective whose peers do not arrive within `timeout` throws Error naming them.
// Bytes of the segment a group of `ranks` maps (every rank touches all of it).
size_t shared_memory_bytes(int ranks);

std::unique_ptr<Collective> connect_shared_memory(TcpStore& store, const std::string& name,
                                                  int rank, int size,
                                                  std::chrono::milliseconds timeout);

}  // namespace kiln::dist
