// The DeepSeek-V4 forward pass (spec §3–§6) written as stage programs over the
// op contracts. Knows nothing of ranks, TBO or the scheduler: it is given a
// micro-batch's buffers, its batch view, the layer caches and a MoE executor.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/moe_executor.h"
#include "model/stage_program.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace dsv4::model {

// Activations of one micro-batch, allocated once at fixed addresses for up to
// `capacity` token rows and `max_logit_rows` logits rows.
struct MicroBatchBuffers {
  int micro_batch = 0;
  int64_t capacity = 0;
  int64_t max_logit_rows = 0;
  core::Tensor X, X_alt;                 // bf16 [cap, hc, D] residual streams (ping-pong)
  core::Tensor x, xn;                    // bf16 [cap, D] hc_pre output, normed
  core::Tensor post, comb;               // f32 [cap, hc], [cap, hc, hc]
  core::Tensor cq_raw, cq;               // bf16 [cap, Rq]
  core::Tensor q;                        // bf16 [cap, H, Dh]
  core::Tensor kv;                       // bf16 [cap, Dh]
  core::Tensor comp_a, comp_g;           // f32 [cap, 2*Dh]
  core::Tensor idx_q;                    // bf16 [cap, Hi, Di]
  core::Tensor idx_w;                    // bf16 [cap, Hi]
  core::Tensor idx_a, idx_g;             // f32 [cap, 2*Di]
  core::Tensor topk;                     // i32 [cap, index_topk]
  core::Tensor attn_o;                   // bf16 [cap, H, Dh]
  core::Tensor z;                        // bf16 [cap, G*Ro]
  core::Tensor attn_out;                 // bf16 [cap, D]
  core::Tensor router_w, router_ids;     // f32 / i32 [cap, k]
  core::Tensor slot_out;                 // bf16 [cap, k, D]
  core::Tensor routed;                   // f32 [cap, D]
  core::Tensor shared_out, moe_out;      // bf16 [cap, D]
  core::Tensor logit_rows;               // i32 [max_logit_rows], rows of the step to take logits from
  core::Tensor head_X;                   // bf16 [max_logit_rows, hc, D]
  core::Tensor head_y, head_yn;          // bf16 [max_logit_rows, D]
  core::Tensor logits;                   // f32 [max_logit_rows, V]
  core::Tensor mtp_embed;                // bf16 [cap, 1, D]
  core::Tensor mtp_e, mtp_e_proj;        // bf16 [cap, D]
  core::Tensor mtp_h, mtp_h_proj;        // bf16 [cap, hc, D]
};

// A model's cache summed over its layers (main, then MTP) in the format `layer_cost` gives
// (ops::fp8_cache_cost: the CUDA backend's, ops::bf16_cache_cost: the CPU's): bytes per
// state slot and per page of kPageTokens tokens. No backend needed: for sizing anywhere.
ops::CacheCost model_cache_cost(const ModelConfig& config, ops::LayerCacheCost layer_cost);
// The same in `backend`'s format; fails on a config that format cannot hold (the loader
// calls it before any weight is read or drawn).
ops::CacheCost model_cache_cost(const ModelConfig& config, const ops::Backend& backend);

class Transformer {
 public:
  Transformer(const ModelConfig& config, const ModelWeights& weights, ops::Backend& backend);

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  ops::Backend& backend() { return backend_; }
  int64_t num_cache_layers() const { return config_.num_layers_with_mtp(); }

  // Per-sequence state of every layer (main layers, then MTP blocks).
  std::vector<ops::LayerCache> allocate_caches(const ops::CacheGeometry& geometry);
  // The bytes allocate_caches takes (the backend's cache_cost over the layers).
  uint64_t cache_bytes(const ops::CacheGeometry& geometry) const;
  std::unique_ptr<MicroBatchBuffers> allocate_buffers(int64_t capacity, int64_t max_logit_rows, int micro_batch);

  // One step of the main model for a micro-batch: embed, every layer, then the
  // logits of the `num_logit_rows` rows listed in buffers.logit_rows. The final
  // hyper-streams of every row stay in buffers.X (the MTP block's input).
  StageProgram step_program(MicroBatchBuffers& buffers, const ops::BatchView& batch, int64_t num_logit_rows,
                            std::vector<ops::LayerCache>& caches, MoeExecutor& moe);

  // The MTP block (spec §3.1): X_main bf16 [T, hc, D] are the main model's final
  // hyper-streams at the batch's positions, `batch.token_ids` the NEXT tokens.
  // Logits of the rows in buffers.logit_rows predict the token after those.
  StageProgram mtp_program(MicroBatchBuffers& buffers, const core::Tensor& X_main, const ops::BatchView& batch,
                           int64_t num_logit_rows, std::vector<ops::LayerCache>& caches, MoeExecutor& moe);

 private:
  // form_input: the previous layer left its FFN output unformed (leave_output), and
  // this layer's first stage forms X from it with its own hc_pre (one op). With
  // leave_output this layer does the same for the next: no ffn_post stage.
  void append_layer(StageProgram& program, MicroBatchBuffers& b, const ops::BatchView& batch,
                    const LayerWeights& w, ops::LayerCache& cache, MoeExecutor& moe, bool form_input,
                    bool leave_output);
  void append_logits(StageProgram& program, MicroBatchBuffers& b, int64_t num_logit_rows, const ops::HcWeights& hc,
                     const core::Tensor& norm, const char* name);

  ModelConfig config_;
  ModelWeights weights_;
  ops::Backend& backend_;
  ops::RopeTable rope_plain_;       // ratio-0 layers and MTP: rope_theta, no YaRN (spec §1.3)
  ops::RopeTable rope_compressed_;  // ratio 4 / 128 layers: compress_rope_theta with YaRN
  ops::HcConfig hc_config_;
  // The layers' hc_pre ops leave comb's Sinkhorn to a stage beside the sublayer
  // (hc_config_ with sinkhorn_later; append_layer says where it runs).
  ops::HcConfig hc_pre_config_;
  ops::RouterConfig router_config_;
  float softmax_scale_ = 0.0f;
  float index_weight_scale_ = 0.0f;
};

}  // namespace dsv4::model
