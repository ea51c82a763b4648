// Builds the serving engine the CLI commands run (generate, serve, bench):
// one rank (LocalServingEngine) or data-parallel ranks (DpServingEngine), with
// the pools sized from the request limits or from a cache-memory budget.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "engine/dp_engine.h"
#include "engine/serving_engine.h"
#include "ops/backend.h"

namespace dsv4::engine {

struct EngineBuildOptions {
  ModelSource source;
  std::string backend = "cpu";        // "cpu" or "cuda"
  int threads = 1;                    // CPU backend threads per rank
  // CPU backend: FP8 / FP4 GEMM chunks summed in fp32 (the spec) or as the CUDA backend's FP8 wgmma does.
  ops::QuantDotModel cpu_quant_dot = ops::QuantDotModel::kExact;
  int dp = 1;
  MoeMode moe = MoeMode::kAllGather;  // with dp > 1
  int32_t max_num_seqs = 64;          // per rank
  int32_t max_num_batched_tokens = 512;
  int32_t prefill_chunk = 512;
  int32_t max_model_len = 0;          // 0: min(max_position_embeddings, 32768)
  int64_t kv_cache_pages = 0;         // per rank; 0: from kv_cache_memory, or enough for max_num_seqs full-length
  uint64_t kv_cache_memory = 0;       // per rank, bytes (0: unused)
  // Per rank: the pages that fit in the memory free after the weights and the step's buffers,
  // less kv_cache_reserve (RunnerOptions::cache_pages_from_free_memory), at most enough for
  // max_num_seqs full-length sequences.
  bool kv_cache_memory_auto = false;
  uint64_t kv_cache_reserve = uint64_t(2) << 30;
  bool use_graphs = true;             // decode steps replay CUDA graphs (CUDA backend only)
  // CUDA: before the first request, a prefill step as long as a step and every decode graph
  // (ModelRunner::warm_up), so neither a scratch allocation nor a graph's recording comes
  // between requests, and memory the reserve does not cover fails at start-up.
  bool warm_up = true;
  parallel::CommOptions comm;
  int nccl_max_ctas = 0;              // 0: NCCL's default
  int nnodes = 1, node_rank = 0;      // several nodes (CUDA): node 0 at master_addr:master_port
  std::string master_addr = "127.0.0.1";
  int master_port = 29533;
  bool check_ledger = false;
};

std::unique_ptr<ServingEngine> build_serving_engine(const EngineBuildOptions& options);

}  // namespace dsv4::engine
