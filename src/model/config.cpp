#include "model/config.h"

#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv4::model {

using core::fail;
using nlohmann::json;

int64_t ModelConfig::compress_ratio(int64_t layer) const {
  DSV4_CHECK(layer >= 0 && layer < int64_t(compress_ratios.size()), "layer {} has no compress_ratios entry ({} entries)",
             layer, compress_ratios.size());
  return compress_ratios[size_t(layer)];
}

AttentionKind ModelConfig::attention_kind(int64_t layer) const {
  switch (compress_ratio(layer)) {
    case 0: return AttentionKind::kSlidingWindow;
    case 4: return AttentionKind::kCompressedSparse;
    default: return AttentionKind::kHeavilyCompressed;
  }
}

namespace {

// Reads `key` from `j` into `out`. Missing keys keep the default unless required.
template <typename T>
void read_field(const json& j, const char* key, T* out, const std::string& source, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) fail("{}: missing required field \"{}\"", source, key);
    return;
  }
  try {
    *out = it->get<T>();
  } catch (const json::exception&) {
    fail("{}: field \"{}\" has the wrong type (found {}: {})", source, key, it->type_name(), it->dump());
  }
}

void read_rope_scaling(const json& j, RopeScaling* out, const std::string& source) {
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) fail("{}: missing required field \"rope_scaling\"", source);
  if (!it->is_object()) fail("{}: field \"rope_scaling\" must be an object", source);
  std::string src = source + " rope_scaling";
  if (it->contains("type")) read_field(*it, "type", &out->type, src, false);
  else read_field(*it, "rope_type", &out->type, src, false);
  read_field(*it, "factor", &out->factor, src, true);
  read_field(*it, "original_max_position_embeddings", &out->original_max_position_embeddings, src, true);
  read_field(*it, "beta_fast", &out->beta_fast, src, false);
  read_field(*it, "beta_slow", &out->beta_slow, src, false);
}

void read_quantization(const json& j, QuantizationConfig* out, const std::string& source) {
  auto it = j.find("quantization_config");
  if (it == j.end() || it->is_null()) fail("{}: missing required field \"quantization_config\"", source);
  std::string src = source + " quantization_config";
  read_field(*it, "quant_method", &out->quant_method, src, false);
  read_field(*it, "fmt", &out->fmt, src, false);
  read_field(*it, "weight_block_size", &out->weight_block_size, src, false);
  read_field(*it, "scale_fmt", &out->scale_fmt, src, false);
  read_field(*it, "activation_scheme", &out->activation_scheme, src, false);
}

void expect(bool ok, const std::string& source, const char* field, const std::string& expected,
            const std::string& found) {
  if (!ok) fail("{}: field \"{}\" is {}, expected {}", source, field, found, expected);
}

}  // namespace

ModelConfig parse_config(const json& j, const std::string& source) {
  if (!j.is_object()) fail("{}: config must be a JSON object", source);
  ModelConfig c;
  read_field(j, "model_type", &c.model_type, source, true);
  read_field(j, "vocab_size", &c.vocab_size, source, true);
  read_field(j, "hidden_size", &c.hidden_size, source, true);
  read_field(j, "num_hidden_layers", &c.num_hidden_layers, source, true);
  read_field(j, "num_nextn_predict_layers", &c.num_nextn_predict_layers, source, false);
  read_field(j, "num_attention_heads", &c.num_attention_heads, source, true);
  read_field(j, "num_key_value_heads", &c.num_key_value_heads, source, false);
  read_field(j, "head_dim", &c.head_dim, source, true);
  read_field(j, "qk_rope_head_dim", &c.qk_rope_head_dim, source, true);
  read_field(j, "q_lora_rank", &c.q_lora_rank, source, true);
  read_field(j, "o_groups", &c.o_groups, source, true);
  read_field(j, "o_lora_rank", &c.o_lora_rank, source, true);
  read_field(j, "sliding_window", &c.sliding_window, source, true);
  read_field(j, "compress_ratios", &c.compress_ratios, source, true);
  read_field(j, "compress_rope_theta", &c.compress_rope_theta, source, true);
  read_field(j, "rope_theta", &c.rope_theta, source, true);
  read_rope_scaling(j, &c.rope_scaling, source);
  read_field(j, "max_position_embeddings", &c.max_position_embeddings, source, false);
  read_field(j, "index_n_heads", &c.index_n_heads, source, true);
  read_field(j, "index_head_dim", &c.index_head_dim, source, true);
  read_field(j, "index_topk", &c.index_topk, source, true);
  read_field(j, "n_routed_experts", &c.n_routed_experts, source, true);
  read_field(j, "n_shared_experts", &c.n_shared_experts, source, false);
  read_field(j, "num_experts_per_tok", &c.num_experts_per_tok, source, true);
  read_field(j, "moe_intermediate_size", &c.moe_intermediate_size, source, true);
  read_field(j, "num_hash_layers", &c.num_hash_layers, source, false);
  read_field(j, "scoring_func", &c.scoring_func, source, false);
  read_field(j, "topk_method", &c.topk_method, source, false);
  read_field(j, "norm_topk_prob", &c.norm_topk_prob, source, false);
  read_field(j, "routed_scaling_factor", &c.routed_scaling_factor, source, true);
  read_field(j, "swiglu_limit", &c.swiglu_limit, source, false);
  read_field(j, "hc_mult", &c.hc_mult, source, true);
  read_field(j, "hc_sinkhorn_iters", &c.hc_sinkhorn_iters, source, true);
  read_field(j, "hc_eps", &c.hc_eps, source, true);
  read_field(j, "rms_norm_eps", &c.rms_norm_eps, source, false);
  read_field(j, "hidden_act", &c.hidden_act, source, false);
  read_field(j, "tie_word_embeddings", &c.tie_word_embeddings, source, false);
  read_field(j, "bos_token_id", &c.bos_token_id, source, false);
  read_field(j, "eos_token_id", &c.eos_token_id, source, false);
  read_field(j, "expert_dtype", &c.expert_dtype, source, false);
  read_quantization(j, &c.quantization_config, source);
  read_field(j, "torch_dtype", &c.torch_dtype, source, false);
  validate_config(c, source);
  return c;
}

ModelConfig load_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail("cannot open model config {}", path);
  json j;
  try {
    in >> j;
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", path, e.what());
  }
  return parse_config(j, path);
}

void validate_config(const ModelConfig& c, const std::string& src) {
  auto s = [](auto v) { return fmt::format("{}", v); };
  expect(c.model_type == "deepseek_v4", src, "model_type", "\"deepseek_v4\"", "\"" + c.model_type + "\"");
  expect(c.vocab_size > 0, src, "vocab_size", "> 0", s(c.vocab_size));
  expect(c.hidden_size > 0 && c.hidden_size % 128 == 0, src, "hidden_size",
         "a positive multiple of 128 (FP8 activation blocks)", s(c.hidden_size));
  expect(c.num_hidden_layers > 0, src, "num_hidden_layers", "> 0", s(c.num_hidden_layers));
  expect(c.num_nextn_predict_layers >= 0 && c.num_nextn_predict_layers <= 1, src, "num_nextn_predict_layers",
         "0 or 1", s(c.num_nextn_predict_layers));
  expect(c.num_key_value_heads == 1, src, "num_key_value_heads", "1 (one shared KV head)", s(c.num_key_value_heads));
  expect(c.qk_rope_head_dim > 0 && c.qk_rope_head_dim % 2 == 0, src, "qk_rope_head_dim", "a positive even number",
         s(c.qk_rope_head_dim));
  expect(c.head_dim > c.qk_rope_head_dim && c.nope_head_dim() % 64 == 0, src, "head_dim",
         fmt::format("qk_rope_head_dim ({}) plus a multiple of 64 (FP8 KV blocks)", c.qk_rope_head_dim),
         s(c.head_dim));
  expect(c.num_attention_heads > 0, src, "num_attention_heads", "> 0", s(c.num_attention_heads));
  expect(c.o_groups > 0 && c.num_attention_heads % c.o_groups == 0, src, "o_groups",
         fmt::format("a divisor of num_attention_heads ({})", c.num_attention_heads), s(c.o_groups));
  expect(c.num_attention_heads / std::max<int64_t>(c.o_groups, 1) * c.head_dim % 128 == 0, src, "o_groups",
         "a value giving a multiple of 128 input features per wo_a group", s(c.o_groups));
  expect(c.q_lora_rank > 0 && c.q_lora_rank % 128 == 0, src, "q_lora_rank", "a positive multiple of 128",
         s(c.q_lora_rank));
  expect(c.o_lora_rank > 0 && c.o_groups * c.o_lora_rank % 128 == 0, src, "o_lora_rank",
         "a positive value with o_groups*o_lora_rank a multiple of 128", s(c.o_lora_rank));
  expect(c.sliding_window > 0, src, "sliding_window", "> 0", s(c.sliding_window));
  int64_t needed = c.num_hidden_layers + c.num_nextn_predict_layers;
  expect(int64_t(c.compress_ratios.size()) >= needed, src, "compress_ratios",
         fmt::format("at least num_hidden_layers + num_nextn_predict_layers = {} entries", needed),
         fmt::format("{} entries", c.compress_ratios.size()));
  for (size_t i = 0; i < c.compress_ratios.size(); ++i) {
    int64_t r = c.compress_ratios[i];
    if (r != 0 && r != 4 && r != 128)
      fail("{}: field \"compress_ratios\"[{}] is {}, expected 0, 4 or 128", src, i, r);
  }
  for (int64_t l = c.num_hidden_layers; l < needed; ++l)
    expect(c.compress_ratios[size_t(l)] == 0, src, "compress_ratios",
           fmt::format("0 at index {} (the MTP block is sliding-window only)", l),
           s(c.compress_ratios[size_t(l)]));
  expect(c.rope_theta > 0, src, "rope_theta", "> 0", s(c.rope_theta));
  expect(c.compress_rope_theta > 0, src, "compress_rope_theta", "> 0", s(c.compress_rope_theta));
  expect(c.rope_scaling.type == "yarn", src, "rope_scaling.type", "\"yarn\"", "\"" + c.rope_scaling.type + "\"");
  expect(c.rope_scaling.factor > 0, src, "rope_scaling.factor", "> 0", s(c.rope_scaling.factor));
  expect(c.rope_scaling.original_max_position_embeddings > 0, src, "rope_scaling.original_max_position_embeddings",
         "> 0", s(c.rope_scaling.original_max_position_embeddings));
  expect(c.max_position_embeddings > 0, src, "max_position_embeddings", "> 0", s(c.max_position_embeddings));
  expect(c.index_head_dim > c.qk_rope_head_dim && (c.index_head_dim & (c.index_head_dim - 1)) == 0 &&
             c.index_head_dim % 32 == 0,
         src, "index_head_dim", "a power of two >= 32 above qk_rope_head_dim (Hadamard, FP4 blocks)",
         s(c.index_head_dim));
  expect(c.index_n_heads > 0, src, "index_n_heads", "> 0", s(c.index_n_heads));
  expect(c.index_topk > 0, src, "index_topk", "> 0", s(c.index_topk));
  expect(c.n_routed_experts > 0, src, "n_routed_experts", "> 0", s(c.n_routed_experts));
  expect(c.n_shared_experts == 1, src, "n_shared_experts", "1", s(c.n_shared_experts));
  expect(c.num_experts_per_tok > 0 && c.num_experts_per_tok <= c.n_routed_experts, src, "num_experts_per_tok",
         fmt::format("1..n_routed_experts ({})", c.n_routed_experts), s(c.num_experts_per_tok));
  expect(c.moe_intermediate_size > 0 && c.moe_intermediate_size % 128 == 0, src, "moe_intermediate_size",
         "a positive multiple of 128", s(c.moe_intermediate_size));
  expect(c.num_hash_layers >= 0 && c.num_hash_layers <= c.num_hidden_layers, src, "num_hash_layers",
         fmt::format("0..num_hidden_layers ({})", c.num_hidden_layers), s(c.num_hash_layers));
  static const std::set<std::string> kScoring = {"sqrtsoftplus", "sigmoid", "softmax"};
  expect(kScoring.count(c.scoring_func) == 1, src, "scoring_func", "\"sqrtsoftplus\", \"sigmoid\" or \"softmax\"",
         "\"" + c.scoring_func + "\"");
  expect(c.hidden_act == "silu", src, "hidden_act", "\"silu\"", "\"" + c.hidden_act + "\"");
  expect(!c.tie_word_embeddings, src, "tie_word_embeddings", "false (DeepSeek-V4 has an untied head)", "true");
  expect(c.hc_mult > 0, src, "hc_mult", "> 0", s(c.hc_mult));
  expect(c.hc_sinkhorn_iters > 0, src, "hc_sinkhorn_iters", "> 0", s(c.hc_sinkhorn_iters));
  expect(c.hc_eps >= 0, src, "hc_eps", ">= 0", s(c.hc_eps));
  expect(c.rms_norm_eps > 0, src, "rms_norm_eps", "> 0", s(c.rms_norm_eps));
  expect(c.routed_scaling_factor > 0, src, "routed_scaling_factor", "> 0", s(c.routed_scaling_factor));
  expect(c.swiglu_limit >= 0, src, "swiglu_limit", ">= 0 (0 disables the clamp)", s(c.swiglu_limit));
  expect(c.expert_dtype == "fp4" || c.expert_dtype == "fp8", src, "expert_dtype", "\"fp4\" or \"fp8\"",
         "\"" + c.expert_dtype + "\"");
  expect(c.bos_token_id >= 0 && c.bos_token_id < c.vocab_size, src, "bos_token_id",
         fmt::format("a token id below vocab_size ({})", c.vocab_size), s(c.bos_token_id));
  expect(c.eos_token_id >= 0 && c.eos_token_id < c.vocab_size, src, "eos_token_id",
         fmt::format("a token id below vocab_size ({})", c.vocab_size), s(c.eos_token_id));
  const auto& q = c.quantization_config;
  expect(q.quant_method == "fp8", src, "quantization_config.quant_method", "\"fp8\"", "\"" + q.quant_method + "\"");
  expect(q.fmt == "e4m3", src, "quantization_config.fmt", "\"e4m3\"", "\"" + q.fmt + "\"");
  expect(q.weight_block_size == std::vector<int64_t>{128, 128}, src, "quantization_config.weight_block_size",
         "[128, 128]", json(q.weight_block_size).dump());
  expect(q.scale_fmt == "ue8m0", src, "quantization_config.scale_fmt", "\"ue8m0\"", "\"" + q.scale_fmt + "\"");
}

json config_to_json(const ModelConfig& c) {
  json j;
  j["architectures"] = {"DeepseekV4ForCausalLM"};
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["q_lora_rank"] = c.q_lora_rank;
  j["o_groups"] = c.o_groups;
  j["o_lora_rank"] = c.o_lora_rank;
  j["sliding_window"] = c.sliding_window;
  j["compress_ratios"] = c.compress_ratios;
  j["compress_rope_theta"] = c.compress_rope_theta;
  j["rope_theta"] = c.rope_theta;
  j["rope_scaling"] = {{"type", c.rope_scaling.type},
                       {"factor", c.rope_scaling.factor},
                       {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings},
                       {"beta_fast", c.rope_scaling.beta_fast},
                       {"beta_slow", c.rope_scaling.beta_slow}};
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["index_n_heads"] = c.index_n_heads;
  j["index_head_dim"] = c.index_head_dim;
  j["index_topk"] = c.index_topk;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["num_experts_per_tok"] = c.num_experts_per_tok;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["num_hash_layers"] = c.num_hash_layers;
  j["scoring_func"] = c.scoring_func;
  j["topk_method"] = c.topk_method;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["swiglu_limit"] = c.swiglu_limit;
  j["hc_mult"] = c.hc_mult;
  j["hc_sinkhorn_iters"] = c.hc_sinkhorn_iters;
  j["hc_eps"] = c.hc_eps;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["hidden_act"] = c.hidden_act;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["expert_dtype"] = c.expert_dtype;
  const auto& q = c.quantization_config;
  j["quantization_config"] = {{"quant_method", q.quant_method},
                              {"fmt", q.fmt},
                              {"weight_block_size", q.weight_block_size},
                              {"scale_fmt", q.scale_fmt},
                              {"activation_scheme", q.activation_scheme}};
  j["torch_dtype"] = c.torch_dtype;
  return j;
}

namespace {

std::vector<int64_t> flash_ratios(int64_t pairs_after_swa) {
  std::vector<int64_t> r = {0, 0};
  for (int64_t i = 0; i < pairs_after_swa; ++i) {
    r.push_back(4);
    r.push_back(128);
  }
  return r;
}

// Real V4-Flash per-layer dimensions (spec §1.1, §10.2).
ModelConfig flash_dims() {
  ModelConfig c;
  c.compress_ratios = flash_ratios(20);
  c.compress_ratios.push_back(4);
  c.compress_ratios.push_back(0);  // MTP
  return c;
}

struct PresetInfo {
  const char* name;
  const char* description;
};
constexpr PresetInfo kPresets[] = {
    {"tiny", "spec §10.1: 4 layers (SWA+hash, CSA+hash, HCA, CSA) + MTP, D=256, 8 experts, real vocabulary"},
    {"bench-1g", "spec §10.2: real V4-Flash layer dims, 8 layers [0,0,4,128,4,128,4,128], 256 experts (~31 GB)"},
    {"bench-1g-L12", "spec §10.2: real V4-Flash layer dims, 12 layers, 256 experts (~45 GB)"},
    {"bench-1g-depth", "spec §10.2: real V4-Flash depth (43 layers) with 32 experts (~27 GB)"},
    {"bench-2g", "spec §10.2: real V4-Flash layer dims, 22 layers, 256 experts (~81 GB, EP over 2 GPUs)"},
    {"bench-4g", "spec §10.2: the full V4-Flash architecture (43 layers, 256 experts, ~156 GB)"},
    {"v4-flash", "DeepSeek-V4-Flash (spec §1.1)"},
    {"v4-pro", "DeepSeek-V4-Pro (spec §1.1)"},
};

}  // namespace

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& p : kPresets) names.emplace_back(p.name);
  return names;
}

std::string preset_description(const std::string& name) {
  for (const auto& p : kPresets)
    if (name == p.name) return p.description;
  return "";
}

ModelConfig preset_config(const std::string& name) {
  ModelConfig c = flash_dims();
  if (name == "tiny") {
    c.vocab_size = 129280;
    c.hidden_size = 256;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 4;
    c.head_dim = 128;
    c.qk_rope_head_dim = 64;
    c.q_lora_rank = 128;
    c.o_groups = 2;
    c.o_lora_rank = 128;
    c.sliding_window = 16;
    c.compress_ratios = {0, 4, 128, 4, 0};
    c.max_position_embeddings = 1024;
    c.index_n_heads = 4;
    c.index_head_dim = 128;
    c.index_topk = 8;
    c.n_routed_experts = 8;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = 128;
    c.num_hash_layers = 2;
  } else if (name == "bench-1g") {
    c.num_hidden_layers = 8;
    c.compress_ratios = {0, 0, 4, 128, 4, 128, 4, 128, 0};
  } else if (name == "bench-1g-L12") {
    c.num_hidden_layers = 12;
    c.compress_ratios = flash_ratios(5);
    c.compress_ratios.push_back(0);
  } else if (name == "bench-1g-depth") {
    c.n_routed_experts = 32;
  } else if (name == "bench-2g") {
    c.num_hidden_layers = 22;
    c.compress_ratios = flash_ratios(10);
    c.compress_ratios.push_back(0);
  } else if (name == "bench-4g" || name == "v4-flash") {
    // flash_dims() as is.
  } else if (name == "v4-pro") {
    c.hidden_size = 7168;
    c.num_hidden_layers = 61;
    c.num_attention_heads = 128;
    c.q_lora_rank = 1536;
    c.o_groups = 16;
    c.index_topk = 1024;
    c.n_routed_experts = 384;
    c.moe_intermediate_size = 3072;
    c.routed_scaling_factor = 2.5;
    c.compress_ratios = {128, 128};
    for (int i = 0; i < 29; ++i) {
      c.compress_ratios.push_back(4);
      c.compress_ratios.push_back(128);
    }
    c.compress_ratios.push_back(4);
    c.compress_ratios.push_back(0);
  } else {
    std::string names;
    for (const auto& p : kPresets) names += std::string(names.empty() ? "" : ", ") + p.name;
    fail("unknown preset \"{}\" (known: {})", name, names);
  }
  validate_config(c, "preset " + name);
  return c;
}

}  // namespace dsv4::model
