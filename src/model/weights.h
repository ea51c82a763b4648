// The model's weights as typed handles (ops/weights.h), bound by checkpoint name
// from any source: a checkpoint's memory maps, host-generated synthetic weights,
// or device memory. Expert parallelism binds only the local experts.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/synthetic_weights.h"
#include "ops/weights.h"

namespace dsv4::model {

struct LayerWeights {
  int64_t index = 0;
  int64_t ratio = 0;
  bool hash = false;
  core::Tensor attn_norm, ffn_norm;
  ops::HcWeights hc_attn, hc_ffn;
  // attention (spec §5)
  core::Tensor attn_sink;
  ops::QuantLinear wq_a, wq_b, wkv, wo_a, wo_b;
  core::Tensor q_norm, kv_norm;
  ops::CompressorWeights compressor;        // ratio > 0
  ops::QuantLinear index_wq_b;              // ratio == 4
  core::Tensor index_weights_proj;          // ratio == 4
  ops::CompressorWeights index_compressor;  // ratio == 4
  // MoE (spec §6)
  core::Tensor gate, gate_bias, tid2eid;
  std::vector<ops::ExpertWeights> experts;  // by global id; only [expert_begin, expert_end) bound
  ops::ExpertWeights shared;
};

struct MtpWeights {
  LayerWeights block;
  ops::QuantLinear e_proj, h_proj;
  core::Tensor enorm, hnorm, norm;
  ops::HcWeights hc_head;
};

struct ModelWeights {
  core::Tensor embed, head, norm;
  ops::HcWeights hc_head;
  std::vector<LayerWeights> layers;
  std::vector<MtpWeights> mtp;
  int64_t expert_begin = 0, expert_end = 0;
};

// Returns the tensor stored under a checkpoint name (on the backend's device).
using TensorLookup = std::function<core::Tensor(const std::string& name)>;

// Binds every tensor of spec §8; routed experts only in [expert_begin, expert_end).
ModelWeights bind_weights(const ModelConfig& config, const TensorLookup& lookup, int64_t expert_begin,
                          int64_t expert_end);

// Checkpoint names the weights of a config need, minus the routed experts outside
// [expert_begin, expert_end): what a rank has to load.
bool is_needed_tensor(const std::string& name, int64_t expert_begin, int64_t expert_end);

// Bytes of the checkpoint tensors a rank with routed experts [expert_begin,
// expert_end) binds (-1: all): what loading them takes in memory.
uint64_t needed_weight_bytes(const ModelConfig& config, int64_t expert_begin = 0, int64_t expert_end = -1);

// How a SyntheticWeightStore draws: on `threads` threads (<= 0: the hardware's count;
// the bytes do not depend on it), with progress(done, total) about once a second and
// at the end, if set.
struct SyntheticBuildOptions {
  int threads = 0;
  std::function<void(uint64_t done, uint64_t total)> progress;
  int64_t piece_elements = kDefaultPieceElements;  // values drawn at a time (generate_tensor)
};

// Host-memory synthetic weights for a config (every tensor of spec §8 drawn as
// make-checkpoint draws them), for tests and presets without files.
class SyntheticWeightStore {
 public:
  SyntheticWeightStore(const ModelConfig& config, uint64_t seed, int64_t expert_begin = 0, int64_t expert_end = -1,
                       const SyntheticBuildOptions& options = {});
  core::Tensor get(const std::string& name) const;
  TensorLookup lookup() const {
    return [this](const std::string& n) { return get(n); };
  }

 private:
  std::unordered_map<std::string, core::Tensor> tensors_;
};

}  // namespace dsv4::model
