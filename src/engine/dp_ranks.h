// The per-rank pieces of a data-parallel, expert-parallel model in one process:
// the communicators (NCCL with rank r on GPU r, or in-process ranks on the CPU)
// and, per rank, a backend, the model with its slice of the routed experts and
// the MoE executor over the group. The serving engine and `bench decode` build
// their runners on top; this is the one place that wires ranks together.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/model_loader.h"
#include "model/moe_executor.h"
#include "ops/backend.h"
#include "parallel/bootstrap.h"
#include "parallel/communicator.h"

namespace dsv4::engine {

enum class MoeMode { kLocal, kAllGather, kAllToAll };
MoeMode parse_moe_mode(const std::string& name);  // "local", "allgather", "alltoall"
const char* moe_mode_name(MoeMode mode);

struct DpRanksOptions {
  int dp = 1;                         // ranks in this process (GPUs of this node)
  MoeMode moe = MoeMode::kAllGather;  // kLocal: every rank holds every expert (pure data parallel)
  std::string backend = "cpu";        // "cpu": in-process ranks; "cuda": rank r on GPU r, NCCL
  int threads_per_rank = 1;           // CPU backend threads
  ops::QuantDotModel cpu_quant_dot = ops::QuantDotModel::kExact;  // CPU backend: how FP8 / FP4 GEMM chunks are summed
  ModelSource source;
  int64_t max_rows = 512;             // rows per rank per step (sizes the MoE exchange buffers)
  parallel::CommOptions comm;
  int nccl_max_ctas = 0;              // 0: NCCL's default
  // Several nodes (CUDA): every node runs this process with its node_rank; node 0
  // hands out the NCCL id over TCP at master_addr:master_port. The world is
  // nnodes * dp ranks, the experts split over all of them.
  int nnodes = 1, node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29533;
};

struct DpRank {
  int index = 0;        // in this process
  int global_rank = 0;  // in the world (== index on one node)
  std::unique_ptr<ops::Backend> backend;
  std::shared_ptr<LoadedModel> model;
  std::unique_ptr<model::MoeExecutor> moe;   // null: every expert local
  parallel::Communicator* comm = nullptr;    // null with dp == 1
};

struct DpRanks {
  model::ModelConfig config;
  int world_size = 1;
  std::vector<std::unique_ptr<parallel::Communicator>> comms;
  std::vector<std::unique_ptr<DpRank>> ranks;
};

// Fails with a message naming the option (dp, backend, GPUs missing).
DpRanks build_dp_ranks(const DpRanksOptions& options);

}  // namespace dsv4::engine
