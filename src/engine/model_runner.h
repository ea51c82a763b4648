// Runs steps of the model on one rank: owns the layer caches, one micro-batch's
// buffers and the device copy of the step metadata (at fixed addresses).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/step_metadata.h"
#include "model/moe_executor.h"
#include "model/transformer.h"
#include "ops/backend.h"

namespace dsv4::engine {

struct RunnerOptions {
  int32_t max_tokens_per_step = 512;
  int32_t max_seqs_per_step = 64;
  int32_t max_logit_rows = 64;
  int32_t max_blocks_per_seq = 16;   // pages per sequence: max context = 256 * this
  ops::CacheGeometry cache;          // num_slots, num_pages (window/dims filled from the config)
};

class ModelRunner {
 public:
  // `moe` may be null: every expert is local.
  ModelRunner(const model::ModelConfig& config, const model::ModelWeights& weights, ops::Backend& backend,
              const RunnerOptions& options, model::MoeExecutor* moe = nullptr);

  const RunnerOptions& options() const { return options_; }
  model::Transformer& model() { return *model_; }
  ops::Backend& backend() { return backend_; }

  // One main-model step. `logits` receives [meta.logit_rows.size(), V] floats;
  // `hidden`, if given, the final hyper-streams of every row (bf16 bits, [T, hc, D]).
  void step(const StepMetadata& meta, std::vector<float>* logits, std::vector<uint16_t>* hidden = nullptr);
  // One MTP-block step: meta.token_ids are the NEXT tokens, `hidden` the main
  // model's final hyper-streams at meta's rows.
  void mtp_step(const StepMetadata& meta, const std::vector<uint16_t>& hidden, std::vector<float>* logits);

 private:
  ops::BatchView upload_metadata(const StepMetadata& meta);
  void download_logits(int64_t rows, std::vector<float>* logits);

  model::ModelConfig config_;
  ops::Backend& backend_;
  RunnerOptions options_;
  std::unique_ptr<model::Transformer> model_;
  std::unique_ptr<model::LocalMoeExecutor> local_moe_;
  model::MoeExecutor* moe_;
  std::vector<ops::LayerCache> caches_;
  std::unique_ptr<model::MicroBatchBuffers> buffers_;
  core::Tensor mtp_input_;
  // Step metadata on the device.
  core::Tensor token_ids_, positions_, token_seq_, seq_begin_, seq_len_, seq_start_pos_, seq_slot_, block_table_;
};

}  // namespace dsv4::engine
