// dsv4 bench decode: the decode step of a preset at a given batch and context,
// replayed from its CUDA graph, against the memory roofline (bytes the step
// must move / copy bandwidth measured in the same run).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <regex>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "engine/kv_pool.h"
#include "engine/model_loader.h"
#include "engine/model_runner.h"
#include "model/weight_spec.h"
#include "ops/kv_format.h"
#include "tools/commands.h"

namespace dsv4::tools {

namespace {

struct BenchOptions {
  std::string preset = "bench-1g";
  std::string model_dir;
  uint64_t weight_seed = 1;
  std::string backend = "auto";
  std::string batches = "1,16,64,256";
  int64_t context = 4096;
  int warmup = 20;
  int replays = 200;
  int threads = 1;
  std::string json;
};

std::vector<int32_t> parse_list(const std::string& text, const char* option) {
  std::vector<int32_t> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    std::string item = text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    try {
      size_t used = 0;
      int v = std::stoi(item, &used);
      if (used != item.size() || v <= 0) throw std::invalid_argument("");
      out.push_back(v);
    } catch (...) {
      core::fail("{}: \"{}\" is not a positive integer (expected a list such as 1,16,64,256)", option, item);
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Device-to-device copy bandwidth (bytes read + written per second), the roofline denominator.
double measure_copy_bandwidth(ops::Backend& be) {
  const int64_t bytes = be.device() == core::Device::kCuda ? (1ll << 30) : (64ll << 20);
  core::Tensor a = be.empty(core::DType::kU8, {bytes}), b = be.empty(core::DType::kU8, {bytes});
  {
    // Random bytes: never time on zeros (some memory paths compress them).
    std::vector<uint8_t> host(static_cast<size_t>(bytes));
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < host.size(); i += 8) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      std::memcpy(host.data() + i, &x, std::min<size_t>(8, host.size() - i));
    }
    be.upload(a, host.data(), host.size());
  }
  be.copy(b, a);
  auto timer = be.make_timer();
  std::vector<double> ms;
  for (int i = 0; i < 10; ++i) {
    timer->start();
    be.copy(b, a);
    timer->stop();
    ms.push_back(timer->elapsed_ms());
  }
  return 2.0 * double(bytes) / (median(ms) * 1e-3);
}

// Bytes of every checkpoint tensor by name (for the weights a step reads).
std::map<std::string, uint64_t> tensor_bytes(const model::ModelConfig& c) {
  std::map<std::string, uint64_t> out;
  for (const auto& s : model::checkpoint_tensor_specs(c)) {
    uint64_t n = core::dtype_size(s.dtype);
    for (int64_t d : s.shape) n *= uint64_t(d);
    out[s.name] = n;
  }
  return out;
}

}  // namespace

Command add_bench_decode(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  app.footer(
      "Decode-step benchmark: each batch size runs one decode step per sequence at position --context\n"
      "(caches filled with random valid content), replayed from its CUDA graph; reports the median step\n"
      "time over --replays replays after --warmup, tokens/s, a per-stage breakdown (event-timed eager run),\n"
      "the bytes the step must move (weights actually touched given the routing, KV read) and the ratio\n"
      "to the memory roofline (bytes / device-to-device copy bandwidth measured in the same run).");
  app.add_option("--preset", o->preset, "Model preset with synthetic weights")->default_val("bench-1g");
  app.add_option("--model", o->model_dir, "Checkpoint directory instead of a preset");
  app.add_option("--random-weights", o->weight_seed, "Seed of the synthetic weights")->default_val(1);
  app.add_option("--backend", o->backend, "auto, cuda or cpu")->default_val("auto")->check(
      CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--batch", o->batches, "Comma-separated batch sizes (sequences per step)")->default_val("1,16,64,256");
  app.add_option("--context", o->context, "Position of the decoded token (context length)")->default_val(4096)
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--warmup", o->warmup, "Graph replays before timing")->default_val(20);
  app.add_option("--replays", o->replays, "Timed graph replays (median reported)")->default_val(200)->check(
      CLI::Range(1, 100000));
  app.add_option("--threads", o->threads, "CPU backend threads")->default_val(1);
  app.add_option("--json", o->json, "Write the results as JSON");
  return [o] {
    auto backend = make_backend(o->backend == "auto" ? default_backend_name() : o->backend, o->threads);
    const std::vector<int32_t> batches = parse_list(o->batches, "--batch");
    std::fprintf(stderr, "bench decode: loading %s on %s...\n", o->model_dir.empty() ? o->preset.c_str() : o->model_dir.c_str(),
                 backend->name().c_str());
    engine::ModelSource source{o->model_dir, o->model_dir.empty() ? o->preset : "", o->weight_seed};
    auto loaded = engine::load_model(source, *backend);
    const model::ModelConfig& c = loaded->config;
    const double copy_bw = measure_copy_bandwidth(*backend);
    std::fprintf(stderr, "bench decode: copy bandwidth %.0f GB/s (read + write)\n", copy_bw / 1e9);
    const auto sizes = tensor_bytes(c);
    const int64_t row_bytes = ops::kv_row_bytes(c.head_dim, c.qk_rope_head_dim);
    const int64_t index_row = ops::index_row_bytes(c.index_head_dim);
    const int64_t k = c.num_experts_per_tok, p = o->context;

    nlohmann::json results = nlohmann::json::array();
    std::printf("%-6s %10s %10s %10s %10s %8s   %s\n", "batch", "step ms", "tok/s", "GB moved", "GB/s", "x roof",
                "stage ms (eager, event-timed)");
    for (int32_t B : batches) {
      engine::RunnerOptions ro;
      ro.max_tokens_per_step = B;
      ro.max_seqs_per_step = B;
      ro.max_logit_rows = B;
      ro.max_blocks_per_seq = engine::pages_for_positions(p + 1);
      ro.cache.num_slots = B;
      ro.cache.num_pages = int64_t(B) * ro.max_blocks_per_seq;
      ro.use_graphs = true;
      ro.graph_buckets = {B};
      engine::ModelRunner runner(c, loaded->weights, *backend, ro);
      for (size_t l = 0; l < runner.caches().size(); ++l) backend->randomize_cache(runner.caches()[l], 1000 + l);
      // B sequences, each decoding its token at position `context`.
      std::vector<std::vector<int32_t>> pages(static_cast<size_t>(B)), tokens(static_cast<size_t>(B));
      std::vector<engine::SequenceSlice> slices;
      for (int32_t s = 0; s < B; ++s) {
        for (int32_t b = 0; b < ro.max_blocks_per_seq; ++b) pages[size_t(s)].push_back(s * ro.max_blocks_per_seq + b);
        tokens[size_t(s)] = {int32_t((uint64_t(s) * 2654435761u + 7) % uint64_t(c.vocab_size))};
        engine::SequenceSlice sl;
        sl.state_slot = s;
        sl.start_pos = int32_t(p);
        sl.tokens = tokens[size_t(s)].data();
        sl.num_tokens = 1;
        sl.block_table = &pages[size_t(s)];
        sl.want_logits = true;
        slices.push_back(sl);
      }
      const engine::StepMetadata meta = engine::build_step_metadata(slices);
      const std::vector<double> ms = runner.time_graph_replays(meta, o->warmup, o->replays);
      const double step_ms = median(ms);

      // Eager, event-timed run: per-stage times and the routing of every layer.
      std::map<std::string, double> stage_ms;
      std::vector<std::set<int32_t>> touched(static_cast<size_t>(c.num_hidden_layers));
      auto timer = backend->make_timer();
      const std::regex layer_prefix("^L([0-9]+)\\.");
      runner.step_eager_with_hook(meta, [&](const model::Stage& stage, bool after) {
        if (!after) {
          timer->start();
          return;
        }
        timer->stop();
        const std::string kind = std::regex_replace(stage.name, layer_prefix, "");
        stage_ms[kind] += timer->elapsed_ms();
        std::smatch m;
        if (kind == "attn_core" && std::regex_search(stage.name, m, layer_prefix)) {
          const int64_t l = std::stoll(m[1]);
          std::vector<int32_t> ids(size_t(B * k));
          backend->download(ids.data(), runner.buffers().router_ids.rows(0, B), ids.size() * 4);
          touched[size_t(l)].insert(ids.begin(), ids.end());
        }
      });

      // Bytes the step must move.
      uint64_t weights = 0, experts_bytes = 0, kv = 0;
      for (const auto& [name, n] : sizes) {
        if (name.rfind("mtp.", 0) == 0) continue;
        if (name.find(".ffn.experts.") != std::string::npos) continue;
        if (name == "embed.weight") continue;
        weights += n;
      }
      weights += uint64_t(B) * uint64_t(c.hidden_size) * 2;  // the embedding rows read
      const uint64_t per_expert = sizes.at("layers.0.ffn.experts.0.w1.weight") + sizes.at("layers.0.ffn.experts.0.w1.scale") +
                                  sizes.at("layers.0.ffn.experts.0.w2.weight") + sizes.at("layers.0.ffn.experts.0.w2.scale") +
                                  sizes.at("layers.0.ffn.experts.0.w3.weight") + sizes.at("layers.0.ffn.experts.0.w3.scale");
      size_t num_touched = 0;
      for (const auto& t : touched) num_touched += t.size();
      experts_bytes = num_touched * per_expert;
      const int64_t window = std::min<int64_t>(p + 1, c.sliding_window);
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        const int64_t ratio = c.compress_ratio(l);
        int64_t keys = window;
        if (ratio == 4) {
          const int64_t n_c = (p + 1) / 4;
          keys += std::min(c.index_topk, n_c);
          kv += uint64_t(B) * uint64_t(n_c * index_row);  // the indexer scans every row
        } else if (ratio == 128) {
          keys += (p + 1) / 128;
        }
        kv += uint64_t(B) * uint64_t(keys * row_bytes);
      }
      const uint64_t total = weights + experts_bytes + kv;
      const double roofline_ms = double(total) / copy_bw * 1e3;
      std::string breakdown;
      for (const auto& [name, t] : stage_ms) breakdown += fmt::format("{}={:.3f} ", name, t);
      std::printf("%-6d %10.3f %10.0f %10.3f %10.0f %8.2f   %s\n", B, step_ms, B / (step_ms * 1e-3), total / 1e9,
                  total / (step_ms * 1e-3) / 1e9, step_ms / roofline_ms, breakdown.c_str());
      std::fflush(stdout);
      nlohmann::json r;
      r["batch"] = B;
      r["context"] = p;
      r["step_ms_median"] = step_ms;
      r["step_ms_min"] = *std::min_element(ms.begin(), ms.end());
      r["step_ms_max"] = *std::max_element(ms.begin(), ms.end());
      r["replays"] = ms.size();
      r["tokens_per_s"] = B / (step_ms * 1e-3);
      r["bytes"] = {{"weights_dense", weights}, {"experts", experts_bytes}, {"experts_touched", num_touched},
                    {"kv", kv}, {"total", total}};
      r["roofline_ms"] = roofline_ms;
      r["ratio_to_roofline"] = step_ms / roofline_ms;
      r["achieved_gb_s"] = total / (step_ms * 1e-3) / 1e9;
      r["stage_ms_eager"] = stage_ms;
      results.push_back(r);
    }
    if (!o->json.empty()) {
      nlohmann::json out;
      out["preset"] = o->model_dir.empty() ? o->preset : o->model_dir;
      out["backend"] = backend->name();
      out["copy_bandwidth_gb_s"] = copy_bw / 1e9;
      out["results"] = results;
      std::ofstream(o->json) << out.dump(2) << "\n";
    }
    return 0;
  };
}

}  // namespace dsv4::tools
