#pragma once
// Where this process sits in the job, from the environment of whatever started it: torchrun's
// convention (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK; also what `kiln launch`
// sets), Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), Open MPI (OMPI_COMM_WORLD_RANK,
// OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK) or a Volcano job (VC_TASK_INDEX with the
// svc plugin's host lists). Explicit torchrun variables win over the others. How many ranks
// share this host comes from LOCAL_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_SIZE, or Slurm's
// SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE (with SLURM_NODEID); a Volcano pod holds one.
#include <map>
#include <string>

namespace kiln::dist {

struct Placement {
    int rank = 0;
    int world_size = 1;
    int local_rank = 0;
    int local_world_size = 1;  // ranks on this host, which share its memory
    std::string master_addr = "127.0.0.1";
    int master_port = 29500;
    std::string source = "default";  // which convention supplied it
    // The network interface gloo's TCP pairs use (GLOO_SOCKET_IFNAME, PyTorch's variable, or
    // parallel.interface); empty: the one whose address routes to master_addr.
    std::string interface;
};

// Reads `env` (the process environment when empty). Throws Error naming the variable at fault.
Placement discover(const std::map<std::string, std::string>& env = {});

// The numeric IPv4 address this rank listens on for its peers: `p.interface`'s, else the local
// address that routes to p.master_addr. Never a host name, since in many containers a host's own
// name does not resolve. Throws Error naming the interface or address at fault.
std::string local_address(const Placement& p);

}  // namespace kiln::dist
