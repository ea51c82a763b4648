#include <cstdio>

#include <fmt/format.h>

#include "core/error.h"
#include "model/checkpoint_writer.h"
#include "model/config.h"
#include "tools/commands.h"

namespace dsv4::tools {

Command add_make_checkpoint(CLI::App& app) {
  struct Options {
    std::string preset = "tiny";
    uint64_t seed = 0;
    std::string out;
    std::string shard_size = "auto";
    int threads = 0;
  };
  auto o = std::make_shared<Options>();
  std::string presets;
  for (const auto& name : model::preset_names())
    presets += fmt::format("\n  {:15} {}", name, model::preset_description(name));
  app.description(
      "Write a synthetic DeepSeek-V4 checkpoint in the official Hugging Face layout: config.json,\n"
      "model-XXXXX-of-YYYYY.safetensors shards and model.safetensors.index.json, with FP8 e4m3 dense\n"
      "weights (128x128 UE8M0 scales), FP4 e2m1 experts (per-32 UE8M0 scales) and BF16/F32/I64 where the\n"
      "official checkpoint has them. Weights are scaled Gaussians quantized like real ones. Large presets\n"
      "stream to disk in bounded memory.\nPresets:" +
      presets);
  app.add_option("--preset", o->preset, "Model preset (see above)")->default_val("tiny");
  app.add_option("--seed", o->seed, "Seed of the synthetic weights")->default_val(0);
  app.add_option("--out", o->out, "Output directory (created if missing)")->required();
  app.add_option("--max-shard-size", o->shard_size, "Largest shard, e.g. 512M, 5G, or auto (about 8 shards)")
      ->default_val("auto");
  app.add_option("--threads", o->threads, "Generator threads (0: all cores)")->default_val(0);
  return [o] {
    const model::ModelConfig config = model::preset_config(o->preset);
    model::CheckpointWriteOptions w;
    w.out_dir = o->out;
    w.seed = o->seed;
    w.max_shard_bytes = parse_size(o->shard_size, "--max-shard-size");
    w.threads = o->threads;
    w.progress = stderr_progress("make-checkpoint");
    const model::CheckpointWriteResult r = model::write_checkpoint(config, w);
    std::fprintf(stderr, "make-checkpoint: wrote %s: preset %s, seed %llu, %zu tensors, %d shards, %.3f GB\n",
                 o->out.c_str(), o->preset.c_str(), (unsigned long long)o->seed, r.num_tensors, r.num_shards,
                 double(r.total_bytes) / 1e9);
    return 0;
  };
}

}  // namespace dsv4::tools
