#include "model/weight_spec.h"

#include <cmath>
#include <string_view>

#include <fmt/format.h>

#include "core/error.h"

namespace dsv4::model {

using core::DType;

namespace {

class SpecBuilder {
 public:
  explicit SpecBuilder(const ModelConfig& c) : c_(c) {}

  void normal(const std::string& name, DType dtype, std::vector<int64_t> shape, float mean, float std, int group,
              std::string why) {
    TensorSpec s;
    s.name = name;
    s.dtype = dtype;
    s.shape = std::move(shape);
    s.mean = mean;
    s.std = std;
    s.group = group;
    s.derivation = std::move(why);
    specs_.push_back(std::move(s));
  }

  // A [n, k] FP8 weight with its 128x128 block scale.
  void fp8(const std::string& prefix, int64_t n, int64_t k, int group, const std::string& why) {
    float std = 1.0f / std::sqrt(float(k));
    TensorSpec w;
    w.name = prefix + ".weight";
    w.dtype = DType::kF8E4M3;
    w.shape = {n, k};
    w.init = WeightInit::kFp8Weight;
    w.std = std;
    w.pair = prefix + ".scale";
    w.logical_n = n;
    w.logical_k = k;
    w.group = group;
    w.derivation = why;
    TensorSpec s = w;
    s.name = prefix + ".scale";
    s.dtype = DType::kF8E8M0;
    s.shape = {(n + 127) / 128, (k + 127) / 128};
    s.init = WeightInit::kFp8Scale;
    s.pair = w.name;
    specs_.push_back(std::move(w));
    specs_.push_back(std::move(s));
  }

  // A [n, k] FP4 weight packed as I8 [n, k/2] with per-32 scales [n, k/32].
  void fp4(const std::string& prefix, int64_t n, int64_t k, int group, const std::string& why) {
    TensorSpec w;
    w.name = prefix + ".weight";
    w.dtype = DType::kI8;
    w.shape = {n, k / 2};
    w.init = WeightInit::kFp4Weight;
    w.std = 1.0f / std::sqrt(float(k));
    w.pair = prefix + ".scale";
    w.logical_n = n;
    w.logical_k = k;
    w.group = group;
    w.derivation = why;
    TensorSpec s = w;
    s.name = prefix + ".scale";
    s.dtype = DType::kF8E8M0;
    s.shape = {n, k / 32};
    s.init = WeightInit::kFp4Scale;
    s.pair = w.name;
    specs_.push_back(std::move(w));
    specs_.push_back(std::move(s));
  }

  void expert(const std::string& prefix, int64_t n, int64_t k, int group, const std::string& why) {
    if (c_.experts_fp4()) fp4(prefix, n, k, group, why);
    else fp8(prefix, n, k, group, why);
  }

  void layer(int64_t i, const std::string& p) {
    const ModelConfig& c = c_;
    const int g = int(i);
    const int64_t D = c.hidden_size, H = c.num_attention_heads, Dh = c.head_dim, Rq = c.q_lora_rank;
    const int64_t G = c.o_groups, Ro = c.o_lora_rank, E = c.n_routed_experts, I = c.moe_intermediate_size;
    const int64_t mix = c.hc_mix_dim(), hcD = c.hc_mult * D;
    const std::string dims = fmt::format("hidden_size={}", D);
    const std::string hc = fmt::format("hc_mult={}, hidden_size={}", c.hc_mult, D);
    normal(p + "attn_norm.weight", DType::kBF16, {D}, 1.0f, 0.1f, g, dims);
    normal(p + "ffn_norm.weight", DType::kBF16, {D}, 1.0f, 0.1f, g, dims);
    for (const char* sub : {"attn", "ffn"}) {
      normal(p + "hc_" + sub + "_fn", DType::kF32, {mix, hcD}, 0.0f, 1.0f / std::sqrt(float(hcD)), g, hc);
      normal(p + "hc_" + sub + "_base", DType::kF32, {mix}, 0.0f, 0.5f, g, hc);
      normal(p + "hc_" + sub + "_scale", DType::kF32, {3}, 1.0f, 0.1f, g, hc);
    }
    normal(p + "attn.attn_sink", DType::kF32, {H}, 0.0f, 1.0f, g, fmt::format("num_attention_heads={}", H));
    fp8(p + "attn.wq_a", Rq, D, g, fmt::format("q_lora_rank={}, hidden_size={}", Rq, D));
    normal(p + "attn.q_norm.weight", DType::kBF16, {Rq}, 1.0f, 0.1f, g, fmt::format("q_lora_rank={}", Rq));
    fp8(p + "attn.wq_b", H * Dh, Rq, g,
        fmt::format("num_attention_heads={}, head_dim={}, q_lora_rank={}", H, Dh, Rq));
    fp8(p + "attn.wkv", Dh, D, g, fmt::format("head_dim={}, hidden_size={}", Dh, D));
    normal(p + "attn.kv_norm.weight", DType::kBF16, {Dh}, 1.0f, 0.1f, g, fmt::format("head_dim={}", Dh));
    fp8(p + "attn.wo_a", G * Ro, H * Dh / G, g,
        fmt::format("o_groups={}, o_lora_rank={}, num_attention_heads={}, head_dim={}", G, Ro, H, Dh));
    specs_[specs_.size() - 2].grouped_linear = true;  // (the weight; its scale is plain)
    fp8(p + "attn.wo_b", D, G * Ro, g, fmt::format("hidden_size={}, o_groups={}, o_lora_rank={}", D, G, Ro));

    const int64_t ratio = c.compress_ratio(i);
    if (ratio > 0) {
      const int64_t coff = ratio == 4 ? 2 : 1;
      const std::string why = fmt::format("compress_ratio={}, head_dim={}, hidden_size={}", ratio, Dh, D);
      normal(p + "attn.compressor.wkv.weight", DType::kBF16, {coff * Dh, D}, 0.0f, 1.0f / std::sqrt(float(D)), g, why);
      normal(p + "attn.compressor.wgate.weight", DType::kBF16, {coff * Dh, D}, 0.0f, 1.0f / std::sqrt(float(D)), g,
             why);
      normal(p + "attn.compressor.ape", DType::kF32, {ratio, coff * Dh}, 0.0f, 0.5f, g, why);
      normal(p + "attn.compressor.norm.weight", DType::kBF16, {Dh}, 1.0f, 0.1f, g, why);
    }
    if (ratio == 4) {
      const int64_t Hi = c.index_n_heads, Di = c.index_head_dim;
      const std::string why = fmt::format("index_n_heads={}, index_head_dim={}, hidden_size={}", Hi, Di, D);
      fp8(p + "attn.indexer.wq_b", Hi * Di, Rq, g,
          fmt::format("index_n_heads={}, index_head_dim={}, q_lora_rank={}", Hi, Di, Rq));
      normal(p + "attn.indexer.weights_proj.weight", DType::kBF16, {Hi, D}, 0.0f, 1.0f / std::sqrt(float(D)), g, why);
      normal(p + "attn.indexer.compressor.wkv.weight", DType::kBF16, {2 * Di, D}, 0.0f, 1.0f / std::sqrt(float(D)), g,
             why);
      normal(p + "attn.indexer.compressor.wgate.weight", DType::kBF16, {2 * Di, D}, 0.0f,
             1.0f / std::sqrt(float(D)), g, why);
      normal(p + "attn.indexer.compressor.ape", DType::kF32, {4, 2 * Di}, 0.0f, 0.5f, g, why);
      normal(p + "attn.indexer.compressor.norm.weight", DType::kBF16, {Di}, 1.0f, 0.1f, g, why);
    }

    const std::string gate_why = fmt::format("n_routed_experts={}, hidden_size={}", E, D);
    normal(p + "ffn.gate.weight", DType::kBF16, {E, D}, 0.0f, 1.0f / std::sqrt(float(D)), g, gate_why);
    if (c.is_hash_layer(i)) {
      TensorSpec t;
      t.name = p + "ffn.gate.tid2eid";
      t.dtype = DType::kI64;
      t.shape = {c.vocab_size, c.num_experts_per_tok};
      t.init = WeightInit::kExpertIds;
      t.group = g;
      t.derivation = fmt::format("vocab_size={}, num_experts_per_tok={}, layer {} < num_hash_layers={}", c.vocab_size,
                                 c.num_experts_per_tok, i, c.num_hash_layers);
      specs_.push_back(std::move(t));
    } else {
      normal(p + "ffn.gate.bias", DType::kF32, {E}, 0.0f, 0.1f, g, gate_why);
    }
    const std::string ewhy = fmt::format("moe_intermediate_size={}, hidden_size={}, expert_dtype={}", I, D,
                                         c.expert_dtype);
    for (int64_t e = 0; e < E; ++e) {
      const std::string ep = fmt::format("{}ffn.experts.{}.", p, e);
      expert(ep + "w1", I, D, g, ewhy);
      expert(ep + "w3", I, D, g, ewhy);
      expert(ep + "w2", D, I, g, ewhy);
    }
    const std::string swhy = fmt::format("moe_intermediate_size={}, hidden_size={}", I, D);
    fp8(p + "ffn.shared_experts.w1", I, D, g, swhy);
    fp8(p + "ffn.shared_experts.w3", I, D, g, swhy);
    fp8(p + "ffn.shared_experts.w2", D, I, g, swhy);
  }

  void hc_head(const std::string& p, int group) {
    const int64_t D = c_.hidden_size, hcD = c_.hc_mult * D;
    const std::string why = fmt::format("hc_mult={}, hidden_size={}", c_.hc_mult, D);
    normal(p + "hc_head_fn", DType::kF32, {c_.hc_mult, hcD}, 0.0f, 1.0f / std::sqrt(float(hcD)), group, why);
    normal(p + "hc_head_base", DType::kF32, {c_.hc_mult}, 0.0f, 0.5f, group, why);
    normal(p + "hc_head_scale", DType::kF32, {1}, 1.0f, 0.1f, group, why);
  }

  std::vector<TensorSpec> build() {
    const ModelConfig& c = c_;
    const int64_t D = c.hidden_size, V = c.vocab_size;
    const std::string vd = fmt::format("vocab_size={}, hidden_size={}", V, D);
    normal("embed.weight", DType::kBF16, {V, D}, 0.0f, 1.0f, -1, vd);
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) layer(i, fmt::format("layers.{}.", i));
    for (int64_t m = 0; m < c.num_nextn_predict_layers; ++m) {
      const int64_t i = c.num_hidden_layers + m;
      const std::string p = fmt::format("mtp.{}.", m);
      layer(i, p);
      const std::string why = fmt::format("hidden_size={}", D);
      fp8(p + "e_proj", D, D, int(i), why);
      fp8(p + "h_proj", D, D, int(i), why);
      normal(p + "enorm.weight", DType::kBF16, {D}, 1.0f, 0.1f, int(i), why);
      normal(p + "hnorm.weight", DType::kBF16, {D}, 1.0f, 0.1f, int(i), why);
      normal(p + "norm.weight", DType::kBF16, {D}, 1.0f, 0.1f, int(i), why);
      hc_head(p, int(i));
    }
    normal("norm.weight", DType::kBF16, {D}, 1.0f, 0.1f, -1, fmt::format("hidden_size={}", D));
    hc_head("", -1);
    normal("head.weight", DType::kBF16, {V, D}, 0.0f, 1.0f / std::sqrt(float(D)), -1, vd);
    return std::move(specs_);
  }

 private:
  const ModelConfig& c_;
  std::vector<TensorSpec> specs_;
};

}  // namespace

std::vector<TensorSpec> checkpoint_tensor_specs(const ModelConfig& config) { return SpecBuilder(config).build(); }

uint64_t total_bytes(const std::vector<TensorSpec>& specs) {
  uint64_t total = 0;
  for (const auto& s : specs) {
    uint64_t n = core::dtype_size(s.dtype);
    for (int64_t d : s.shape) n *= uint64_t(d);
    total += n;
  }
  return total;
}

std::string decode_stage_of_tensor(const std::string& name) {
  auto starts = [&](std::string_view prefix) { return name.rfind(prefix, 0) == 0; };
  if (starts("mtp.")) return "";
  if (name == "embed.weight") return "embed";
  if (name == "head.weight" || name == "norm.weight" || starts("hc_head_")) return "logits";
  if (!starts("layers.")) core::fail("decode_stage_of_tensor: '{}' is not a tensor the stage map knows", name);
  const size_t dot = name.find('.', 7);
  const std::string local = dot == std::string::npos ? "" : name.substr(dot + 1);  // after "layers.L."
  auto is = [&](std::string_view prefix) { return local.rfind(prefix, 0) == 0; };
  // Transformer::append_layer's stages (docs/ARCHITECTURE.md, the forward pass).
  if (is("hc_attn_") || is("attn_norm.") || is("attn.wq_a") || is("attn.wkv")) return "attn_in";
  if (is("attn.q_norm.") || is("attn.wq_b") || is("attn.indexer.wq_b")) return "attn_q";
  if (is("attn.kv_norm.")) return "attn_kv";
  if (is("attn.indexer.")) return "index_in";  // weights_proj and the indexer's compressor
  if (is("attn.compressor.")) return "compress";
  if (is("attn.attn_sink")) return "attn_core";
  // attn_out: the output projections, hc_post, then the FFN's hc_pre and ffn_norm.
  if (is("attn.wo_a") || is("attn.wo_b") || is("hc_ffn_") || is("ffn_norm.")) return "attn_out";
  if (is("ffn.gate.")) return "router";
  if (is("ffn.shared_experts.")) return "shared_expert";
  if (is("ffn.experts.")) return "experts";
  core::fail("decode_stage_of_tensor: '{}' is not a tensor the stage map knows", name);
}

}  // namespace dsv4::model
