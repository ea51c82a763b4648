#include <cstdio>

#include <nlohmann/json.hpp>

#include "model/checkpoint.h"
#include "model/weight_spec.h"
#include "tools/commands.h"

namespace dsv4::tools {

Command add_info(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  app.add_option("--model", *dir, "Checkpoint directory")->required();
  return [dir] {
    model::Checkpoint ckpt(*dir);
    const auto specs = model::checkpoint_tensor_specs(ckpt.config());
    ckpt.validate(specs);
    const auto& c = ckpt.config();
    std::printf("checkpoint %s: OK (%zu tensors in %zu files, %zu expected)\n", dir->c_str(), ckpt.num_tensors(),
                ckpt.num_files(), specs.size());
    std::printf("layers %lld (+%lld MTP), hidden %lld, heads %lld x %lld, experts %lld (top-%lld, %s), vocab %lld\n",
                (long long)c.num_hidden_layers, (long long)c.num_nextn_predict_layers, (long long)c.hidden_size,
                (long long)c.num_attention_heads, (long long)c.head_dim, (long long)c.n_routed_experts,
                (long long)c.num_experts_per_tok, c.expert_dtype.c_str(), (long long)c.vocab_size);
    std::printf("compress_ratios %s\n", nlohmann::json(c.compress_ratios).dump().c_str());
    std::printf("weights %.3f GB\n", double(model::total_bytes(specs)) / 1e9);
    return 0;
  };
}

}  // namespace dsv4::tools
