// The tensors a DeepSeek-V4 checkpoint must contain for a given config (spec §8):
// name, dtype, shape, and how synthetic weights of that tensor are drawn. One list
// serves checkpoint validation, the checkpoint writer and the in-memory builders.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "model/config.h"

namespace dsv4::model {

enum class WeightInit {
  kNormal,      // mean + std * N(0,1), rounded to the tensor dtype (BF16/F32)
  kFp8Weight,   // e4m3 weight quantized per 128x128 block from scaled Gaussians; its pair is the scale
  kFp8Scale,    // the UE8M0 block scales of the paired kFp8Weight
  kFp4Weight,   // packed e2m1 weight quantized per 32 along K; its pair is the scale
  kFp4Scale,
  kExpertIds,   // tid2eid: distinct expert ids per token
};

struct TensorSpec {
  std::string name;
  core::DType dtype;
  std::vector<int64_t> shape;
  WeightInit init = WeightInit::kNormal;
  float mean = 0.0f;
  float std = 0.0f;
  std::string pair;     // weight <-> scale partner for FP8/FP4 tensors
  int64_t logical_n = 0;  // FP8/FP4 weights: logical [N, K]
  int64_t logical_k = 0;
  int group = -1;       // -1 global, layer index, or L.. for MTP blocks: the shard grouping unit
  bool grouped_linear = false;  // FP8 weights the grouped linear reads (wo_a): a backend may store them in an
                                // order of its own (ops::TensorRole::kGroupedFp8Weight)
  std::string derivation;  // which config fields fix the shape, for error messages
};

std::vector<TensorSpec> checkpoint_tensor_specs(const ModelConfig& config);

// Bytes of all tensors of a spec list.
uint64_t total_bytes(const std::vector<TensorSpec>& specs);

// The decode step's stage (a name of Transformer::step_program's stages without
// the layer prefix: attn_in, attn_q, index_in, attn_kv, compress, attn_core,
// attn_out, router, shared_expert, experts, logits, embed; index_topk and
// window_commit read no weights)
// that reads a checkpoint tensor, or "" for tensors the main decode step does not
// read (the MTP block). Routed experts are "experts" and the embedding table
// "embed", though a step reads only the experts its rows route to and one embed
// row per token. Fails on a name it does not know, so a new tensor cannot go
// uncounted in a benchmark's bytes per stage.
std::string decode_stage_of_tensor(const std::string& name);

}  // namespace dsv4::model
