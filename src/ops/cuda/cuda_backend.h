// The CUDA backend for Hopper (sm_90a). Every op of ops/backend.h runs as
// kernels on one stream; no op synchronises the host or depends on host-side
// copies of device data, so a whole step can be captured as one CUDA graph.
// Kernels live in one file per op family:
//   cuda_backend.cu    memory, graphs, caches
//   cuda_pointwise.cu  embed, gather, add_broadcast, rms_norm, q_norm_rope,
//                      kv_rope_quant, hc_pre/post/head, moe_reduce, moe_output
//   cuda_attention.cu  compress, indexer_q, indexer_topk, sparse_attention, window_commit
//   cuda_linear.cu     linear, linear_bf16, grouped_linear, expert_ffn, routed_experts, router
//   cuda_copy.cu       copy, gather_slots, timers, random cache fill
//   cuda_token_choice.cu  argmax_rows, choose_tokens, token_logprobs, penalize_logits
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <map>
#include <memory>
#include <vector>

#include "ops/backend.h"

namespace dsv4::ops {

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;

  core::Device device() const override { return core::Device::kCuda; }
  std::string name() const override { return "cuda"; }
  std::optional<uint64_t> memory_available() const override;
  core::Tensor empty(core::DType dtype, std::initializer_list<int64_t> shape) override;
  core::Tensor empty_bytes(size_t bytes);
  void upload(const core::Tensor& dst, const void* host, size_t bytes, TensorRole role = TensorRole::kPlain) override;
  void download(void* host, const core::Tensor& src, size_t bytes, TensorRole role = TensorRole::kPlain) override;
  std::shared_ptr<void> host_buffer(size_t bytes) override;
  void fill_zero(const core::Tensor& t) override;
  void synchronize() override;
  LayerCache allocate_cache(const CacheGeometry& geometry, int64_t ratio) override;
  CacheCost cache_cost(const CacheGeometry& geometry, int64_t ratio) const override;
  // Captures body's work as one graph; kernel-to-kernel edges become programmatic
  // (dependent launch, see grid_dependency.cuh) unless DSV4_CUDA_PDL=0.
  using Backend::capture;
  std::unique_ptr<Graph> capture(const std::function<void()>& body, const CaptureInfo& info) override;
  // How many edges the last capture made programmatic (tests).
  int last_capture_programmatic_edges() const { return last_capture_programmatic_edges_; }
  // How many nodes of the last capture wait on two or more others (lanes joining; tests).
  int last_capture_joins() const { return last_capture_joins_; }
  void bind_to_current_thread() override;
  void profiler_collect(bool on) override;
  std::unique_ptr<Timer> make_timer() override;
  void randomize_cache(LayerCache& cache, uint64_t seed) override;

  int device_index() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  // Ops issue on the current stream; TBO switches it between compute and comm streams
  // (on lane 0: a lane's stream is derived from it).
  void set_stream(cudaStream_t s) { stream_ = s; }
  // Lanes 1 and 2 are streams of their own for each lane-0 stream (so two
  // micro-batches of two-batch overlap would each have theirs), created on first
  // use; marks are events without timing, reused after clear_marks().
  // DSV4_CUDA_LANES=1, 2 or 3 sets how many (A/B runs; read once; default 3; any
  // other value is an error).
  int num_lanes() const override;
  void set_lane(int lane) override;
  int mark_lane() override;
  void wait_for_mark(int mark) override;
  void clear_marks() override { next_mark_ = 0; }
  const cudaDeviceProp& properties() const { return props_; }
  cublasLtHandle_t cublaslt() const { return cublaslt_; }
  void* cublas_workspace() const { return workspace_.data(); }
  size_t cublas_workspace_bytes() const { return workspace_.nbytes(); }

 protected:
  void do_embed(const core::Tensor& table, const BatchView& batch, const core::Tensor& X) override;
  void do_rms_norm(const core::Tensor& x, const core::Tensor& weight, float eps, const core::Tensor& y) override;
  void do_q_norm_rope(const core::Tensor& q, const BatchView& batch, const RopeTable& rope, float eps) override;
  void do_kv_rope_quant(const core::Tensor& kv, const BatchView& batch, const RopeTable& rope) override;
  void do_hc_pre(const core::Tensor& X, const HcWeights& w, const HcConfig& config, const core::Tensor& x,
                 const core::Tensor& post, const core::Tensor& comb) override;
  void do_hc_pre_norm(const core::Tensor& X, const HcWeights& w, const HcConfig& config,
                      const core::Tensor& norm_weight, float eps, const core::Tensor& x, const core::Tensor& xn,
                      const core::Tensor& post, const core::Tensor& comb) override;
  void do_hc_post(const core::Tensor& f, const core::Tensor& R, const core::Tensor& post, const core::Tensor& comb,
                  const core::Tensor& Y) override;
  void do_hc_sinkhorn(const core::Tensor& comb, const HcConfig& config) override;
  void do_hc_head(const core::Tensor& X, const HcWeights& w, const HcConfig& config, const core::Tensor& y) override;
  void do_linear(const core::Tensor& x, const QuantLinear& w, const core::Tensor& y) override;
  void do_linear_bf16(const core::Tensor& x, const core::Tensor& w, const core::Tensor& y) override;
  void do_linear_pair(const core::Tensor& x, const QuantLinear& wa, const core::Tensor& ya, const QuantLinear& wb,
                      const core::Tensor& yb) override;
  void do_linear_bf16_pair(const core::Tensor& x, const core::Tensor& wa, const core::Tensor& ya,
                           const core::Tensor& wb, const core::Tensor& yb) override;
  void do_rms_norm_linear(const core::Tensor& x, const core::Tensor& norm_weight, float eps, const core::Tensor& xn,
                          const QuantLinear& wa, const core::Tensor& ya, const QuantLinear* wb,
                          const core::Tensor* yb) override;
  void do_hc_post_pre_norm(const HcPostInput& in, const core::Tensor& Y, const HcWeights& w, const HcConfig& config,
                           const core::Tensor& norm_weight, float eps, const core::Tensor& x, const core::Tensor& xn,
                           const core::Tensor& post, const core::Tensor& comb, const QuantLinear* wa,
                           const core::Tensor* ya, const QuantLinear* wb, const core::Tensor* yb) override;
  void do_hc_pre_norm_linear_pair(const core::Tensor& X, const HcWeights& w, const HcConfig& config,
                                  const core::Tensor& norm_weight, float eps, const core::Tensor& x,
                                  const core::Tensor& xn, const core::Tensor& post, const core::Tensor& comb,
                                  const QuantLinear& wa, const core::Tensor& ya, const QuantLinear& wb,
                                  const core::Tensor& yb) override;
  void do_grouped_linear(const core::Tensor& x, const QuantLinear& w, int64_t groups, const core::Tensor& y) override;
  void do_grouped_linear_linear(const core::Tensor& x, const QuantLinear& wa, int64_t groups, const core::Tensor& z,
                                const QuantLinear& wb, const core::Tensor& y) override;
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
  void do_moe_output_hc_post(const core::Tensor& routed, const core::Tensor& shared, const core::Tensor& R,
                             const core::Tensor& post, const core::Tensor& comb, const core::Tensor& y,
                             const core::Tensor& Y) override;
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
  // hc_post from MoE slots in one launch (cuda_pointwise.cu); false where it does not apply.
  bool hc_post_slots(const HcPostInput& in, const core::Tensor& Y);

  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  int last_capture_programmatic_edges_ = 0;
  int last_capture_joins_ = 0;
  int lane_ = 0;
  cudaStream_t lane0_stream_ = nullptr;  // lane 0's stream while another lane is current
  std::map<std::pair<cudaStream_t, int>, cudaStream_t> side_streams_;  // (lane 0's stream, lane)
  std::vector<cudaEvent_t> marks_;
  int next_mark_ = 0;
  cudaStream_t own_stream_ = nullptr;
  cudaDeviceProp props_{};
  cublasLtHandle_t cublaslt_ = nullptr;
  core::Tensor workspace_;
  // Per-op scratch the kernels keep between launches (device pointer tables for
  // the experts, top-k scratch, ...), owned here so graphs can bind them.
  struct Scratch;
  std::unique_ptr<Scratch> scratch_;

 public:
  // Kernels that need scratch memory get it here: one buffer per (name, current
  // stream), grown on first use, before any capture (growing during capture is an
  // error). `fresh`, if given, tells whether this call allocated (contents undefined).
  // A buffer that grows after a capture is kept, not freed: the graph still uses it.
  void* scratch(const char* name, size_t bytes, bool* fresh = nullptr);
  // The bytes of the buffers kept that way (tests; serving's memory report).
  size_t scratch_bytes_kept_for_graphs() const;
};

// True when a CUDA device is usable (tests skip otherwise).
bool cuda_device_available(std::string* why = nullptr);

}  // namespace dsv4::ops
