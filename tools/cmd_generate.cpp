#include <cstdio>
#include <sstream>

#include <fmt/format.h>

#include "core/error.h"
#include "core/npy.h"
#include "engine/generator.h"
#include "engine/model_loader.h"
#include "engine/model_runner.h"
#include "tools/commands.h"

namespace dsv4::tools {

namespace {

std::vector<int32_t> parse_ids(const std::string& text, size_t index) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    if (used == 0 || used != item.size() || v < 0 || v > INT32_MAX)
      core::fail("--prompt-ids #{} (\"{}\"): \"{}\" is not a token id; expected comma-separated non-negative "
                 "integers such as 0,17,42",
                 index + 1, text, item);
    ids.push_back(int32_t(v));
  }
  if (ids.empty()) core::fail("--prompt-ids #{} is empty", index + 1);
  return ids;
}

}  // namespace

Command add_generate(CLI::App& app) {
  struct Options {
    std::string model_dir, preset, backend = "cpu", dump_logits;
    uint64_t weight_seed = 0;
    std::vector<std::string> prompts;
    int32_t max_new_tokens = 16;
    float temperature = 0.0f, top_p = 1.0f;
    int32_t top_k = 0;
    uint64_t seed = 0;
    int threads = 1;
    int32_t prefill_chunk = 256;
    int32_t max_tokens_per_step = 512;
  };
  auto o = std::make_shared<Options>();
  app.description(
      "Generate tokens for prompts given as token ids. All prompts run as one batch. Prints the generated\n"
      "ids of each prompt on its own line, space-separated, in input order. Exactly --max-new-tokens are\n"
      "generated per prompt (EOS does not stop offline generation).");
  auto* model = app.add_option("--model", o->model_dir, "Checkpoint directory (HF layout)");
  auto* preset = app.add_option("--preset", o->preset, "Use a preset with synthetic weights instead of --model");
  model->excludes(preset);
  app.add_option("--random-weights", o->weight_seed, "Seed of the synthetic weights (with --preset)")->needs(preset);
  app.add_option("--backend", o->backend, "cpu or cuda")->default_val("cpu")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--prompt-ids", o->prompts,
                 "Comma-separated token ids of one prompt, e.g. 0,17,42; repeat the option for more prompts")
      ->required()
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--max-new-tokens", o->max_new_tokens, "Tokens to generate per prompt")
      ->default_val(16)
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--temperature", o->temperature, "0 = greedy (argmax, ties to the lowest id)")
      ->default_val(0.0f)
      ->check(CLI::Range(0.0f, 100.0f));
  app.add_option("--top-p", o->top_p, "Nucleus sampling mass")->default_val(1.0f)->check(CLI::Range(0.0f, 1.0f));
  app.add_option("--top-k", o->top_k, "Sample among the k most likely (0: all)")->default_val(0);
  app.add_option("--seed", o->seed, "Sampling seed (prompt i uses seed + i)")->default_val(0);
  app.add_option("--dump-logits", o->dump_logits,
                 "Write a float32 .npy [num_prompts, max_new_tokens, vocab]: entry [s, i] is the logits row new "
                 "token i of prompt s was chosen from (i = 0: the last prompt position)");
  app.add_option("--threads", o->threads, "CPU backend threads")->default_val(1)->check(CLI::Range(1, 256));
  app.add_option("--prefill-chunk", o->prefill_chunk, "Prompt tokens per sequence per step")
      ->default_val(256)
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--max-tokens-per-step", o->max_tokens_per_step, "Token rows per step")
      ->default_val(512)
      ->check(CLI::Range(1, 1 << 20));
  return [o] {
    if (o->model_dir.empty() && o->preset.empty()) core::fail("give --model DIR or --preset NAME --random-weights SEED");
    std::vector<engine::GenerateRequest> requests;
    int64_t longest = 0;
    for (size_t i = 0; i < o->prompts.size(); ++i) {
      engine::GenerateRequest r;
      r.prompt = parse_ids(o->prompts[i], i);
      r.max_new_tokens = o->max_new_tokens;
      r.sampling.temperature = o->temperature;
      r.sampling.top_p = o->top_p;
      r.sampling.top_k = o->top_k;
      r.sampling.seed = o->seed + i;
      longest = std::max<int64_t>(longest, int64_t(r.prompt.size()) + r.max_new_tokens);
      requests.push_back(std::move(r));
    }
    auto backend = make_backend(o->backend, o->threads);
    engine::ModelSource source{o->model_dir, o->preset, o->weight_seed};
    auto loaded = engine::load_model(source, *backend);
    const int64_t V = loaded->config.vocab_size;

    engine::RunnerOptions ro;
    ro.max_tokens_per_step = o->max_tokens_per_step;
    ro.max_seqs_per_step = int32_t(std::max<size_t>(requests.size(), 1));
    ro.max_logit_rows = ro.max_seqs_per_step;
    ro.max_blocks_per_seq = std::max(1, engine::pages_for_positions(longest));
    ro.cache.num_slots = int64_t(requests.size());
    ro.cache.num_pages = int64_t(requests.size()) * ro.max_blocks_per_seq;
    engine::ModelRunner runner(loaded->config, loaded->weights, *backend, ro);
    engine::IndexPool slots(int32_t(ro.cache.num_slots)), pages(int32_t(ro.cache.num_pages));

    // Logits rows arrive out of order across prompts; keep them until written.
    std::vector<std::vector<float>> dump;
    if (!o->dump_logits.empty()) dump.assign(requests.size(), std::vector<float>(size_t(o->max_new_tokens * V)));
    engine::GenerateOptions go;
    go.prefill_chunk = o->prefill_chunk;
    auto observer = [&](int s, int i, const float* row, int32_t) {
      if (!dump.empty()) std::copy(row, row + V, dump[size_t(s)].begin() + int64_t(i) * V);
    };
    const auto outputs = engine::generate(runner, slots, pages, requests, go, observer);
    if (!dump.empty()) {
      core::NpyWriter writer(o->dump_logits, {int64_t(requests.size()), o->max_new_tokens, V});
      for (const auto& rows : dump) writer.append(rows.data(), rows.size());
      writer.close();
    }
    for (const auto& ids : outputs) {
      std::string line;
      for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
      std::printf("%s\n", line.c_str());
    }
    return 0;
  };
}

}  // namespace dsv4::tools
