// DeepSeek-V4 model configuration, read from a Hugging Face config.json
// (spec §1.1) and validated with messages that name the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace dsv4::model {

enum class AttentionKind { kSlidingWindow, kCompressedSparse, kHeavilyCompressed };  // ratio 0 / 4 / 128

struct RopeScaling {
  std::string type = "yarn";
  double factor = 16.0;
  int64_t original_max_position_embeddings = 65536;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

struct QuantizationConfig {
  std::string quant_method = "fp8";
  std::string fmt = "e4m3";
  std::vector<int64_t> weight_block_size = {128, 128};
  std::string scale_fmt = "ue8m0";
  std::string activation_scheme = "dynamic";
};

struct ModelConfig {
  std::string model_type = "deepseek_v4";
  int64_t vocab_size = 129280;
  int64_t hidden_size = 4096;             // D
  int64_t num_hidden_layers = 43;         // L
  int64_t num_nextn_predict_layers = 1;   // MTP blocks
  int64_t num_attention_heads = 64;       // H
  int64_t num_key_value_heads = 1;
  int64_t head_dim = 512;                 // Dh
  int64_t qk_rope_head_dim = 64;          // Dr
  int64_t q_lora_rank = 1024;             // Rq
  int64_t o_groups = 8;                   // G
  int64_t o_lora_rank = 1024;             // Ro
  int64_t sliding_window = 128;           // W
  std::vector<int64_t> compress_ratios;   // >= L+1 entries; [L] is the MTP block's
  double compress_rope_theta = 160000.0;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 1048576;
  int64_t index_n_heads = 64;             // Hi
  int64_t index_head_dim = 128;           // Di
  int64_t index_topk = 512;
  int64_t n_routed_experts = 256;         // E
  int64_t n_shared_experts = 1;
  int64_t num_experts_per_tok = 6;        // k
  int64_t moe_intermediate_size = 2048;   // I
  int64_t num_hash_layers = 3;
  std::string scoring_func = "sqrtsoftplus";
  std::string topk_method = "noaux_tc";
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.5;
  double swiglu_limit = 10.0;
  int64_t hc_mult = 4;
  int64_t hc_sinkhorn_iters = 20;
  double hc_eps = 1e-6;
  double rms_norm_eps = 1e-6;
  std::string hidden_act = "silu";
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  std::string expert_dtype = "fp4";       // "fp4" or "fp8" (V4-Flash-Base)
  QuantizationConfig quantization_config;
  std::string torch_dtype = "bfloat16";

  // Derived.
  int64_t nope_head_dim() const { return head_dim - qk_rope_head_dim; }
  int64_t num_layers_with_mtp() const { return num_hidden_layers + num_nextn_predict_layers; }
  // Layer index i in [0, L + num_mtp): L.. are MTP blocks.
  int64_t compress_ratio(int64_t layer) const;
  AttentionKind attention_kind(int64_t layer) const;
  bool is_hash_layer(int64_t layer) const { return layer < num_hash_layers && layer < num_hidden_layers; }
  bool experts_fp4() const { return expert_dtype == "fp4"; }
  int64_t hc_mix_dim() const { return (2 + hc_mult) * hc_mult; }
};

// Parses and validates; `source` names the file in error messages.
ModelConfig parse_config(const nlohmann::json& json, const std::string& source);
ModelConfig load_config(const std::string& path);
nlohmann::json config_to_json(const ModelConfig& config);
// Throws core::Error naming the field and the expected value.
void validate_config(const ModelConfig& config, const std::string& source);

// Named configurations: "tiny" (spec §10.1 with the real vocabulary), the bench
// presets of spec §10.2, and the real "v4-flash" / "v4-pro" architectures.
ModelConfig preset_config(const std::string& name);
std::vector<std::string> preset_names();
std::string preset_description(const std::string& name);

}  // namespace dsv4::model
