// The op contracts. Every op is a public, non-virtual member that checks its
// contract (shapes, dtypes, devices) once, for every backend, and then calls the
// backend's implementation (do_*). The CPU backend is the reference that defines
// what correct means; the CUDA backend must agree with it (tests/ops).
//
// Conventions: activations are row-major with one row per token; "bf16" tensors
// hold raw bfloat16 bits; every op accepts 0 rows; ops never allocate.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/batch.h"
#include "ops/token_choice.h"
#include "ops/weights.h"

namespace dsv4::ops {

struct HcConfig {
  int64_t hc_mult = 4;
  int64_t sinkhorn_iters = 20;
  float hc_eps = 1e-6f;
  float norm_eps = 1e-6f;
  // Whether the hc_pre ops leave comb before its Sinkhorn normalization (spec §4.1): comb
  // then holds the Sinkhorn's input, c[i][j] = mixes[2hc + i hc + j] * scale[2] +
  // base[2hc + i hc + j], and hc_sinkhorn must finish it before hc_post reads it (the
  // same bits as the whole op). Why: only hc_post reads comb, at the sublayer's end, and
  // the Sinkhorn (~40 dependent divisions a row) was the longest part of hc_pre on the GPU;
  // the model runs hc_sinkhorn beside the sublayer (model/transformer.cpp).
  bool sinkhorn_later = false;
};

// Rotary table of one layer type (spec §1.3, §2.2): inv_freq f32 [Dr/2] on the device.
struct RopeTable {
  core::Tensor inv_freq;
  int64_t rope_dim = 0;
};

enum class ScoringFunc : uint8_t { kSqrtSoftplus, kSigmoid, kSoftmax };

struct RouterConfig {
  ScoringFunc scoring = ScoringFunc::kSqrtSoftplus;
  int64_t topk = 0;
  float route_scale = 1.0f;
  bool normalize = true;  // renormalise the selected scores (not for softmax)
};

// A recorded sequence of ops that can be replayed (a CUDA graph on the GPU; on
// the CPU the recorded function is simply called again).
class Graph {
 public:
  virtual ~Graph() = default;
  virtual void replay() = 0;
};

// Device-side time between two points of the stream (CUDA events on the GPU).
class Timer {
 public:
  virtual ~Timer() = default;
  virtual void start() = 0;
  virtual void stop() = 0;
  // Waits for the stop point; milliseconds between start and stop.
  virtual double elapsed_ms() = 0;
};

// A residual stream that the previous sublayer's hc_post forms, handed to the next
// hc_pre instead of the stream itself (hc_post_pre_norm*), so that a backend can
// form it and start the mix in one pass. The sublayer output is f (bf16 [T, D]), or
// the MoE output y = bf16(routed + shared) (moe_output; routed f32, shared and y
// bf16 [T, D]) when f is undefined. R, post, comb: hc_post's (spec §4.2).
// of_moe_slots: routed is not formed yet; it is moe_reduce(slot_out, ids) (the routed
// experts' outputs by slot, bf16 [T, k, D], and their ids, i32 [T, k]), which the op
// forms: into routed (its buffer), or where it reads it without storing it (CUDA, at
// few rows), so that the reduction is not a launch of its own on the step's chain.
// routed's contents after the op are then unspecified.
struct HcPostInput {
  core::Tensor f;
  core::Tensor routed, shared, y;
  core::Tensor slot_out, ids;
  core::Tensor R, post, comb;

  static HcPostInput of_sublayer(const core::Tensor& f, const core::Tensor& R, const core::Tensor& post,
                                 const core::Tensor& comb) {
    HcPostInput in;
    in.f = f;
    in.R = R;
    in.post = post;
    in.comb = comb;
    return in;
  }
  static HcPostInput of_moe_output(const core::Tensor& routed, const core::Tensor& shared, const core::Tensor& y,
                                   const core::Tensor& R, const core::Tensor& post, const core::Tensor& comb) {
    HcPostInput in;
    in.routed = routed;
    in.shared = shared;
    in.y = y;
    in.R = R;
    in.post = post;
    in.comb = comb;
    return in;
  }
  static HcPostInput of_moe_slots(const core::Tensor& slot_out, const core::Tensor& ids, const core::Tensor& routed,
                                  const core::Tensor& shared, const core::Tensor& y, const core::Tensor& R,
                                  const core::Tensor& post, const core::Tensor& comb) {
    HcPostInput in = of_moe_output(routed, shared, y, R, post, comb);
    in.slot_out = slot_out;
    in.ids = ids;
    return in;
  }
};

// What a tensor holds, where a backend's storage order for it depends on more than its
// dtype and shape (see Backend::upload).
enum class TensorRole : uint8_t {
  kPlain,
  kFp4Scales,  // the UE8M0 row scales [N, K/32] of a packed FP4 weight (CUDA: stored tile-major like the weight)
  kGroupedFp8Weight,  // the e4m3 weight [N, K] of grouped_linear (wo_a; CUDA: in fragment order, tile-major,
                      // ops/cuda/fp8_bf16_layout.h); grouped_linear takes no other
};

// Diagnostics: backend ops that run twice a call, so that a benchmark can measure
// what one call of an op costs inside a step (a captured graph included) as the
// step's growth. Only ops whose outputs are a function of their inputs alone
// qualify: the second run writes the same bytes, so outputs stay right. The set
// comes from DSV4_REPEAT_OPS (a comma list of the names below), read at the first
// op; set_repeated_ops replaces it (tests; "" clears). An unknown name, or one of an
// op that updates state or works in place (norms, RoPE, mHC, compress, the window),
// is an error that lists the names allowed.
void set_repeated_ops(const std::string& names);
// The names allowed: "linear, linear_bf16, ...".
std::string repeatable_ops();
// How many extra runs the set has caused so far (all backends).
int64_t repeated_op_runs();

class Backend {
 public:
  virtual ~Backend() = default;
  virtual core::Device device() const = 0;
  virtual std::string name() const = 0;

  // ---- memory ------------------------------------------------------------------
  virtual core::Tensor empty(core::DType dtype, std::initializer_list<int64_t> shape) = 0;
  // Bytes empty() can still hand out (CPU: the host's MemAvailable; CUDA: the device's
  // free memory), or nothing where unknown: for checks before large allocations.
  virtual std::optional<uint64_t> memory_available() const = 0;
  // Host bytes in and out, in the checkpoint's element order. A backend may store a
  // dtype in its own order (CUDA: packed FP4, see ops/cuda/fp4_device_layout.h), so
  // device tensors are filled and read through these (or the backend's own builders).
  // That order may depend on the shape (pass the tensor in its final shape) and on the
  // tensor's role, which the caller names where it is not plain.
  virtual void upload(const core::Tensor& dst, const void* host, size_t bytes,
                      TensorRole role = TensorRole::kPlain) = 0;
  virtual void download(void* host, const core::Tensor& src, size_t bytes, TensorRole role = TensorRole::kPlain) = 0;
  // Host memory that download() fills fastest, for what a step brings back every time (the
  // logits rows serving samples from): CUDA: page-locked (a copy into pageable memory is
  // staged through the driver's buffer; plain memory where page-locking fails); CPU: plain.
  virtual std::shared_ptr<void> host_buffer(size_t bytes);
  virtual void fill_zero(const core::Tensor& t) = 0;
  virtual void synchronize() = 0;
  // Storage for one layer's per-sequence state (see ops/batch.h).
  virtual LayerCache allocate_cache(const CacheGeometry& geometry, int64_t ratio) = 0;
  // Bytes allocate_cache takes per state slot and per page for one layer (sizing
  // the pools from a memory budget).
  using CacheCost = ops::CacheCost;
  virtual CacheCost cache_cost(const CacheGeometry& geometry, int64_t ratio) const = 0;
  // Records `body` (which issues ops only: no host reads of device data, no
  // allocation) for replay; recording does not execute it. Every buffer it
  // touches must keep its address. `info` describes what is recorded, for a backend
  // that shapes its graphs by it (CUDA: which lane edges become programmatic); no
  // choice it makes changes a result.
  struct CaptureInfo {
    int64_t rows = 0;  // the step's token rows (a decode bucket); 0: not said
  };
  std::unique_ptr<Graph> capture(const std::function<void()>& body) { return capture(body, CaptureInfo{}); }
  virtual std::unique_ptr<Graph> capture(const std::function<void()>& body, const CaptureInfo& info);

  // ---- ops ---------------------------------------------------------------------
  // X[t, i, :] = table[token_ids[t]] for every stream i (spec §3). table bf16 [V, D], X bf16 [T, hc, D].
  void embed(const core::Tensor& table, const BatchView& batch, const core::Tensor& X);

  // y = bf16(w * x * rsqrt(mean(x^2) + eps)) per row (spec §2.1). x, y bf16 [T, N]; w bf16 [N].
  void rms_norm(const core::Tensor& x, const core::Tensor& weight, float eps, const core::Tensor& y);

  // Weight-less per-head RMS norm of q in bf16 arithmetic, then forward RoPE of the
  // last rope_dim of each head at the token's position (spec §5.1). q bf16 [T, H, Dh], in place.
  void q_norm_rope(const core::Tensor& q, const BatchView& batch, const RopeTable& rope, float eps);

  // KV row finish (spec §5.2): forward RoPE of the last rope_dim, FP8 e4m3 QAT
  // simulation (block 64, UE8M0) of the rest. kv bf16 [T, Dh], in place.
  void kv_rope_quant(const core::Tensor& kv, const BatchView& batch, const RopeTable& rope);

  // mHC pre (spec §4.1): x bf16 [T, D], post f32 [T, hc], comb f32 [T, hc, hc] from X bf16 [T, hc, D].
  void hc_pre(const core::Tensor& X, const HcWeights& w, const HcConfig& config, const core::Tensor& x,
              const core::Tensor& post, const core::Tensor& comb);
  // hc_pre, then xn = rms_norm(x, norm_weight, eps): the sublayer's input as the
  // next linears take it (a backend may do both in one pass; x is written too).
  // x, xn and X must not overlap.
  void hc_pre_norm(const core::Tensor& X, const HcWeights& w, const HcConfig& config, const core::Tensor& norm_weight,
                   float eps, const core::Tensor& x, const core::Tensor& xn, const core::Tensor& post,
                   const core::Tensor& comb);
  // mHC post (spec §4.2): Y[j] = bf16(post_j f + sum_i comb[i][j] R_i). Y must not alias R.
  void hc_post(const core::Tensor& f, const core::Tensor& R, const core::Tensor& post, const core::Tensor& comb,
               const core::Tensor& Y);
  // mHC head (spec §4.3): y bf16 [T, D] from X bf16 [T, hc, D].
  void hc_head(const core::Tensor& X, const HcWeights& w, const HcConfig& config, const core::Tensor& y);
  // comb = Sinkhorn(comb) in place (spec §4.1), f32 [T, hc, hc]: what an hc_pre op run
  // with config.sinkhorn_later left undone.
  void hc_sinkhorn(const core::Tensor& comb, const HcConfig& config);

  // Quantized linear (spec §2.7, §2.8): activations quantized to e4m3 per 128 with
  // UE8M0 scales, fp32 accumulation, bf16 out. x bf16 [T, K], y bf16 [T, N].
  void linear(const core::Tensor& x, const QuantLinear& w, const core::Tensor& y);
  // Plain linear with a bf16 weight [N, K]: x bf16 or f32 [T, K] (upcast), fp32
  // accumulation, y bf16 or f32 [T, N] (compressor, router, indexer weights, LM head).
  void linear_bf16(const core::Tensor& x, const core::Tensor& w, const core::Tensor& y);
  // Two linears of one input: ya = linear(x, wa), yb = linear(x, wb), the same math as
  // two calls. The activations are quantized once; a backend may run both products as
  // one launch, which may regroup an output's fp32 partial sums (within the linear's
  // tolerance, still independent of the batch). Both weights take the same K.
  void linear_pair(const core::Tensor& x, const QuantLinear& wa, const core::Tensor& ya, const QuantLinear& wb,
                   const core::Tensor& yb);
  // The same for linear_bf16: ya = linear_bf16(x, wa), yb = linear_bf16(x, wb).
  void linear_bf16_pair(const core::Tensor& x, const core::Tensor& wa, const core::Tensor& ya, const core::Tensor& wb,
                        const core::Tensor& yb);
  // A norm and the linears that read its output, as one op so that a backend can
  // quantize the activations while it forms them (one launch less on a layer's
  // critical path at small batch). The same math and bits as the ops in sequence:
  //   rms_norm_linear:         xn = rms_norm(x, norm_weight, eps); y = linear(xn, w)
  //   rms_norm_linear_pair:    xn = rms_norm(x, norm_weight, eps); linear_pair(xn, wa, ya, wb, yb)
  //   hc_pre_norm_linear_pair: hc_pre_norm(X, ...) (x, xn, post, comb); linear_pair(xn, wa, ya, wb, yb)
  // with the contracts of those ops (xn is written too).
  void rms_norm_linear(const core::Tensor& x, const core::Tensor& norm_weight, float eps, const core::Tensor& xn,
                       const QuantLinear& w, const core::Tensor& y);
  void rms_norm_linear_pair(const core::Tensor& x, const core::Tensor& norm_weight, float eps, const core::Tensor& xn,
                            const QuantLinear& wa, const core::Tensor& ya, const QuantLinear& wb,
                            const core::Tensor& yb);
  void hc_pre_norm_linear_pair(const core::Tensor& X, const HcWeights& w, const HcConfig& config,
                               const core::Tensor& norm_weight, float eps, const core::Tensor& x,
                               const core::Tensor& xn, const core::Tensor& post, const core::Tensor& comb,
                               const QuantLinear& wa, const core::Tensor& ya, const QuantLinear& wb,
                               const core::Tensor& yb);
  // A sublayer's hc_post and the next sublayer's hc_pre as one op (one pass over the
  // stream at small batch): Y = hc_post(in) (moe_output_hc_post where in is the MoE
  // output), then hc_pre_norm(Y, ...) and, for the _linear_pair form, linear_pair(xn,
  // ...), with those ops' contracts. post and comb may be in.post and in.comb: they are
  // read by the hc_post, then overwritten by the hc_pre.
  void hc_post_pre_norm(const HcPostInput& in, const core::Tensor& Y, const HcWeights& w, const HcConfig& config,
                        const core::Tensor& norm_weight, float eps, const core::Tensor& x, const core::Tensor& xn,
                        const core::Tensor& post, const core::Tensor& comb);
  void hc_post_pre_norm_linear_pair(const HcPostInput& in, const core::Tensor& Y, const HcWeights& w,
                                    const HcConfig& config, const core::Tensor& norm_weight, float eps,
                                    const core::Tensor& x, const core::Tensor& xn, const core::Tensor& post,
                                    const core::Tensor& comb, const QuantLinear& wa, const core::Tensor& ya,
                                    const QuantLinear& wb, const core::Tensor& yb);
  // Grouped low-rank output projection wo_a (spec §5.6): the FP8 weight [G*R, C]
  // is used dequantized and the activation is not quantized (bf16 einsum):
  // y[t, g*R + r] = bf16(sum_c x[t, g*C + c] * W[g*R + r, c]). x bf16 [T, G*C], y bf16 [T, G*R].
  // W is uploaded as TensorRole::kGroupedFp8Weight (its scale plain).
  void grouped_linear(const core::Tensor& x, const QuantLinear& w, int64_t groups, const core::Tensor& y);
  // The attention's two output projections as one op, so that a backend can quantize z
  // for wb while it forms it: z = grouped_linear(x, wa, groups); y = linear(z, wb), the
  // same math and bits as the two ops in sequence, with their contracts (z is written too).
  void grouped_linear_linear(const core::Tensor& x, const QuantLinear& wa, int64_t groups, const core::Tensor& z,
                             const QuantLinear& wb, const core::Tensor& y);

  // Compressor step (spec §5.3) for this step's tokens: a, g f32 [T, c*d] are the
  // wkv/wgate projections. Updates the per-sequence state, emits every row due
  // in the step (pooling, RMSNorm, RoPE at j*m, QAT simulation) into cache.rows
  // (main) or cache.index_rows (indexer, w.rotate).
  void compress(const core::Tensor& a, const core::Tensor& g, const CompressorWeights& w, const BatchView& batch,
                const RopeTable& rope, float norm_eps, LayerCache& cache);

  // Indexer query (spec §5.4): RoPE on the last rope_dim of each head, Hadamard,
  // FP4 QAT simulation. q bf16 [T, Hi, Di], in place.
  void indexer_q(const core::Tensor& q, const BatchView& batch, const RopeTable& rope);
  // Indexer scores and causal top-k (spec §5.4) with the reference's bf16 score
  // arithmetic, ties to the lower row. weights bf16 [T, Hi] (weights_proj output,
  // multiplied here by weight_scale); topk i32 [T, index_topk]: the selected rows in
  // ascending row order (the attention reads them in that order), then -1.
  void indexer_topk(const core::Tensor& q, const core::Tensor& weights, float weight_scale, const LayerCache& cache,
                    const BatchView& batch, const core::Tensor& topk);

  // Sparse attention with sink (spec §5.5) over the window (this step's rows `kv`
  // for positions in the step, the ring for older ones) and the compressed rows
  // (CSA: the rows in `topk`; HCA: every visible row), then inverse RoPE of the
  // output at the query position (spec §5.6). q, o bf16 [T, H, Dh]; kv bf16 [T, Dh];
  // sink f32 [H]; topk i32 [T, K] or undefined.
  void sparse_attention(const core::Tensor& q, const core::Tensor& kv, const LayerCache& cache,
                        const BatchView& batch, const core::Tensor& topk, const core::Tensor& sink,
                        float softmax_scale, const RopeTable& rope, const core::Tensor& o);
  // Stores the last min(W, len) KV rows of each sequence of the step in its window ring.
  void window_commit(const core::Tensor& kv, const BatchView& batch, LayerCache& cache);

  // Router (spec §6.1): scores = score_func(fp32(x) @ fp32(gate)^T); selection by
  // top-k of scores + bias, or by tid2eid[token] in hash layers (bias undefined);
  // weights from the unbiased scores, renormalised, times route_scale.
  // x bf16 [T, D], gate bf16 [E, D], bias f32 [E], tid2eid i64 [V, k];
  // weights f32 [T, k], ids i32 [T, k].
  void router(const core::Tensor& x, const core::Tensor& gate, const core::Tensor& bias, const core::Tensor& tid2eid,
              const BatchView& batch, const RouterConfig& config, const core::Tensor& weights,
              const core::Tensor& ids);

  // SwiGLU expert with the clamp (spec §6.2) on every row: y = w2(bf16(row_weight
  // * silu(min(g, limit)) * clamp(u, +-limit))). x, y bf16 [R, D]; row_weight f32 [R]
  // or undefined (shared expert). limit 0 disables the clamp.
  void expert_ffn(const core::Tensor& x, const ExpertWeights& w, const core::Tensor& row_weight, float swiglu_limit,
                  const core::Tensor& y);
  // Routed experts for each (row, slot) whose expert is in [expert_begin,
  // expert_end): out[r, s] = expert_ffn(x[r]) with weight weights[r, s]; slots of
  // other experts are set to zero. `experts` is indexed by global expert id (only
  // the local range needs to be bound). x bf16 [R, D], ids i32 [R, k], weights f32
  // [R, k], out bf16 [R, k, D].
  void routed_experts(const core::Tensor& x, const core::Tensor& ids, const core::Tensor& weights,
                      const std::vector<ExpertWeights>& experts, int64_t expert_begin, int64_t expert_end,
                      float swiglu_limit, const core::Tensor& out);
  // Routed sum (spec §6.2, reference order): routed[t] = sum over the slots of row
  // t in ascending expert id of fp32(slot_out[t, s]); slots with id < 0 are
  // skipped. slot_out bf16 [T, k, D], ids i32 [T, k], routed f32 [T, D].
  void moe_reduce(const core::Tensor& slot_out, const core::Tensor& ids, const core::Tensor& routed);
  // MoE output: y = bf16(routed + fp32(shared)). routed f32, shared, y bf16 [T, D].
  void moe_output(const core::Tensor& routed, const core::Tensor& shared, const core::Tensor& y);
  // A layer's FFN output in one op: y = moe_output(routed, shared), then
  // Y = hc_post(y, R, post, comb) (the contracts of both).
  void moe_output_hc_post(const core::Tensor& routed, const core::Tensor& shared, const core::Tensor& R,
                          const core::Tensor& post, const core::Tensor& comb, const core::Tensor& y,
                          const core::Tensor& Y);

  // MTP input (spec §3.1): X[t, i] = bf16(e[t] + h[t, i]). e bf16 [T, D], h, X bf16 [T, hc, D].
  void add_broadcast(const core::Tensor& e, const core::Tensor& h, const core::Tensor& X);
  // dst[i] = src[rows[i]]; rows i32 [R] on the device.
  void gather_rows(const core::Tensor& src, const core::Tensor& rows, const core::Tensor& dst);
  // The greedy token of each logits row: ids[r] = the lowest index of row r's largest value,
  // as a scan from column 0 that moves only to strictly larger values finds it (NaNs never
  // win; a NaN in column 0 gives 0). Only the ids need cross to the host to sample greedily.
  // logits f32 [R, V] (V >= 1), ids i32 [R].
  void argmax_rows(const core::Tensor& logits, const core::Tensor& ids);
  // Each logits row's token by the law of ops/token_choice.h: a greedy row's as argmax_rows
  // finds it, a sampled row's a draw keyed by its seed and position from its weights in
  // integers, the same bits on every backend; a row whose choice gives its token
  // (TokenChoice::given_token >= 0, a prompt token scored) that token. Serving's step takes its
  // tokens here, so only ids cross to the host. logits f32 [R, V] (1 <= V <= 2^23), choices i32
  // [R, kTokenChoiceWords] (a TokenChoice a row), ids i32 [R].
  void choose_tokens(const core::Tensor& logits, const core::Tensor& choices, const core::Tensor& ids);
  // Each row's log-probability record (ops/token_choice.h: the row's max, its temperature-1
  // weight Z1, the logits of token ids[r] and of the row's most likely tokens) where its choice
  // asks (logprobs >= 0); the records of the other rows are left as they were. Only R records
  // cross to the host, not the rows. logits f32 [R, V] (1 <= V <= 2^23), choices i32
  // [R, kTokenChoiceWords], ids i32 [R] (the rows' tokens), records i32 [R, kTokenLogprobWords].
  void token_logprobs(const core::Tensor& logits, const core::Tensor& choices, const core::Tensor& ids,
                      const core::Tensor& records);
  // Applies penalties to logits in place (before choose_tokens): for each entry,
  // logits[row, token] = token_law::penalized(logits[row, token], entry). logits f32 [R, V],
  // penalties i32 [E, kLogitPenaltyWords] (a LogitPenalty a row; at most one a (row, token);
  // entries outside [0, R) x [0, V) are skipped).
  void penalize_logits(const core::Tensor& logits, const core::Tensor& penalties);
  // dst[t, s, :] = src[index[t, s], s, :], or zeros where index[t, s] < 0 (the
  // expert-parallel combine puts returned expert outputs back in slot order).
  // src bf16 [R, k, D], index i32 [T, k], dst bf16 [T, k, D].
  void gather_slots(const core::Tensor& src, const core::Tensor& index, const core::Tensor& dst);
  // Byte copy between tensors of this device (dst at least as large as src).
  void copy(const core::Tensor& dst, const core::Tensor& src);
  // Makes this backend's device current on the calling thread (rank threads call it once).
  virtual void bind_to_current_thread() {}
  // Brackets work for an external profiler started with collection off (ncu
  // --profile-from-start off); no-op where there is none.
  virtual void profiler_collect(bool on) {}
  virtual std::unique_ptr<Timer> make_timer();

  // ---- lanes: independent stages of one step at once ----------------------------
  // Ops issue on the lane selected last. Lane 0 is the backend's current stream; a
  // backend with more lanes runs each beside it (engine/stage_lanes.h decides which
  // stages go where, from their declared buffers). mark_lane() marks everything
  // issued so far on the current lane and returns the mark's id; after
  // wait_for_mark(id), work issued on the current lane starts only once the mark is
  // reached. clear_marks() lets ids be reused (a new step). A backend that runs ops
  // as they are issued (the CPU) has one lane and nothing to mark.
  virtual int num_lanes() const { return 1; }
  virtual void set_lane(int lane);
  virtual int mark_lane() { return 0; }
  virtual void wait_for_mark(int /*mark*/) {}
  virtual void clear_marks() {}
  // Fills every row and state of a cache with random valid content (benchmarks:
  // a decode step at context C without prefilling C tokens; never zeros).
  virtual void randomize_cache(LayerCache& cache, uint64_t seed);

 protected:
  virtual void do_embed(const core::Tensor& table, const BatchView& batch, const core::Tensor& X) = 0;
  virtual void do_rms_norm(const core::Tensor& x, const core::Tensor& weight, float eps, const core::Tensor& y) = 0;
  virtual void do_q_norm_rope(const core::Tensor& q, const BatchView& batch, const RopeTable& rope, float eps) = 0;
  virtual void do_kv_rope_quant(const core::Tensor& kv, const BatchView& batch, const RopeTable& rope) = 0;
  virtual void do_hc_pre(const core::Tensor& X, const HcWeights& w, const HcConfig& config, const core::Tensor& x,
                         const core::Tensor& post, const core::Tensor& comb) = 0;
  // Default: do_hc_pre, then do_rms_norm.
  virtual void do_hc_pre_norm(const core::Tensor& X, const HcWeights& w, const HcConfig& config,
                              const core::Tensor& norm_weight, float eps, const core::Tensor& x,
                              const core::Tensor& xn, const core::Tensor& post, const core::Tensor& comb);
  virtual void do_hc_post(const core::Tensor& f, const core::Tensor& R, const core::Tensor& post,
                          const core::Tensor& comb, const core::Tensor& Y) = 0;
  virtual void do_hc_sinkhorn(const core::Tensor& comb, const HcConfig& config) = 0;
  virtual void do_hc_head(const core::Tensor& X, const HcWeights& w, const HcConfig& config,
                          const core::Tensor& y) = 0;
  virtual void do_linear(const core::Tensor& x, const QuantLinear& w, const core::Tensor& y) = 0;
  virtual void do_linear_bf16(const core::Tensor& x, const core::Tensor& w, const core::Tensor& y) = 0;
  // Default: the two products one after the other.
  virtual void do_linear_pair(const core::Tensor& x, const QuantLinear& wa, const core::Tensor& ya,
                              const QuantLinear& wb, const core::Tensor& yb);
  virtual void do_linear_bf16_pair(const core::Tensor& x, const core::Tensor& wa, const core::Tensor& ya,
                                   const core::Tensor& wb, const core::Tensor& yb);
  // Defaults: the ops in sequence. wb == nullptr: rms_norm_linear (one weight).
  virtual void do_rms_norm_linear(const core::Tensor& x, const core::Tensor& norm_weight, float eps,
                                  const core::Tensor& xn, const QuantLinear& wa, const core::Tensor& ya,
                                  const QuantLinear* wb, const core::Tensor* yb);
  // Default: the ops in sequence; wa == nullptr: hc_post_pre_norm (no linears).
  virtual void do_hc_post_pre_norm(const HcPostInput& in, const core::Tensor& Y, const HcWeights& w,
                                   const HcConfig& config, const core::Tensor& norm_weight, float eps,
                                   const core::Tensor& x, const core::Tensor& xn, const core::Tensor& post,
                                   const core::Tensor& comb, const QuantLinear* wa, const core::Tensor* ya,
                                   const QuantLinear* wb, const core::Tensor* yb);
  virtual void do_hc_pre_norm_linear_pair(const core::Tensor& X, const HcWeights& w, const HcConfig& config,
                                          const core::Tensor& norm_weight, float eps, const core::Tensor& x,
                                          const core::Tensor& xn, const core::Tensor& post, const core::Tensor& comb,
                                          const QuantLinear& wa, const core::Tensor& ya, const QuantLinear& wb,
                                          const core::Tensor& yb);
  virtual void do_grouped_linear(const core::Tensor& x, const QuantLinear& w, int64_t groups,
                                 const core::Tensor& y) = 0;
  // Default: the two ops in sequence.
  virtual void do_grouped_linear_linear(const core::Tensor& x, const QuantLinear& wa, int64_t groups,
                                        const core::Tensor& z, const QuantLinear& wb, const core::Tensor& y);
  virtual void do_compress(const core::Tensor& a, const core::Tensor& g, const CompressorWeights& w,
                           const BatchView& batch, const RopeTable& rope, float norm_eps, LayerCache& cache) = 0;
  virtual void do_indexer_q(const core::Tensor& q, const BatchView& batch, const RopeTable& rope) = 0;
  virtual void do_indexer_topk(const core::Tensor& q, const core::Tensor& weights, float weight_scale,
                               const LayerCache& cache, const BatchView& batch, const core::Tensor& topk) = 0;
  virtual void do_sparse_attention(const core::Tensor& q, const core::Tensor& kv, const LayerCache& cache,
                                   const BatchView& batch, const core::Tensor& topk, const core::Tensor& sink,
                                   float softmax_scale, const RopeTable& rope, const core::Tensor& o) = 0;
  virtual void do_window_commit(const core::Tensor& kv, const BatchView& batch, LayerCache& cache) = 0;
  virtual void do_router(const core::Tensor& x, const core::Tensor& gate, const core::Tensor& bias,
                         const core::Tensor& tid2eid, const BatchView& batch, const RouterConfig& config,
                         const core::Tensor& weights, const core::Tensor& ids) = 0;
  virtual void do_expert_ffn(const core::Tensor& x, const ExpertWeights& w, const core::Tensor& row_weight,
                             float swiglu_limit, const core::Tensor& y) = 0;
  virtual void do_routed_experts(const core::Tensor& x, const core::Tensor& ids, const core::Tensor& weights,
                                 const std::vector<ExpertWeights>& experts, int64_t expert_begin,
                                 int64_t expert_end, float swiglu_limit, const core::Tensor& out) = 0;
  virtual void do_moe_reduce(const core::Tensor& slot_out, const core::Tensor& ids, const core::Tensor& routed) = 0;
  virtual void do_moe_output(const core::Tensor& routed, const core::Tensor& shared, const core::Tensor& y) = 0;
  // Default: do_moe_output, then do_hc_post.
  virtual void do_moe_output_hc_post(const core::Tensor& routed, const core::Tensor& shared, const core::Tensor& R,
                                     const core::Tensor& post, const core::Tensor& comb, const core::Tensor& y,
                                     const core::Tensor& Y);
  virtual void do_add_broadcast(const core::Tensor& e, const core::Tensor& h, const core::Tensor& X) = 0;
  virtual void do_gather_rows(const core::Tensor& src, const core::Tensor& rows, const core::Tensor& dst) = 0;
  virtual void do_gather_slots(const core::Tensor& src, const core::Tensor& index, const core::Tensor& dst) = 0;
  virtual void do_argmax_rows(const core::Tensor& logits, const core::Tensor& ids) = 0;
  virtual void do_choose_tokens(const core::Tensor& logits, const core::Tensor& choices, const core::Tensor& ids) = 0;
  virtual void do_penalize_logits(const core::Tensor& logits, const core::Tensor& penalties) = 0;
  virtual void do_token_logprobs(const core::Tensor& logits, const core::Tensor& choices, const core::Tensor& ids,
                                 const core::Tensor& records) = 0;
  virtual void do_copy(const core::Tensor& dst, const core::Tensor& src) = 0;
};

// The RoPE inverse frequencies of spec §2.2 in the reference's fp32 arithmetic.
// yarn=false: plain base^(-2i/d) (ratio-0 layers and the MTP block).
std::vector<float> rope_inv_freq(int64_t rope_dim, double base, bool yarn, double factor, int64_t original_seq_len,
                                 double beta_fast, double beta_slow);

// How the CPU backend sums its GEMMs (linear, pairs, grouped, bf16, the experts): in
// fp32 (kExact, the spec's arithmetic), or as the CUDA backend's Hopper tensor-core
// GEMMs do (kHopperWgmma: ref::hopper_e4m3_dot32 per FP8 chunk, ref::hopper_bf16_mma16
// per bf16 step, the CUDA kernels' scale order and K slices, ops/gemm_order.h), which
// the CUDA tests compare against bit for bit.
enum class QuantDotModel { kExact, kHopperWgmma };
std::unique_ptr<Backend> make_cpu_backend(int num_threads = 1, QuantDotModel quant_dot = QuantDotModel::kExact);
// Defined in CUDA builds only (src/ops/cuda).
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace dsv4::ops
