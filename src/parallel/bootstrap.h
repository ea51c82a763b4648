// Cluster bootstrap: which global ranks and GPUs this node runs, and the 128-byte NCCL
// unique id every rank must share (DESIGN §6: one process per node, one worker thread per
// GPU, NCCL communicators across all).
//
// Single node (nnodes == 1): no network; node 0 makes the id and hands it to its threads.
// Multi-node: a TCP rendezvous. Node 0 listens on master_addr:master_port; every other
// node connects (retrying until the timeout, so start order does not matter) and says
// (nnodes, node_rank, gpus_per_node); when all nnodes have joined, node 0 replies to each
// with the world size, the node's first global rank (nodes in node-rank order, each
// contributing its gpus_per_node ranks) and the unique id. Every failure is an Error that
// says what is wrong and where: cannot connect, no reply, wrong node count, duplicate or
// out-of-range node rank, timeout (naming the nodes that never joined). Node 0 sends its
// error to the nodes already connected, so they fail with the same reason instead of
// waiting.
//
// This file has no CUDA dependency: the id is opaque bytes made by a callback
// (ncclGetUniqueId in nccl_communicator.h).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dsv4::parallel {

struct ClusterSpec {
  int nnodes = 1, node_rank = 0, gpus_per_node = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29533;
};

using UniqueIdBytes = std::array<uint8_t, 128>;  // sizeof(ncclUniqueId)

struct LocalRank {
  int rank = 0;    // global rank
  int device = 0;  // CUDA device ordinal on this node
};

struct ClusterPlan {
  int world_size = 0;
  int rank_offset = 0;            // global rank of this node's first GPU
  std::vector<LocalRank> local;   // this node's ranks, device i -> rank rank_offset + i
  UniqueIdBytes unique_id{};
};

// Blocks until the plan is known or `timeout` passes. make_id is called once, on node 0.
ClusterPlan bootstrap_cluster(const ClusterSpec& spec, const std::function<UniqueIdBytes()>& make_id,
                              std::chrono::milliseconds timeout = std::chrono::milliseconds(120000));

// "node 1 of 2 (8 GPUs, ranks 8..15, master 10.0.0.1:29533)"
std::string describe(const ClusterSpec& spec, const ClusterPlan& plan);

}  // namespace dsv4::parallel
