#include "model/transformer.h"

#include <cmath>

#include <fmt/format.h>

#include "core/error.h"

namespace dsv4::model {

using core::DType;
using core::Tensor;

namespace {

ops::RopeTable make_rope(ops::Backend& backend, const ModelConfig& c, bool compressed) {
  const auto& y = c.rope_scaling;
  std::vector<float> f = compressed ? ops::rope_inv_freq(c.qk_rope_head_dim, c.compress_rope_theta, true, y.factor,
                                                         y.original_max_position_embeddings, y.beta_fast, y.beta_slow)
                                    : ops::rope_inv_freq(c.qk_rope_head_dim, c.rope_theta, false, 0, 0, 0, 0);
  ops::RopeTable t;
  t.rope_dim = c.qk_rope_head_dim;
  t.inv_freq = backend.empty(DType::kF32, {int64_t(f.size())});
  backend.upload(t.inv_freq, f.data(), f.size() * sizeof(float));
  return t;
}

ops::ScoringFunc scoring(const std::string& name) {
  if (name == "sigmoid") return ops::ScoringFunc::kSigmoid;
  if (name == "softmax") return ops::ScoringFunc::kSoftmax;
  return ops::ScoringFunc::kSqrtSoftplus;
}

}  // namespace

Transformer::Transformer(const ModelConfig& config, const ModelWeights& weights, ops::Backend& backend)
    : config_(config), weights_(weights), backend_(backend) {
  rope_plain_ = make_rope(backend, config, false);
  rope_compressed_ = make_rope(backend, config, true);
  hc_config_.hc_mult = config.hc_mult;
  hc_config_.sinkhorn_iters = config.hc_sinkhorn_iters;
  hc_config_.hc_eps = float(config.hc_eps);
  hc_config_.norm_eps = float(config.rms_norm_eps);
  hc_pre_config_ = hc_config_;
  hc_pre_config_.sinkhorn_later = true;
  router_config_.scoring = scoring(config.scoring_func);
  router_config_.topk = config.num_experts_per_tok;
  router_config_.route_scale = float(config.routed_scaling_factor);
  router_config_.normalize = config.scoring_func != "softmax";
  softmax_scale_ = float(std::pow(double(config.head_dim), -0.5));
  // weights_proj output times Di^-1/2 * Hi^-1/2 (spec §5.4), a python double in the reference.
  index_weight_scale_ = float(std::pow(double(config.index_head_dim), -0.5) * std::pow(double(config.index_n_heads), -0.5));
}

std::vector<ops::LayerCache> Transformer::allocate_caches(const ops::CacheGeometry& geometry) {
  std::vector<ops::LayerCache> caches;
  for (int64_t l = 0; l < num_cache_layers(); ++l)
    caches.push_back(backend_.allocate_cache(geometry, config_.compress_ratio(l)));
  return caches;
}

namespace {
template <class LayerCost>
ops::CacheCost sum_layer_costs(const ModelConfig& config, const LayerCost& layer_cost) {
  ops::CacheGeometry g{1, 1, config.sliding_window, config.head_dim, config.index_head_dim};
  g.rope_dim = config.qk_rope_head_dim;
  ops::CacheCost sum;
  for (int64_t l = 0; l < config.num_layers_with_mtp(); ++l) {
    const ops::CacheCost c = layer_cost(g, config.compress_ratio(l));
    sum.per_slot += c.per_slot;
    sum.per_page += c.per_page;
  }
  return sum;
}
}  // namespace

ops::CacheCost model_cache_cost(const ModelConfig& config, ops::LayerCacheCost layer_cost) {
  return sum_layer_costs(config, layer_cost);
}

ops::CacheCost model_cache_cost(const ModelConfig& config, const ops::Backend& backend) {
  return sum_layer_costs(config,
                         [&](const ops::CacheGeometry& g, int64_t ratio) { return backend.cache_cost(g, ratio); });
}

uint64_t Transformer::cache_bytes(const ops::CacheGeometry& geometry) const {
  uint64_t bytes = 0;
  for (int64_t l = 0; l < num_cache_layers(); ++l) {
    const auto cost = backend_.cache_cost(geometry, config_.compress_ratio(l));
    bytes += uint64_t(cost.per_slot) * uint64_t(geometry.num_slots) +
             uint64_t(cost.per_page) * uint64_t(geometry.num_pages);
  }
  return bytes;
}

std::unique_ptr<MicroBatchBuffers> Transformer::allocate_buffers(int64_t cap, int64_t max_logit_rows, int micro_batch) {
  const ModelConfig& c = config_;
  auto& be = backend_;
  const int64_t D = c.hidden_size, hc = c.hc_mult, H = c.num_attention_heads, Dh = c.head_dim;
  const int64_t k = c.num_experts_per_tok, Hi = c.index_n_heads, Di = c.index_head_dim;
  auto b = std::make_unique<MicroBatchBuffers>();
  b->micro_batch = micro_batch;
  b->capacity = cap;
  b->max_logit_rows = max_logit_rows;
  b->X = be.empty(DType::kBF16, {cap, hc, D});
  b->X_alt = be.empty(DType::kBF16, {cap, hc, D});
  b->x = be.empty(DType::kBF16, {cap, D});
  b->xn = be.empty(DType::kBF16, {cap, D});
  b->post = be.empty(DType::kF32, {cap, hc});
  b->comb = be.empty(DType::kF32, {cap, hc, hc});
  b->cq_raw = be.empty(DType::kBF16, {cap, c.q_lora_rank});
  b->cq = be.empty(DType::kBF16, {cap, c.q_lora_rank});
  b->q = be.empty(DType::kBF16, {cap, H, Dh});
  b->kv = be.empty(DType::kBF16, {cap, Dh});
  b->comp_a = be.empty(DType::kF32, {cap, 2 * Dh});
  b->comp_g = be.empty(DType::kF32, {cap, 2 * Dh});
  b->idx_q = be.empty(DType::kBF16, {cap, Hi, Di});
  b->idx_w = be.empty(DType::kBF16, {cap, Hi});
  b->idx_a = be.empty(DType::kF32, {cap, 2 * Di});
  b->idx_g = be.empty(DType::kF32, {cap, 2 * Di});
  b->topk = be.empty(DType::kI32, {cap, c.index_topk});
  b->attn_o = be.empty(DType::kBF16, {cap, H, Dh});
  b->z = be.empty(DType::kBF16, {cap, c.o_groups * c.o_lora_rank});
  b->attn_out = be.empty(DType::kBF16, {cap, D});
  b->router_w = be.empty(DType::kF32, {cap, k});
  b->router_ids = be.empty(DType::kI32, {cap, k});
  b->slot_out = be.empty(DType::kBF16, {cap, k, D});
  b->routed = be.empty(DType::kF32, {cap, D});
  b->shared_out = be.empty(DType::kBF16, {cap, D});
  b->moe_out = be.empty(DType::kBF16, {cap, D});
  b->logit_rows = be.empty(DType::kI32, {max_logit_rows});
  b->head_X = be.empty(DType::kBF16, {max_logit_rows, hc, D});
  b->head_y = be.empty(DType::kBF16, {max_logit_rows, D});
  b->head_yn = be.empty(DType::kBF16, {max_logit_rows, D});
  b->logits = be.empty(DType::kF32, {max_logit_rows, c.vocab_size});
  if (c.num_nextn_predict_layers > 0) {
    b->mtp_embed = be.empty(DType::kBF16, {cap, 1, D});
    b->mtp_e = be.empty(DType::kBF16, {cap, D});
    b->mtp_e_proj = be.empty(DType::kBF16, {cap, D});
    b->mtp_h = be.empty(DType::kBF16, {cap, hc, D});
    b->mtp_h_proj = be.empty(DType::kBF16, {cap, hc, D});
  }
  return b;
}

void Transformer::append_layer(StageProgram& program, MicroBatchBuffers& b, const ops::BatchView& batch,
                               const LayerWeights& w, ops::LayerCache& cache, MoeExecutor& moe, bool form_input,
                               bool leave_output) {
  const ModelConfig& c = config_;
  const int64_t T = batch.num_tokens;
  DSV4_CHECK(T <= b.capacity, "micro-batch {} has {} rows, capacity {}", b.micro_batch, T, b.capacity);
  const int64_t Dh = c.head_dim, H = c.num_attention_heads;
  const ops::RopeTable& rope = w.ratio > 0 ? rope_compressed_ : rope_plain_;
  const float eps = float(c.rms_norm_eps);
  auto& be = backend_;
  // Row views of this step's size.
  Tensor X = b.X.rows(0, T), X_alt = b.X_alt.rows(0, T), x = b.x.rows(0, T), xn = b.xn.rows(0, T);
  Tensor post = b.post.rows(0, T), comb = b.comb.rows(0, T), cq_raw = b.cq_raw.rows(0, T), cq = b.cq.rows(0, T);
  Tensor q = b.q.rows(0, T), kv = b.kv.rows(0, T), attn_o = b.attn_o.rows(0, T), z = b.z.rows(0, T);
  Tensor attn_out = b.attn_out.rows(0, T), topk = b.topk.rows(0, T);
  Tensor routed = b.routed.rows(0, T), shared_out = b.shared_out.rows(0, T), moe_out = b.moe_out.rows(0, T);
  const std::string L = fmt::format("L{}", w.index);

  // The attention's stages (spec §5.1–§5.6). Each declares the buffers it reads and
  // writes, the cache by part, so that stages that do not depend on each other can
  // run at once (engine/stage_lanes.h) and two micro-batches can interleave (TBO):
  // the q path, the indexer, the KV row and the compressor each need only attn_in.
  const BufferRef cache_window{"cache.window", cache.window.data()};
  const BufferRef cache_rows{"cache.rows", cache.rows.data()};
  const BufferRef cache_index_rows{"cache.index_rows", cache.index_rows.data()};
  const BufferRef cache_states[4] = {{"cache.kv_state", cache.kv_state.data()},
                                     {"cache.score_state", cache.score_state.data()},
                                     {"cache.index_kv_state", cache.index_kv_state.data()},
                                     {"cache.index_score_state", cache.index_score_state.data()}};
  const int64_t Hi = c.index_n_heads, Di = c.index_head_dim;
  const bool csa = w.ratio == 4;  // the indexer's layers
  Tensor iq = csa ? b.idx_q.rows(0, T) : Tensor();
  Tensor iw = csa ? b.idx_w.rows(0, T) : Tensor(), ia = csa ? b.idx_a.rows(0, T) : Tensor();
  Tensor ig = csa ? b.idx_g.rows(0, T) : Tensor();

  // hc_pre, then the projections of xn that the q path and the KV row need. Linears
  // of one input go in pairs (one activation quantization, one launch where the
  // backend can): q_a with kv, q_b with the indexer's q, wkv with wgate. A norm and
  // the linears after it are one op (the backend may quantize as it normalizes).
  // form_input: X is first formed from the previous layer's FFN output (its
  // moe_output and hc_post, spec §4.2), in the same op.
  // slots_in: the previous layer's MoE left its routed sum to this op (MoeStageIo::leave_slots).
  if (form_input) {
    const bool slots_in = moe.leaves_slots();
    std::vector<BufferRef> reads = {{"shared_out", b.shared_out.data()},
                                    {"X_alt", b.X_alt.data()},
                                    {"post", b.post.data()},
                                    {"comb", b.comb.data()}};
    std::vector<BufferRef> writes = {{"moe_out", b.moe_out.data()}, {"X", b.X.data()},   {"x", b.x.data()},
                                     {"xn", b.xn.data()},           {"post", b.post.data()}, {"comb", b.comb.data()},
                                     {"cq_raw", b.cq_raw.data()},   {"kv", b.kv.data()}};
    if (slots_in) {
      reads.push_back({"slot_out", b.slot_out.data()});
      reads.push_back({"router_ids", b.router_ids.data()});
      writes.push_back({"routed", b.routed.data()});  // (the op's scratch)
    } else {
      reads.push_back({"routed", b.routed.data()});
    }
    const Tensor slot_out = b.slot_out.rows(0, T), ids = b.router_ids.rows(0, T);
    program.push_back(Stage{
        L + ".attn_in", StageKind::kCompute, std::move(reads), std::move(writes),
        [&be, &w, this, X, X_alt, x, xn, post, comb, cq_raw, kv, routed, shared_out, moe_out, slot_out, ids, slots_in,
         eps] {
          const auto ffn_out =
              slots_in ? ops::HcPostInput::of_moe_slots(slot_out, ids, routed, shared_out, moe_out, X_alt, post, comb)
                       : ops::HcPostInput::of_moe_output(routed, shared_out, moe_out, X_alt, post, comb);
          be.hc_post_pre_norm_linear_pair(ffn_out, X, w.hc_attn, hc_pre_config_, w.attn_norm, eps, x, xn, post, comb,
                                          w.wq_a, cq_raw, w.wkv, kv);
        }});
  } else {
    program.push_back(Stage{
        L + ".attn_in", StageKind::kCompute, {{"X", b.X.data()}},
        {{"x", b.x.data()}, {"xn", b.xn.data()}, {"post", b.post.data()}, {"comb", b.comb.data()},
         {"cq_raw", b.cq_raw.data()}, {"kv", b.kv.data()}},
        [&be, &w, this, X, x, xn, post, comb, cq_raw, kv, eps] {
          be.hc_pre_norm_linear_pair(X, w.hc_attn, hc_pre_config_, w.attn_norm, eps, x, xn, post, comb, w.wq_a, cq_raw,
                                     w.wkv, kv);
        }});
  }
  // q (and the indexer's q): norm, q_b; the indexer's RoPE. The main q's norm and
  // RoPE: here, or (CSA) a stage of their own beside the indexer's top-k.
  program.push_back(Stage{
      L + ".attn_q", StageKind::kCompute, {{"cq_raw", b.cq_raw.data()}},
      {{"cq", b.cq.data()}, {"q", b.q.data()}, {"idx_q", iq.data()}},
      [&be, &w, batch, cq_raw, cq, q, iq, rope, eps, T, Dh, H, Hi, Di, csa] {
        if (csa) {
          be.rms_norm_linear_pair(cq_raw, w.q_norm, eps, cq, w.wq_b, q.reshape({T, H * Dh}), w.index_wq_b,
                                  iq.reshape({T, Hi * Di}));
          be.indexer_q(iq, batch, rope);
        } else {
          be.rms_norm_linear(cq_raw, w.q_norm, eps, cq, w.wq_b, q.reshape({T, H * Dh}));
          be.q_norm_rope(q, batch, rope, eps);
        }
      }});
  if (csa) {
    // The indexer's compressor and weights, then its top-k (which needs the q path).
    program.push_back(Stage{
        L + ".index_in", StageKind::kCompute, {{"xn", b.xn.data()}},
        {{"idx_w", iw.data()}, {"idx_a", ia.data()}, {"idx_g", ig.data()}, cache_index_rows, cache_states[2],
         cache_states[3]},
        [&be, &w, &cache, batch, xn, iw, ia, ig, rope, eps] {
          be.linear_bf16(xn, w.index_weights_proj, iw);
          be.linear_bf16_pair(xn, w.index_compressor.wkv, ia, w.index_compressor.wgate, ig);
          be.compress(ia, ig, w.index_compressor, batch, rope, eps, cache);
        }});
  }
  if (w.ratio > 0) {
    const int64_t width = w.compressor.width();
    Tensor a = b.comp_a.rows(0, T).reshape({T * 2 * Dh}).rows(0, T * width).reshape({T, width});
    Tensor g = b.comp_g.rows(0, T).reshape({T * 2 * Dh}).rows(0, T * width).reshape({T, width});
    program.push_back(Stage{
        L + ".compress", StageKind::kCompute, {{"xn", b.xn.data()}},
        {{"comp_a", b.comp_a.data()}, {"comp_g", b.comp_g.data()}, cache_rows, cache_states[0], cache_states[1]},
        [&be, &w, &cache, batch, xn, a, g, rope, eps] {
          be.linear_bf16_pair(xn, w.compressor.wkv, a, w.compressor.wgate, g);
          be.compress(a, g, w.compressor, batch, rope, eps, cache);
        }});
  }

  // The KV row: norm, RoPE, FP8 quantization (written to the window after attention);
  // then the Sinkhorn of comb, which attn_in left for later (hc_pre_config_): only
  // attn_out's hc_post reads comb. Both need only attn_in; in one stage, attention's
  // wait for this lane covers the Sinkhorn too (a stage of its own on another lane would
  // add a join at attn_out's first GEMM: a fork edge to it and one more lane to wait for).
  program.push_back(Stage{L + ".attn_kv", StageKind::kCompute, {{"kv", b.kv.data()}, {"comb", b.comb.data()}},
                          {{"kv", b.kv.data()}, {"comb", b.comb.data()}},
                          [&be, &w, this, batch, kv, comb, rope, eps] {
                            be.rms_norm(kv, w.kv_norm, eps, kv);
                            be.kv_rope_quant(kv, batch, rope);
                            be.hc_sinkhorn(comb, hc_pre_config_);
                          }});
  if (csa) {
    program.push_back(Stage{
        L + ".index_topk", StageKind::kCompute,
        {{"idx_q", iq.data()}, {"idx_w", iw.data()}, cache_index_rows}, {{"topk", b.topk.data()}},
        [&be, this, &cache, batch, iq, iw, topk] { be.indexer_topk(iq, iw, index_weight_scale_, cache, batch, topk); }});
    // After the top-k in program order, so that the lane plan puts it beside it.
    program.push_back(Stage{L + ".q_rope", StageKind::kCompute, {{"q", b.q.data()}}, {{"q", b.q.data()}},
                            [&be, batch, q, rope, eps] { be.q_norm_rope(q, batch, rope, eps); }});
  }
  // Sparse attention over the window and the compressed rows.
  program.push_back(Stage{
      L + ".attn_core", StageKind::kCompute,
      {{"q", b.q.data()}, {"kv", b.kv.data()}, {"topk", csa ? b.topk.data() : nullptr}, cache_window, cache_rows},
      {{"attn_o", b.attn_o.data()}},
      [&be, &w, &cache, this, batch, q, kv, topk, attn_o, rope, csa] {
        be.sparse_attention(q, kv, cache, batch, csa ? topk : Tensor(), w.attn_sink, softmax_scale_, rope, attn_o);
      }});
  // The output projections and hc_post; then the FFN's hc_pre.
  program.push_back(Stage{
      L + ".attn_out", StageKind::kCompute,
      {{"attn_o", b.attn_o.data()}, {"X", b.X.data()}, {"post", b.post.data()}, {"comb", b.comb.data()}},
      {{"z", b.z.data()}, {"attn_out", b.attn_out.data()}, {"X_alt", b.X_alt.data()}, {"x", b.x.data()},
       {"post", b.post.data()}, {"comb", b.comb.data()}, {"xn", b.xn.data()}},
      [&be, &w, &c, this, X, X_alt, x, xn, post, comb, attn_o, z, attn_out, eps] {
        const int64_t T2 = attn_o.size(0);
        be.grouped_linear_linear(attn_o.reshape({T2, attn_o.size(1) * attn_o.size(2)}), w.wo_a, c.o_groups, z,
                                 w.wo_b, attn_out);
        be.hc_post_pre_norm(ops::HcPostInput::of_sublayer(attn_out, X, post, comb), X_alt, w.hc_ffn, hc_pre_config_,
                            w.ffn_norm, eps, x, xn, post, comb);
      }});
  // The KV row into the window, once attention has read the rows it replaces.
  program.push_back(Stage{L + ".window_commit", StageKind::kCompute, {{"kv", b.kv.data()}, cache_window},
                          {cache_window},
                          [&be, &cache, batch, kv] { be.window_commit(kv, batch, cache); }});
  // The router (the shared expert does not need it).
  Tensor rw = b.router_w.rows(0, T), rid = b.router_ids.rows(0, T);
  program.push_back(Stage{L + ".router", StageKind::kCompute, {{"xn", b.xn.data()}},
                          {{"router_w", b.router_w.data()}, {"router_ids", b.router_ids.data()}},
                          [&be, &w, this, batch, xn, rw, rid] {
                            be.router(xn, w.gate, w.gate_bias, w.tid2eid, batch, router_config_, rw, rid);
                          }});

  MoeStageIo io;
  io.micro_batch = b.micro_batch;
  io.layer = w.index;
  io.weights = &w;
  io.x = xn;
  io.ids = rid;
  io.weights_f32 = rw;
  io.slot_out = b.slot_out.rows(0, T);
  io.routed = b.routed.rows(0, T);
  io.swiglu_limit = float(c.swiglu_limit);
  io.leave_slots = leave_output && moe.leaves_slots();  // (the next layer's attn_in sums them)
  moe.append_dispatch(program, io);

  // The shared expert runs on the row's own rank, under the dispatch; with it the Sinkhorn
  // of the FFN's comb, which attn_out's hc_pre left for later (hc_pre_config_): it is
  // read with shared_out, by the next layer's attn_in or ffn_post. The Sinkhorn first:
  // a short latency chain, which after the shared expert waited on the GPU until the
  // routed experts' grid left room, then ran on the path to the next attn_in (-0.6% a
  // step at batch 1 on an H200; at 16 rows the shared expert's tail waits instead).
  program.push_back(Stage{L + ".shared_expert", StageKind::kCompute, {{"xn", b.xn.data()}, {"comb", b.comb.data()}},
                          {{"shared_out", b.shared_out.data()}, {"comb", b.comb.data()}},
                          [&be, &w, &c, this, xn, shared_out, comb] {
                            be.hc_sinkhorn(comb, hc_pre_config_);
                            be.expert_ffn(xn, w.shared, Tensor(), float(c.swiglu_limit), shared_out);
                          }});
  moe.append_experts(program, io);
  moe.append_combine(program, io);

  if (leave_output) return;  // the next layer's attn_in forms X
  program.push_back(Stage{
      L + ".ffn_post", StageKind::kCompute,
      {{"routed", b.routed.data()}, {"shared_out", b.shared_out.data()}, {"X_alt", b.X_alt.data()},
       {"post", b.post.data()}, {"comb", b.comb.data()}},
      {{"moe_out", b.moe_out.data()}, {"X", b.X.data()}},
      [&be, routed, shared_out, moe_out, X, X_alt, post, comb] {
        be.moe_output_hc_post(routed, shared_out, X_alt, post, comb, moe_out, X);
      }});
}

void Transformer::append_logits(StageProgram& program, MicroBatchBuffers& b, int64_t R, const ops::HcWeights& hc,
                                const Tensor& norm, const char* name) {
  DSV4_CHECK(R <= b.max_logit_rows, "{} logits rows requested, buffers hold {}", R, b.max_logit_rows);
  auto& be = backend_;
  Tensor rows = b.logit_rows.rows(0, R), hX = b.head_X.rows(0, R), hy = b.head_y.rows(0, R);
  Tensor hyn = b.head_yn.rows(0, R), logits = b.logits.rows(0, R), X = b.X;
  const float eps = float(config_.rms_norm_eps);
  // logits = head(norm(hc_head(X))) for the requested rows only (spec §3, §12.17).
  program.push_back(Stage{name, StageKind::kCompute, {{"X", b.X.data()}, {"logit_rows", b.logit_rows.data()}},
                          {{"logits", b.logits.data()}},
                          [&be, this, &hc, &norm, rows, hX, hy, hyn, logits, X, eps] {
                            be.gather_rows(X, rows, hX);
                            be.hc_head(hX, hc, hc_config_, hy);
                            be.rms_norm(hy, norm, eps, hyn);
                            be.linear_bf16(hyn, weights_.head, logits);
                          }});
}

StageProgram Transformer::step_program(MicroBatchBuffers& b, const ops::BatchView& batch, int64_t num_logit_rows,
                                       std::vector<ops::LayerCache>& caches, MoeExecutor& moe) {
  DSV4_CHECK(int64_t(caches.size()) == num_cache_layers(), "{} caches for {} layers", caches.size(),
             num_cache_layers());
  const int64_t T = batch.num_tokens;
  DSV4_CHECK(T <= b.capacity, "micro-batch {} has {} rows, capacity {}", b.micro_batch, T, b.capacity);
  StageProgram program;
  auto& be = backend_;
  Tensor X = b.X.rows(0, T);
  program.push_back(Stage{"embed", StageKind::kCompute, {}, {{"X", b.X.data()}},
                          [&be, this, batch, X] { be.embed(weights_.embed, batch, X); }});
  // Each layer's FFN output is formed by the next layer's first stage (one op with its
  // hc_pre); the last layer forms its own, for the head (and the MTP block).
  const size_t n = weights_.layers.size();
  for (size_t i = 0; i < n; ++i) {
    const LayerWeights& w = weights_.layers[i];
    append_layer(program, b, batch, w, caches[size_t(w.index)], moe, i > 0, i + 1 < n);
  }
  append_logits(program, b, num_logit_rows, weights_.hc_head, weights_.norm, "logits");
  return program;
}

StageProgram Transformer::mtp_program(MicroBatchBuffers& b, const Tensor& X_main, const ops::BatchView& batch,
                                      int64_t num_logit_rows, std::vector<ops::LayerCache>& caches,
                                      MoeExecutor& moe) {
  DSV4_CHECK(!weights_.mtp.empty(), "the model has no MTP block");
  const MtpWeights& m = weights_.mtp[0];
  const int64_t T = batch.num_tokens, hc = config_.hc_mult, D = config_.hidden_size;
  DSV4_CHECK(X_main.size(0) == T, "MTP input has {} rows, batch {}", X_main.size(0), T);
  auto& be = backend_;
  const float eps = float(config_.rms_norm_eps);
  Tensor emb = b.mtp_embed.rows(0, T), e = b.mtp_e.rows(0, T), ep = b.mtp_e_proj.rows(0, T);
  Tensor h = b.mtp_h.rows(0, T), hp = b.mtp_h_proj.rows(0, T), X = b.X.rows(0, T);
  StageProgram program;
  // X_i = e_proj(enorm(embed(t_{p+1}))) + h_proj(hnorm(Xmain_i)) per stream (spec §3.1).
  program.push_back(Stage{
      "mtp.input", StageKind::kCompute, {}, {{"X", b.X.data()}},
      [&be, this, &m, batch, X_main, emb, e, ep, h, hp, X, T, hc, D, eps] {
        be.embed(weights_.embed, batch, emb);
        be.rms_norm(emb.reshape({T, D}), m.enorm, eps, e);
        be.linear(e, m.e_proj, ep);
        be.rms_norm(X_main.reshape({T * hc, D}), m.hnorm, eps, h.reshape({T * hc, D}));
        be.linear(h.reshape({T * hc, D}), m.h_proj, hp.reshape({T * hc, D}));
        be.add_broadcast(ep, hp, X);
      }});
  append_layer(program, b, batch, m.block, caches[size_t(m.block.index)], moe, false, false);
  append_logits(program, b, num_logit_rows, m.hc_head, m.norm, "mtp.logits");
  return program;
}

}  // namespace dsv4::model
