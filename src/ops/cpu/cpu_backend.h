// The CPU reference backend: readable loops in the reference's arithmetic
// (fp32 math, bf16 rounding where the reference rounds). It defines what correct
// means for every other backend. Rows are independent, so a row's result never
// depends on the batch it is in (decode == prefill, batched == alone).
#pragma once

#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/host_memory.h"
#include "core/thread_pool.h"
#include "ops/backend.h"

namespace dsv4::ops {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads, QuantDotModel quant_dot = QuantDotModel::kExact);

  core::Device device() const override { return core::Device::kCpu; }
  std::string name() const override { return "cpu"; }
  std::optional<uint64_t> memory_available() const override { return core::host_memory_available(); }
  core::Tensor empty(core::DType dtype, std::initializer_list<int64_t> shape) override;
  void upload(const core::Tensor& dst, const void* host, size_t bytes, TensorRole role = TensorRole::kPlain) override;
  void download(void* host, const core::Tensor& src, size_t bytes, TensorRole role = TensorRole::kPlain) override;
  void fill_zero(const core::Tensor& t) override;
  void synchronize() override {}
  LayerCache allocate_cache(const CacheGeometry& geometry, int64_t ratio) override;
  CacheCost cache_cost(const CacheGeometry& geometry, int64_t ratio) const override;

 protected:
  void do_embed(const core::Tensor& table, const BatchView& batch, const core::Tensor& X) override;
  void do_rms_norm(const core::Tensor& x, const core::Tensor& weight, float eps, const core::Tensor& y) override;
  void do_q_norm_rope(const core::Tensor& q, const BatchView& batch, const RopeTable& rope, float eps) override;
  void do_kv_rope_quant(const core::Tensor& kv, const BatchView& batch, const RopeTable& rope) override;
  void do_hc_pre(const core::Tensor& X, const HcWeights& w, const HcConfig& config, const core::Tensor& x,
                 const core::Tensor& post, const core::Tensor& comb) override;
  void do_hc_post(const core::Tensor& f, const core::Tensor& R, const core::Tensor& post, const core::Tensor& comb,
                  const core::Tensor& Y) override;
  void do_hc_sinkhorn(const core::Tensor& comb, const HcConfig& config) override;
  void do_hc_head(const core::Tensor& X, const HcWeights& w, const HcConfig& config, const core::Tensor& y) override;
  void do_linear(const core::Tensor& x, const QuantLinear& w, const core::Tensor& y) override;
  void do_linear_bf16(const core::Tensor& x, const core::Tensor& w, const core::Tensor& y) override;
  // The pairs differ from two single calls only under kHopperWgmma, where the model
  // follows the CUDA backend's launch of both weights as one (its K slices).
  void do_linear_pair(const core::Tensor& x, const QuantLinear& wa, const core::Tensor& ya, const QuantLinear& wb,
                      const core::Tensor& yb) override;
  void do_linear_bf16_pair(const core::Tensor& x, const core::Tensor& wa, const core::Tensor& ya,
                           const core::Tensor& wb, const core::Tensor& yb) override;
  void do_grouped_linear(const core::Tensor& x, const QuantLinear& w, int64_t groups, const core::Tensor& y) override;
  void do_compress(const core::Tensor& a, const core::Tensor& g, const CompressorWeights& w, const BatchView& batch,
                   const RopeTable& rope, float norm_eps, LayerCache& cache) override;
  void do_indexer_q(const core::Tensor& q, const BatchView& batch, const RopeTable& rope) override;
  void do_indexer_topk(const core::Tensor& q, const core::Tensor& weights, float weight_scale, const LayerCache& cache,
                       const BatchView& batch, const core::Tensor& topk) override;
  void do_sparse_attention(const core::Tensor& q, const core::Tensor& kv, const LayerCache& cache,
                           const BatchView& batch, const core::Tensor& topk, const core::Tensor& sink,
                           float softmax_scale, const RopeTable& rope, const core::Tensor& o) override;
  void do_window_commit(const core::Tensor& kv, const BatchView& batch, LayerCache& cache) override;
  void do_router(const core::Tensor& x, const core::Tensor& gate, const core::Tensor& bias,
                 const core::Tensor& tid2eid, const BatchView& batch, const RouterConfig& config,
                 const core::Tensor& weights, const core::Tensor& ids) override;
  void do_expert_ffn(const core::Tensor& x, const ExpertWeights& w, const core::Tensor& row_weight,
                     float swiglu_limit, const core::Tensor& y) override;
  void do_routed_experts(const core::Tensor& x, const core::Tensor& ids, const core::Tensor& weights,
                         const std::vector<ExpertWeights>& experts, int64_t expert_begin, int64_t expert_end,
                         float swiglu_limit, const core::Tensor& out) override;
  void do_moe_reduce(const core::Tensor& slot_out, const core::Tensor& ids, const core::Tensor& routed) override;
  void do_moe_output(const core::Tensor& routed, const core::Tensor& shared, const core::Tensor& y) override;
  void do_add_broadcast(const core::Tensor& e, const core::Tensor& h, const core::Tensor& X) override;
  void do_gather_rows(const core::Tensor& src, const core::Tensor& rows, const core::Tensor& dst) override;
  void do_gather_slots(const core::Tensor& src, const core::Tensor& index, const core::Tensor& dst) override;
  void do_argmax_rows(const core::Tensor& logits, const core::Tensor& ids) override;
  void do_choose_tokens(const core::Tensor& logits, const core::Tensor& choices, const core::Tensor& ids) override;
  void do_penalize_logits(const core::Tensor& logits, const core::Tensor& penalties) override;
  void do_token_logprobs(const core::Tensor& logits, const core::Tensor& choices, const core::Tensor& ids,
                         const core::Tensor& records) override;
  void do_copy(const core::Tensor& dst, const core::Tensor& src) override;

 private:
  // Dequantized fp32 copy of a quantized weight (exact: e4m3/e2m1 times a power
  // of two), made once per weight and kept. The entry holds the weight's storage
  // alive and a fingerprint of its bytes, so a freed and reused address can never
  // hit a stale copy.
  const float* dequantized(const QuantLinear& w);
  // y[r] = bf16(sum_k xdeq[r, k] * W[n, k]) with x quantized per 128 first.
  // launch_rows / tile_mult: for kHopperWgmma, the weight rows of the CUDA launch the
  // GEMM belongs to (0: w.n; a stacked pair counts both) and gemm_k_slices' tile_mult.
  void quant_linear_rows(const uint16_t* x, int64_t rows, const QuantLinear& w, uint16_t* y, int64_t launch_rows = 0,
                         int tile_mult = 1);
  // quant_linear_rows under QuantDotModel::kHopperWgmma (K a multiple of 128) in
  // `slices` K slices.
  void quant_linear_rows_hopper(const uint16_t* x, int64_t rows, const QuantLinear& w, uint16_t* y, int slices);
  // linear_bf16 under kHopperWgmma, where the CUDA backend takes its tensor-core GEMM
  // (bf16 x, K a multiple of 64): false where it does not.
  bool linear_bf16_hopper(const core::Tensor& x, const core::Tensor& w, const core::Tensor& y, int64_t launch_rows);
  // do_expert_ffn with gemm_k_slices' tile_mult (1 shared expert, 4 routed experts).
  void expert_ffn(const core::Tensor& x, const ExpertWeights& w, const core::Tensor& row_weight, float swiglu_limit,
                  const core::Tensor& y, int tile_mult);

  core::ThreadPool pool_;
  QuantDotModel quant_dot_;
  std::mutex cache_mutex_;
  struct Dequantized {
    std::shared_ptr<void> weight_owner, scale_owner;
    uint64_t fingerprint = 0;
    std::vector<float> values;
  };
  std::unordered_map<const void*, std::unique_ptr<Dequantized>> dequant_cache_;
};

}  // namespace dsv4::ops
