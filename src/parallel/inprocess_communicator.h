// Ranks as threads of one process: the communicator of the CPU backend and of CI.
//
// Every call is a rendezvous of all ranks (a mutex, a condition variable and
// wait_for(timeout)). The last rank to arrive validates that all ranks issued the same
// call, then performs the whole collective for everyone while the others are still
// blocked (so every buffer is alive), and releases them. Consequences:
//  - What NCCL would also run is accepted, what would hang or corrupt memory in NCCL is
//    rejected at once with a message naming every rank's call: a different op, a
//    different byte count, an all_to_all pair whose send and recv counts disagree, a
//    reduce_scatter with different dtype or op. Same bytes with a different dtype or
//    element count is moved (as NCCL would move it); the collective ledger catches that.
//  - reduce_scatter and all_reduce_host reduce in fixed rank order 0, 1, ..., world-1,
//    accumulating in f32 (int64 for host values) and rounding to bf16 once at the end:
//    results are deterministic and independent of thread timing. (NCCL's order depends on
//    its algorithm and it rounds bf16 per step, so the last bits may differ from NCCL.)
//  - A rank that stops participating makes the waiting ranks fail after
//    CommOptions::timeout with "rank 0: all_gather #17 (4096 bytes) timed out after
//    300 ms waiting for rank 1 (its last call: barrier #16)"; the group is then failed,
//    so every pending and later call on every rank throws with that reason.
#pragma once

#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace dsv4::parallel {

// world communicators, one per rank (index = rank), sharing one group. Hand each to its
// own thread (run_rank_threads does this and propagates exceptions as aborts).
std::vector<std::unique_ptr<Communicator>> make_inprocess_group(int world, CommOptions options = {});

}  // namespace dsv4::parallel
