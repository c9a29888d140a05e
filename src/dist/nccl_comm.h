#pragma once
// The NCCL backend of Collective, for device (CUDA) buffers; built only with CUDA. Its ranks
// meet through the same TCP store as gloo's: rank 0 of the group publishes NCCL's unique id.
#include <chrono>
#include <memory>
#include <string>

#include "core/collective.h"

namespace kiln::dist {

class TcpStore;

// Connects `size` ranks under `name` (one device each: the current CUDA device). Every call of
// the returned Collective takes device pointers, starts once the device work queued before it
// on this process's blocking streams (the kernel table's) is done, and returns when the
// operation is complete.
// An operation not done after `timeout` (a peer stopped), or one NCCL reports failed, is an
// Error; the communicator is then aborted, not waited for, when destroyed.
std::unique_ptr<Collective> connect_nccl(TcpStore& store, const std::string& name, int rank,
                                         int size, std::chrono::milliseconds timeout);

}  // namespace kiln::dist
