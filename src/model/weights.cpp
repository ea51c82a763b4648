#include "model/weights.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

#include "core/error.h"
#include "model/synthetic_weights.h"
#include "model/weight_spec.h"

namespace dsv4::model {

using core::Tensor;
using ops::QuantLinear;

namespace {

QuantLinear quant(const TensorLookup& get, const std::string& prefix, int64_t n, int64_t k, bool fp4) {
  QuantLinear q;
  q.weight = get(prefix + ".weight");
  q.scale = get(prefix + ".scale");
  q.format = fp4 ? QuantLinear::Format::kFp4Group32 : QuantLinear::Format::kFp8Block128;
  q.n = n;
  q.k = k;
  return q;
}

ops::HcWeights hc(const TensorLookup& get, const std::string& prefix, const std::string& kind) {
  return ops::HcWeights{get(prefix + "hc_" + kind + "_fn"), get(prefix + "hc_" + kind + "_base"),
                        get(prefix + "hc_" + kind + "_scale")};
}

ops::CompressorWeights compressor(const TensorLookup& get, const std::string& prefix, int64_t ratio,
                                  int64_t head_dim, bool rotate) {
  ops::CompressorWeights c;
  c.ratio = ratio;
  c.head_dim = head_dim;
  c.rotate = rotate;
  c.wkv = get(prefix + "wkv.weight");
  c.wgate = get(prefix + "wgate.weight");
  c.ape = get(prefix + "ape");
  c.norm = get(prefix + "norm.weight");
  return c;
}

int64_t expert_id_of(const std::string& name) {
  const std::string key = ".ffn.experts.";
  size_t at = name.find(key);
  if (at == std::string::npos) return -1;
  return std::strtoll(name.c_str() + at + key.size(), nullptr, 10);
}

LayerWeights layer(const ModelConfig& c, const TensorLookup& get, int64_t i, const std::string& p, int64_t eb,
                   int64_t ee) {
  LayerWeights l;
  l.index = i;
  l.ratio = c.compress_ratio(i);
  l.hash = c.is_hash_layer(i);
  const int64_t D = c.hidden_size, H = c.num_attention_heads, Dh = c.head_dim, Rq = c.q_lora_rank;
  const int64_t G = c.o_groups, Ro = c.o_lora_rank, I = c.moe_intermediate_size;
  l.attn_norm = get(p + "attn_norm.weight");
  l.ffn_norm = get(p + "ffn_norm.weight");
  l.hc_attn = hc(get, p, "attn");
  l.hc_ffn = hc(get, p, "ffn");
  l.attn_sink = get(p + "attn.attn_sink");
  l.wq_a = quant(get, p + "attn.wq_a", Rq, D, false);
  l.q_norm = get(p + "attn.q_norm.weight");
  l.wq_b = quant(get, p + "attn.wq_b", H * Dh, Rq, false);
  l.wkv = quant(get, p + "attn.wkv", Dh, D, false);
  l.kv_norm = get(p + "attn.kv_norm.weight");
  l.wo_a = quant(get, p + "attn.wo_a", G * Ro, H * Dh / G, false);
  l.wo_b = quant(get, p + "attn.wo_b", D, G * Ro, false);
  if (l.ratio > 0) l.compressor = compressor(get, p + "attn.compressor.", l.ratio, Dh, false);
  if (l.ratio == 4) {
    l.index_wq_b = quant(get, p + "attn.indexer.wq_b", c.index_n_heads * c.index_head_dim, Rq, false);
    l.index_weights_proj = get(p + "attn.indexer.weights_proj.weight");
    l.index_compressor = compressor(get, p + "attn.indexer.compressor.", 4, c.index_head_dim, true);
  }
  l.gate = get(p + "ffn.gate.weight");
  if (l.hash) l.tid2eid = get(p + "ffn.gate.tid2eid");
  else l.gate_bias = get(p + "ffn.gate.bias");
  l.experts.resize(size_t(c.n_routed_experts));
  const bool fp4 = c.experts_fp4();
  for (int64_t e = eb; e < ee; ++e) {
    const std::string ep = fmt::format("{}ffn.experts.{}.", p, e);
    l.experts[size_t(e)] = ops::ExpertWeights{quant(get, ep + "w1", I, D, fp4), quant(get, ep + "w2", D, I, fp4),
                                              quant(get, ep + "w3", I, D, fp4)};
  }
  l.shared = ops::ExpertWeights{quant(get, p + "ffn.shared_experts.w1", I, D, false),
                                quant(get, p + "ffn.shared_experts.w2", D, I, false),
                                quant(get, p + "ffn.shared_experts.w3", I, D, false)};
  return l;
}

}  // namespace

bool is_needed_tensor(const std::string& name, int64_t expert_begin, int64_t expert_end) {
  const int64_t e = expert_id_of(name);
  return e < 0 || (e >= expert_begin && e < expert_end);
}

ModelWeights bind_weights(const ModelConfig& c, const TensorLookup& get, int64_t eb, int64_t ee) {
  DSV4_CHECK(0 <= eb && eb <= ee && ee <= c.n_routed_experts, "expert range [{}, {}) of {}", eb, ee,
             c.n_routed_experts);
  ModelWeights w;
  w.expert_begin = eb;
  w.expert_end = ee;
  w.embed = get("embed.weight");
  w.head = get("head.weight");
  w.norm = get("norm.weight");
  w.hc_head = ops::HcWeights{get("hc_head_fn"), get("hc_head_base"), get("hc_head_scale")};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) w.layers.push_back(layer(c, get, i, fmt::format("layers.{}.", i), eb, ee));
  for (int64_t m = 0; m < c.num_nextn_predict_layers; ++m) {
    const std::string p = fmt::format("mtp.{}.", m);
    MtpWeights mtp;
    mtp.block = layer(c, get, c.num_hidden_layers + m, p, eb, ee);
    mtp.e_proj = quant(get, p + "e_proj", c.hidden_size, c.hidden_size, false);
    mtp.h_proj = quant(get, p + "h_proj", c.hidden_size, c.hidden_size, false);
    mtp.enorm = get(p + "enorm.weight");
    mtp.hnorm = get(p + "hnorm.weight");
    mtp.norm = get(p + "norm.weight");
    mtp.hc_head = ops::HcWeights{get(p + "hc_head_fn"), get(p + "hc_head_base"), get(p + "hc_head_scale")};
    w.mtp.push_back(std::move(mtp));
  }
  return w;
}

uint64_t needed_weight_bytes(const ModelConfig& config, int64_t eb, int64_t ee) {
  if (ee < 0) ee = config.n_routed_experts;
  std::vector<TensorSpec> needed;
  for (TensorSpec& s : checkpoint_tensor_specs(config))
    if (is_needed_tensor(s.name, eb, ee)) needed.push_back(std::move(s));
  return total_bytes(needed);
}

SyntheticWeightStore::SyntheticWeightStore(const ModelConfig& config, uint64_t seed, int64_t eb, int64_t ee,
                                           const SyntheticBuildOptions& options) {
  if (ee < 0) ee = config.n_routed_experts;
  const std::vector<TensorSpec> specs = checkpoint_tensor_specs(config);
  // Every tensor allocated first, so the map is only read while the threads draw.
  std::vector<size_t> drawn;  // weights (with their scales) and plain tensors
  uint64_t total = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    if (!is_needed_tensor(s.name, eb, ee)) continue;
    Tensor t = Tensor::empty_cpu(s.dtype, s.shape.data(), int(s.shape.size()));
    total += t.nbytes();
    tensors_[s.name] = t;
    if (s.init != WeightInit::kFp8Scale && s.init != WeightInit::kFp4Scale) drawn.push_back(i);
  }
  std::atomic<uint64_t> done{0};
  generate_tensors(
      specs, drawn, config.n_routed_experts, seed,
      [this](const std::string& name, uint64_t offset, const void* data, uint64_t size) {
        const Tensor& t = tensors_.at(name);
        DSV4_CHECK(offset + size <= t.nbytes(), "synthetic weights: piece [{}, {}) outside {} ({} bytes)", offset,
                   offset + size, name, t.nbytes());
        std::memcpy(static_cast<uint8_t*>(t.data()) + offset, data, size);
      },
      options.threads, done, total, options.progress, options.piece_elements);
}

Tensor SyntheticWeightStore::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) core::fail("synthetic weights: no tensor {}", name);
  return it->second;
}

}  // namespace dsv4::model
