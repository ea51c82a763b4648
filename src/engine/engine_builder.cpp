#include "engine/engine_builder.h"

#include <algorithm>

#include "core/error.h"
#include "engine/kv_pool.h"

namespace dsv4::engine {

std::unique_ptr<ServingEngine> build_serving_engine(const EngineBuildOptions& o) {
  const model::ModelConfig config = source_config(o.source);
  SchedulerConfig sc;
  sc.max_num_seqs = o.max_num_seqs;
  sc.max_num_batched_tokens = o.max_num_batched_tokens;
  sc.prefill_chunk = std::min(o.prefill_chunk, o.max_num_batched_tokens);
  sc.max_model_len = o.max_model_len > 0 ? o.max_model_len
                                         : int32_t(std::min<int64_t>(config.max_position_embeddings, 32768));
  if (sc.max_model_len > config.max_position_embeddings)
    core::fail("--max-model-len {} exceeds the model's max_position_embeddings {}", sc.max_model_len,
               config.max_position_embeddings);

  RunnerOptions ro;
  ro.max_tokens_per_step = o.max_num_batched_tokens;
  ro.max_seqs_per_step = o.max_num_seqs;
  // A row for each sequence, and up to a prompt chunk (at most 256 rows, 0.5 MB each at a
  // 129,280-token vocabulary) for prompts being scored (prompt log-probabilities).
  ro.max_logit_rows = std::max(o.max_num_seqs, std::min(sc.prefill_chunk, 256));
  sc.max_logit_rows = ro.max_logit_rows;
  ro.max_blocks_per_seq = pages_for_positions(sc.max_model_len);
  ro.cache.num_slots = o.max_num_seqs;
  ro.use_graphs = o.use_graphs && o.backend == "cuda";
  int64_t pages = o.kv_cache_pages;
  if (o.kv_cache_memory_auto) {
    DSV4_CHECK(pages == 0 && o.kv_cache_memory == 0, "kv_cache_memory_auto takes no page count or size");
    if (o.backend == "cpu" && o.dp > 1)
      core::fail("--kv-cache-memory auto sizes a rank's pool from its device's free memory, and in-process CPU ranks "
                 "share the host's: give --kv-cache-memory SIZE (per rank) or --kv-cache-pages");
    ro.cache_pages_from_free_memory = true;
    ro.cache_memory_reserve = o.kv_cache_reserve;
  } else if (pages == 0 && o.kv_cache_memory > 0) {
    // Bytes per page and per slot summed over the layers, in the backend's format.
    const ops::CacheCost cost = model::model_cache_cost(config, ops::cache_cost_of_backend(o.backend));
    const int64_t per_page = cost.per_page, per_slot = cost.per_slot;
    const int64_t budget = int64_t(o.kv_cache_memory) - per_slot * (o.max_num_seqs + 1);
    if (budget <= 0 || per_page == 0)
      core::fail("--kv-cache-memory {} bytes does not even hold the {} state slots ({} bytes each)", o.kv_cache_memory,
                 o.max_num_seqs, per_slot);
    pages = budget / per_page;
  }
  if (pages == 0) pages = int64_t(o.max_num_seqs) * ro.max_blocks_per_seq;
  ro.cache.num_pages = pages;

  DpEngineOptions dp;
  dp.ranks.dp = o.dp;
  dp.ranks.moe = o.moe;
  dp.ranks.backend = o.backend;
  dp.ranks.threads_per_rank = o.threads;
  dp.ranks.cpu_quant_dot = o.cpu_quant_dot;
  dp.ranks.source = o.source;
  dp.ranks.comm = o.comm;
  dp.ranks.nccl_max_ctas = o.nccl_max_ctas;
  dp.ranks.nnodes = o.nnodes;
  dp.ranks.node_rank = o.node_rank;
  dp.ranks.master_addr = o.master_addr;
  dp.ranks.master_port = o.master_port;
  dp.scheduler = sc;
  dp.runner = ro;
  dp.eos_token_id = int32_t(config.eos_token_id);
  dp.check_ledger = o.check_ledger;
  dp.warm_up = o.warm_up && o.backend == "cuda";
  if (o.dp == 1 && o.nnodes == 1) {
    auto backend = o.backend == "cuda" ? ops::make_cuda_backend(0) : ops::make_cpu_backend(o.threads, o.cpu_quant_dot);
    auto loaded = load_model(o.source, *backend);
    // The runner keeps references to the backend and the weights: own them together.
    struct Owned {
      std::unique_ptr<ops::Backend> backend;
      std::shared_ptr<LoadedModel> model;
    };
    auto owned = std::make_shared<Owned>(Owned{std::move(backend), loaded});
    auto runner = std::shared_ptr<ModelRunner>(
        new ModelRunner(loaded->config, loaded->weights, *owned->backend, ro), [owned](ModelRunner* r) { delete r; });
    return std::make_unique<LocalServingEngine>(runner, sc, dp.eos_token_id, dp.warm_up);
  }
  return std::make_unique<DpServingEngine>(dp);
}

}  // namespace dsv4::engine
