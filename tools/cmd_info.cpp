#include <algorithm>
#include <cstdio>
#include <optional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/host_memory.h"
#include "model/checkpoint.h"
#include "model/transformer.h"
#include "model/weight_spec.h"
#include "model/weights.h"
#include "parallel/expert_parallel.h"
#include "tools/commands.h"
#if DSV4_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#endif

namespace dsv4::tools {

namespace {

std::string gb(std::optional<uint64_t> bytes) {
  return bytes ? fmt::format("{:.2f} GB", double(*bytes) / 1e9) : std::string("unknown");
}

}  // namespace

Command add_info(CLI::App& app) {
  struct Options {
    std::string model_dir, preset;
    int dp = 1;
  };
  auto o = std::make_shared<Options>();
  app.add_option("--model", o->model_dir, "Checkpoint directory (validated: every tensor's name, dtype and shape)");
  app.add_option("--preset", o->preset, "A preset instead (make-checkpoint --help lists them)");
  app.add_option("--dp", o->dp, "Also the weights a rank holds with the routed experts split over N ranks")
      ->default_val(1)->check(CLI::Range(1, 1024));
  app.footer(
      "Prints the configuration, the weights' size, and the memory free here for them: the host's (where a "
      "preset's weights are drawn without a GPU) and, where one is usable, GPU 0's.");
  return [o] {
    if (o->model_dir.empty() == o->preset.empty()) core::fail("info: give either --model DIR or --preset NAME");
    model::ModelConfig c;
    if (!o->model_dir.empty()) {
      model::Checkpoint ckpt(o->model_dir);
      const auto specs = model::checkpoint_tensor_specs(ckpt.config());
      ckpt.validate(specs);
      c = ckpt.config();
      std::printf("checkpoint %s: OK (%zu tensors in %zu files, %zu expected)\n", o->model_dir.c_str(),
                  ckpt.num_tensors(), ckpt.num_files(), specs.size());
    } else {
      c = model::preset_config(o->preset);
      std::printf("preset %s (synthetic weights: --preset %s --random-weights SEED)\n", o->preset.c_str(),
                  o->preset.c_str());
    }
    std::printf("layers %lld (+%lld MTP), hidden %lld, heads %lld x %lld, experts %lld (top-%lld, %s), vocab %lld\n",
                (long long)c.num_hidden_layers, (long long)c.num_nextn_predict_layers, (long long)c.hidden_size,
                (long long)c.num_attention_heads, (long long)c.head_dim, (long long)c.n_routed_experts,
                (long long)c.num_experts_per_tok, c.expert_dtype.c_str(), (long long)c.vocab_size);
    std::printf("compress_ratios %s\n", nlohmann::json(c.compress_ratios).dump().c_str());
    const uint64_t all = model::needed_weight_bytes(c);
    std::printf("weights %.3f GB\n", double(all) / 1e9);
    if (o->dp > 1) {
      uint64_t most = 0;
      for (int r = 0; r < o->dp; ++r) {
        const auto [eb, ee] = parallel::expert_range(c.n_routed_experts, o->dp, r);
        most = std::max(most, model::needed_weight_bytes(c, eb, ee));
      }
      std::printf("weights a rank, routed experts split over %d ranks: up to %.3f GB\n", o->dp, double(most) / 1e9);
    }
    // What --kv-cache-memory buys (serve): a sequence's state, and its rows per 1024 tokens; or
    // why a format cannot hold this model (the FP8 rows take V4's rope dims only).
    for (const auto& [name, layer_cost] : {std::pair{"CUDA, FP8 rows", &ops::fp8_cache_cost},
                                           std::pair{"CPU, bf16 rows", &ops::bf16_cache_cost}}) {
      try {
        const ops::CacheCost cost = model::model_cache_cost(c, layer_cost);
        std::printf("kv cache (%s): %.2f MB a sequence (window, compressor states) + %.1f KB per 1024 tokens of "
                    "context\n",
                    name, double(cost.per_slot) / 1e6, double(cost.per_page) * double(1024 / ops::kPageTokens) / 1e3);
      } catch (const core::Error& e) {
        std::printf("kv cache (%s): not possible: %s\n", name, e.what());
      }
    }
    std::printf("free here: host %s", gb(core::host_memory_available()).c_str());
#if DSV4_HAVE_CUDA
    std::string why;
    if (ops::cuda_device_available(&why)) std::printf(", GPU 0 %s", gb(ops::make_cuda_backend(0)->memory_available()).c_str());
    else std::printf(", no usable GPU (%s)", why.c_str());
#endif
    std::printf("\n");
    return 0;
  };
}

}  // namespace dsv4::tools
