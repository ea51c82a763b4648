#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <sstream>

#include <fmt/format.h>

#include "core/error.h"
#include "core/npy.h"
#include "engine/engine_builder.h"
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
    std::string model_dir, preset, backend = "auto", dump_logits, moe = "allgather", cpu_quant_dot = "fp32";
    uint64_t weight_seed = 0;
    std::vector<std::string> prompts;
    int32_t max_new_tokens = 16;
    float temperature = 0.0f, top_p = 1.0f, min_p = 0.0f;
    int32_t top_k = 0;
    uint64_t seed = 0;
    int threads = 1;
    int32_t prefill_chunk = 256;
    int32_t max_tokens_per_step = 512;
    int dp = 1;
    bool expert_parallel = false;
    bool no_graphs = false;
    ParallelFlags parallel;
  };
  auto o = std::make_shared<Options>();
  app.description(
      "Generate tokens for prompts given as token ids. All prompts run as one batch (spread over the\n"
      "data-parallel ranks with --dp). Prints the generated ids of each prompt on its own line,\n"
      "space-separated, in input order. Exactly --max-new-tokens are generated per prompt (EOS does not\n"
      "stop offline generation).");
  auto* model = app.add_option("--model", o->model_dir, "Checkpoint directory (HF layout)");
  auto* preset = app.add_option("--preset", o->preset, "Use a preset with synthetic weights instead of --model");
  model->excludes(preset);
  app.add_option("--random-weights", o->weight_seed, "Seed of the synthetic weights (with --preset)")->needs(preset);
  app.add_option("--backend", o->backend, "cpu, cuda, or auto (cuda when a GPU is usable)")
      ->default_val("auto")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
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
  app.add_option("--min-p", o->min_p, "Drop the tokens less likely than min_p times the most likely one (0: none)")
      ->default_val(0.0f)
      ->check(CLI::Range(0.0f, 1.0f));
  app.add_option("--seed", o->seed, "Sampling seed (prompt i uses seed + i)")->default_val(0);
  app.add_option("--dump-logits", o->dump_logits,
                 "Write a float32 .npy [num_prompts, max_new_tokens, vocab]: entry [s, i] is the logits row new "
                 "token i of prompt s was chosen from (i = 0: the last prompt position)");
  app.add_option("--dp", o->dp, "Data-parallel attention ranks (threads on the CPU, one GPU each on CUDA)")
      ->default_val(1)
      ->check(CLI::Range(1, 64));
  app.add_flag("--enable-expert-parallel", o->expert_parallel,
               "Split the routed experts over the --dp ranks (otherwise every rank holds all experts)");
  app.add_option("--moe", o->moe, "Expert-parallel MoE path: allgather (all-gather + reduce-scatter) or alltoall "
                                  "(dispatch/combine, bit-identical to one rank)")
      ->default_val("allgather")
      ->check(CLI::IsMember({"allgather", "alltoall"}));
  app.add_option("--threads", o->threads, "CPU backend threads per rank")->default_val(1)->check(CLI::Range(1, 256));
  app.add_option("--cpu-quant-dot,--cpu-fp4-dot", o->cpu_quant_dot,
                 "CPU backend: run the GEMMs in fp32 (the spec's arithmetic) or as the CUDA backend's Hopper "
                 "tensor-core GEMMs do (hopper: FP8 chunks with truncated alignment and 14-bit sums, bf16 steps "
                 "truncated toward zero, the CUDA launch's K slices); for comparing a CPU run with a GPU run "
                 "(--cpu-fp4-dot: the older name)")
      ->default_val("fp32")
      ->check(CLI::IsMember({"fp32", "hopper"}));
  app.add_option("--prefill-chunk", o->prefill_chunk, "Prompt tokens per sequence per step")
      ->default_val(256)
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--max-tokens-per-step", o->max_tokens_per_step, "Token rows per step and rank")
      ->default_val(512)
      ->check(CLI::Range(1, 1 << 20));
  app.add_flag("--no-cuda-graphs", o->no_graphs, "Run decode steps eagerly instead of replaying CUDA graphs");
  add_parallel_flags(app, o->parallel);
  return [o] {
    if (!o->dump_logits.empty()) expect_writable_file(o->dump_logits, "--dump-logits");
    if (o->model_dir.empty() && o->preset.empty()) core::fail("give --model DIR or --preset NAME --random-weights SEED");
    std::vector<engine::RequestParams> requests;
    int64_t longest = 0;
    for (size_t i = 0; i < o->prompts.size(); ++i) {
      engine::RequestParams r;
      r.prompt = parse_ids(o->prompts[i], i);
      r.max_tokens = o->max_new_tokens;
      r.ignore_eos = true;
      r.return_logits = !o->dump_logits.empty();
      r.sampling.temperature = o->temperature;
      r.sampling.top_p = o->top_p;
      r.sampling.top_k = o->top_k;
      r.sampling.min_p = o->min_p;
      r.sampling.seed = o->seed + i;
      longest = std::max<int64_t>(longest, int64_t(r.prompt.size()) + r.max_tokens);
      requests.push_back(std::move(r));
    }
    const int n = int(requests.size());
    const model::ModelConfig config = engine::source_config(engine::ModelSource{o->model_dir, o->preset, 0, {}});
    if (longest > config.max_position_embeddings)
      core::fail("the longest prompt plus --max-new-tokens is {} tokens, beyond the model's max_position_embeddings {}",
                 longest, config.max_position_embeddings);
    engine::EngineBuildOptions eo;
    eo.source = engine::ModelSource{o->model_dir, o->preset, o->weight_seed,
                                     stderr_progress("generate: weights", uint64_t(1) << 30)};  // (large models only)
    eo.backend = o->backend == "auto" ? default_backend_name() : o->backend;
    eo.threads = o->threads;
    if (o->cpu_quant_dot != "fp32" && eo.backend != "cpu")
      core::fail("--cpu-quant-dot {} applies to the CPU backend; this run uses --backend {}", o->cpu_quant_dot, eo.backend);
    eo.cpu_quant_dot = o->cpu_quant_dot == "hopper" ? ops::QuantDotModel::kHopperWgmma : ops::QuantDotModel::kExact;
    eo.dp = o->dp;
    eo.moe = o->expert_parallel ? engine::parse_moe_mode(o->moe) : engine::MoeMode::kLocal;
    const int per_rank = (n + o->dp - 1) / o->dp;
    eo.max_num_seqs = std::max(per_rank, 1);
    eo.max_num_batched_tokens = std::max(o->max_tokens_per_step, eo.max_num_seqs);
    eo.prefill_chunk = o->prefill_chunk;
    eo.max_model_len = int32_t(longest);
    eo.use_graphs = !o->no_graphs;
    apply_parallel_flags(o->parallel, eo);
    auto engine = engine::build_serving_engine(eo);
    const int64_t V = engine->config().vocab_size;

    std::mutex mutex;
    std::condition_variable done_cv;
    int done = 0;
    std::string error;
    std::vector<std::vector<int32_t>> outputs(static_cast<size_t>(n));
    std::vector<std::vector<float>> dump;
    if (!o->dump_logits.empty()) dump.assign(size_t(n), std::vector<float>(size_t(o->max_new_tokens * V)));
    for (int i = 0; i < n; ++i) {
      engine->submit(requests[size_t(i)], [&, i](const engine::TokenEvent& e) {
        std::lock_guard<std::mutex> lock(mutex);
        if (e.token >= 0) {
          auto& out = outputs[size_t(i)];
          if (e.logits != nullptr && !dump.empty())
            std::copy(e.logits, e.logits + V, dump[size_t(i)].begin() + int64_t(out.size()) * V);
          out.push_back(e.token);
        }
        if (e.finished) {
          if (e.reason == engine::FinishReason::kError && error.empty())
            error = fmt::format("prompt {}: {}", i, e.error);
          ++done;
          done_cv.notify_all();
        }
      });
    }
    {
      std::unique_lock<std::mutex> lock(mutex);
      done_cv.wait(lock, [&] { return done == n; });
    }
    engine->shutdown(true);
    if (!error.empty()) core::fail("{}", error);
    if (!dump.empty()) {
      core::NpyWriter writer(o->dump_logits, {int64_t(n), o->max_new_tokens, V});
      for (const auto& rows : dump) writer.append(rows.data(), rows.size());
      writer.close();
    }
    for (const auto& ids : outputs) {
      std::string line;
      for (size_t i = 0; i < ids.size(); ++i) {  // (appends: GCC 12 warns -Wrestrict on the concatenation)
        if (i) line += ' ';
        line += std::to_string(ids[i]);
      }
      std::printf("%s\n", line.c_str());
    }
    return 0;
  };
}

}  // namespace dsv4::tools
