// dsv4 bench decode: the decode step of a preset at a given batch and context,
// replayed from its CUDA graph, against the memory roofline (bytes the step
// must move / copy bandwidth measured in the same run).
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <map>
#include <regex>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/gpu_clocks.h"
#include "engine/dp_ranks.h"
#include "engine/kv_pool.h"
#include "parallel/expert_parallel.h"
#include "engine/model_loader.h"
#include "engine/model_runner.h"
#include "model/weight_spec.h"
#include "ops/kv_format.h"
#include "tools/commands.h"
#include "tools/env_switches.h"
#if DSV4_HAVE_CUDA
#include "ops/cuda/cta_probe.h"
#endif

namespace dsv4::tools {

namespace {

struct BenchOptions {
  std::string preset = "bench-1g";
  std::string model_dir;
  uint64_t weight_seed = 1;
  std::string backend = "auto";
  std::string batches = "1,16,64,256";
  int64_t context = 4096;
  int64_t position_spread = 1;
  int warmup = 20;
  int replays = 200;
  int eager_runs = 5;
  int clock_period_ms = 5;  // 0: the clocks are not read
  int threads = 1;
  int dp = 1;
  std::string moe = "allgather";
  int nccl_max_ctas = 0;
  double comm_timeout_s = 120;
  bool use_graphs = true;
  bool profile = false;
  std::string pair_probe;  // offsets in µs; empty: no probe
  std::string cta_probe;   // TSV file; empty: no probe
  int cta_probe_replays = 3;
  int64_t cta_probe_records = int64_t(16) << 20;
  std::string json;
};

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

// One rank's measurement of one batch size.
struct RankRun {
  std::vector<double> step_ms;                 // graph replays (or eager steps where not capturable)
  std::vector<double> served_ms;               // graphs: a greedy step as serving runs it, host wall (below)
  std::vector<double> served_sampled_ms;       // the same, every row sampled (temperature 1, top_p 0.95)
  std::map<std::string, double> stage_ms;      // eager, event-timed, by stage kind: the median over the runs
  double comm_ms = 0;                          // eager: stages tagged communication (the median over the runs)
  std::vector<double> eager_step_ms;           // each eager run's stage times summed, in run order
  std::vector<std::set<int32_t>> touched;      // routed expert ids per layer (every row of this rank)
  std::map<int64_t, int64_t> expert_rows;      // rows an expert gets in a layer -> how many (layer, expert)
  uint64_t kv_index_bytes = 0;                 // indexer rows the top-k scans (index_topk)
  uint64_t kv_attention_bytes = 0;             // KV records attention reads (attn_core)
  std::vector<core::ClockSample> clocks;       // rank 0: the GPU's clocks during the timed replays
  bool graphs = false;
};

// Sequence s of a decode step at context p decodes at p - (s mod spread): with spread 1
// every row at p, so no compressor emits a row at p = 4096; a spread of 128 (Flash's HCA
// ratio) gives every compressed layer its share of emitting rows, as in serving.
int64_t decode_position(int64_t p, int32_t s, int64_t spread) { return p - int64_t(s) % spread; }

// The step of B sequences decoding their token at decode_position(p, s, spread) on
// `runner`, its caches filled with random valid content (seeded by `rank`).
engine::StepMetadata prepare_decode_step(engine::ModelRunner& runner, ops::Backend& backend,
                                         const model::ModelConfig& c, int32_t B, int64_t p, int rank,
                                         int64_t spread) {
  const int32_t blocks = runner.options().max_blocks_per_seq;
  for (size_t l = 0; l < runner.caches().size(); ++l) backend.randomize_cache(runner.caches()[l], 1000 + l + 7919 * rank);
  std::vector<std::vector<int32_t>> pages(static_cast<size_t>(B)), tokens(static_cast<size_t>(B));
  std::vector<engine::SequenceSlice> slices;
  for (int32_t s = 0; s < B; ++s) {
    for (int32_t b = 0; b < blocks; ++b) pages[size_t(s)].push_back(s * blocks + b);
    tokens[size_t(s)] = {int32_t((uint64_t(s + B * rank) * 2654435761u + 7) % uint64_t(c.vocab_size))};
    engine::SequenceSlice sl;
    sl.state_slot = s;
    sl.start_pos = int32_t(decode_position(p, s, spread));
    sl.tokens = tokens[size_t(s)].data();
    sl.num_tokens = 1;
    sl.block_table = &pages[size_t(s)];
    sl.want_logits = true;
    slices.push_back(sl);
  }
  return engine::build_step_metadata(slices);
}

// Runner options for decode steps of `rows` sequences at position p, one graph bucket.
engine::RunnerOptions decode_runner_options(int32_t rows, int64_t p, bool graphs) {
  engine::RunnerOptions ro;
  ro.max_tokens_per_step = rows;
  ro.max_seqs_per_step = rows;
  ro.max_logit_rows = rows;
  ro.max_blocks_per_seq = engine::pages_for_positions(p + 1);
  ro.cache.num_slots = rows;
  ro.cache.num_pages = int64_t(rows) * ro.max_blocks_per_seq;
  ro.use_graphs = graphs;
  ro.graph_buckets = {rows};
  return ro;
}

// --pair-probe: what two independent micro-batches of B rows gain from sharing one GPU
// at once, against one step of 2B rows (the question behind single-GPU two-batch
// overlap: can one copy's latency-bound chain run under the other's expert streaming?).
// Three runners on backends (streams) of their own on the same device and weights: copy
// A and copy B (B rows each, caches seeded apart), and one of 2B rows. Every time is a
// host-timed step() (metadata upload, graph replay, synchronize), so the three compare
// with one another, not with the event-timed replays above. Per offset: copy B's step
// starts that many µs after copy A's, on a thread of its own; the pair's time runs from
// A's start to the later end.
nlohmann::json run_pair_probe(const model::ModelConfig& c, const model::ModelWeights& weights, int64_t p,
                              int64_t spread, int32_t B,
                              const std::vector<int32_t>& offsets_us, int warmup, int iters) {
  using Clock = std::chrono::steady_clock;
  const auto ms_between = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
  };
  // Device 0: the one GPU of --dp 1.
  auto be_a = ops::make_cuda_backend(0), be_b = ops::make_cuda_backend(0), be_d = ops::make_cuda_backend(0);
  engine::ModelRunner run_a(c, weights, *be_a, decode_runner_options(B, p, true));
  engine::ModelRunner run_b(c, weights, *be_b, decode_runner_options(B, p, true));
  engine::ModelRunner run_d(c, weights, *be_d, decode_runner_options(2 * B, p, true));
  const engine::StepMetadata meta_a = prepare_decode_step(run_a, *be_a, c, B, p, 0, spread);
  const engine::StepMetadata meta_b = prepare_decode_step(run_b, *be_b, c, B, p, 1, spread);
  const engine::StepMetadata meta_d = prepare_decode_step(run_d, *be_d, c, 2 * B, p, 0, spread);
  const auto timed = [&](engine::ModelRunner& run, const engine::StepMetadata& meta) {
    for (int i = 0; i < warmup; ++i) run.step(meta, nullptr);  // the first records the graph
    std::vector<double> ms;
    for (int i = 0; i < iters; ++i) {
      const Clock::time_point t0 = Clock::now();
      run.step(meta, nullptr);
      ms.push_back(ms_between(t0, Clock::now()));
    }
    return median(ms);
  };
  nlohmann::json out;
  out["rows_per_copy"] = B;
  out["iters"] = iters;
  out["one_copy_ms"] = timed(run_a, meta_a);
  out["copy_b_alone_ms"] = timed(run_b, meta_b);
  out["double_batch_ms"] = timed(run_d, meta_d);

  // Copy B's thread: steps when `go` reaches the iteration, `offset` µs after t0.
  std::atomic<int> go{0}, done{0};
  std::atomic<bool> stop{false};
  Clock::time_point t0, t_b;
  int offset_us = 0;
  std::string error;
  std::thread thread_b([&] {
    try {
      be_b->bind_to_current_thread();
      for (int g = 1;; ++g) {
        while (go.load() < g && !stop.load()) std::this_thread::yield();
        if (stop.load()) return;
        while (Clock::now() < t0 + std::chrono::microseconds(offset_us)) {
        }
        run_b.step(meta_b, nullptr);
        t_b = Clock::now();
        done.store(g);
      }
    } catch (const std::exception& e) {
      error = e.what();
      done.store(1 << 30);
    }
  });
  nlohmann::json pairs = nlohmann::json::array();
  try {
    int g = 0;
    for (int32_t off : offsets_us) {
      offset_us = off;
      std::vector<double> ms;
      for (int i = 0; i < warmup + iters && error.empty(); ++i) {
        t0 = Clock::now();
        go.store(++g);
        run_a.step(meta_a, nullptr);
        const Clock::time_point t_a = Clock::now();
        while (done.load() < g) std::this_thread::yield();
        if (i >= warmup) ms.push_back(ms_between(t0, std::max(t_a, t_b)));
      }
      pairs.push_back({{"offset_us", off}, {"pair_ms", median(ms)}});
    }
  } catch (...) {
    stop.store(true);
    thread_b.join();
    throw;
  }
  stop.store(true);
  thread_b.join();
  if (!error.empty()) core::fail("bench decode --pair-probe, copy B: {}", error);
  out["pairs"] = pairs;
  return out;
}

// --cta-probe: after the timed replays, more replays of the step's graph with every
// marked kernel's per-CTA stamps collected (ops/cuda/cta_probe.h; a build with
// -DDSV4_CUDA_CTA_PROBE=ON), appended to `out` as TSV rows, times in ns from the
// replay's first stamp. scripts/cta_probe_summary.py reads them.
using AfterTiming = std::function<void(engine::ModelRunner&, const engine::StepMetadata&)>;
#if DSV4_HAVE_CUDA
constexpr const char* kCtaProbeHeader = "batch\treplay\tsite\tmark\tmark_no\ttag\tcta\tsm\tns\tclock\n";
void run_cta_probe(engine::ModelRunner& runner, const engine::StepMetadata& meta, int32_t B, int replays,
                   int64_t capacity, std::FILE* out, const std::string& path) {
  ops::CtaProbe probe(capacity);
  for (int r = 0; r < replays; ++r) {
    probe.reset();
    runner.replay_graph(meta);
    ops::CtaProbe::Lost lost;
    const std::vector<ops::CtaProbeRecord> recs = probe.collect(&lost);
    if (lost.ctas > 0)
      std::fprintf(stderr, "bench decode --cta-probe: batch %d, replay %d: %lld CTAs found no room "
                   "(raise --cta-probe-records above %lld)\n", B, r, static_cast<long long>(lost.ctas),
                   static_cast<long long>(capacity));
    if (lost.marks > 0)
      std::fprintf(stderr, "bench decode --cta-probe: batch %d, replay %d: %lld marks past their CTA's %u slots\n", B,
                   r, static_cast<long long>(lost.marks), ops::kCtaProbeSlots);
    uint64_t t0 = UINT64_MAX;
    for (const auto& e : recs) t0 = std::min(t0, e.ns);
    for (const auto& e : recs)
      if (std::fprintf(out, "%d\t%d\t%s\t%s\t%d\t%llx\t%u\t%u\t%llu\t%llu\n", B, r, ops::cta_probe_site_name(e.site),
                       ops::cta_probe_mark_name(e.site, e.mark), int(e.mark), static_cast<unsigned long long>(e.tag),
                       e.cta, unsigned(e.sm),
                       static_cast<unsigned long long>(e.ns - t0), static_cast<unsigned long long>(e.clock)) < 0)
        core::fail("bench decode --cta-probe: cannot write {}", path);
    std::fprintf(stderr, "bench decode --cta-probe: batch %d, replay %d: %zu stamps\n", B, r, recs.size());
  }
  std::fflush(out);
}
#endif

// The clocks during a batch's replays as JSON ("source": "nvml"), or why there are none.
nlohmann::json clocks_json(const core::ClockSampler* sampler, const std::vector<core::ClockSample>& samples,
                           const std::string& why_none) {
  if (!sampler || !sampler->available())
    return {{"source", "unavailable"}, {"why", sampler ? sampler->why() : why_none}};
  const core::ClockSummary s = core::summarize_clock_samples(samples);
  const auto range = [](const core::ClockSummary::Range& r) {
    return nlohmann::json{{"min", r.min}, {"median", r.median}, {"max", r.max}};
  };
  nlohmann::json reasons = nlohmann::json::object();
  for (const auto& [name, share] : s.reasons) reasons[name] = share;
  return {{"source", "nvml"},          {"period_ms", sampler->period_ms()}, {"samples", s.samples},
          {"failed_reads", sampler->failed_reads()}, {"sm_mhz", range(s.sm_mhz)}, {"mem_mhz", range(s.mem_mhz)},
          {"power_w", range(s.power_w)}, {"temp_c", range(s.temp_c)},  {"event_reasons_share", reasons}};
}

// One line for the log: "SM 1755-1980 MHz (median 1980), memory 3201-3201 MHz, 512-690 W, 41-44 C;
// clock-event reasons (share of 460 samples): sw_power_cap 35%".
std::string clocks_text(const nlohmann::json& j) {
  if (j["source"] != "nvml") return "no clock readings (" + j["why"].get<std::string>() + ")";
  if (j["samples"].get<size_t>() == 0) return "no clock readings (every NVML read failed)";
  const auto& sm = j["sm_mhz"];
  std::string out = fmt::format("SM {:.0f}-{:.0f} MHz (median {:.0f}), memory {:.0f}-{:.0f} MHz, {:.0f}-{:.0f} W, "
                                "{:.0f}-{:.0f} C", sm["min"].get<double>(), sm["max"].get<double>(),
                                sm["median"].get<double>(), j["mem_mhz"]["min"].get<double>(),
                                j["mem_mhz"]["max"].get<double>(), j["power_w"]["min"].get<double>(),
                                j["power_w"]["max"].get<double>(), j["temp_c"]["min"].get<double>(),
                                j["temp_c"]["max"].get<double>());
  std::string reasons;
  for (const auto& [name, share] : j["event_reasons_share"].items())
    reasons += fmt::format("{}{} {:.0f}%", reasons.empty() ? "" : ", ", name, 100 * share.get<double>());
  return out + fmt::format("; clock-event reasons (share of {} samples): {}", j["samples"].get<size_t>(),
                           reasons.empty() ? "none" : reasons);
}

// B sequences decoding their token at decode_position(p, s, spread) on `runner`, caches random.
RankRun measure_rank(engine::ModelRunner& runner, ops::Backend& backend, const model::ModelConfig& c, int32_t B,
                     int64_t p, int64_t spread, int warmup, int replays, int eager_runs, bool graphs, int rank,
                     bool profile, const AfterTiming& after_timing, core::ClockSampler* clocks,
                     int clock_period_ms) {
  RankRun out;
  out.graphs = graphs;
  const engine::StepMetadata meta = prepare_decode_step(runner, backend, c, B, p, rank, spread);
  // The warm-up (and the graph's capture) first, so that the clocks cover the timed steps only.
  if (graphs)
    runner.time_graph_replays(meta, warmup, 0);
  else
    runner.time_eager_steps(meta, std::min(warmup, 5), 0);
  if (clocks) clocks->start(clock_period_ms);
  out.step_ms = graphs ? runner.time_graph_replays(meta, 0, replays)
                       : runner.time_eager_steps(meta, 0, std::min(replays, 50));
  if (clocks) out.clocks = clocks->stop();
  if (graphs) {
    // The same step as the serving engine runs it (ModelRunner::step_tokens: the metadata up,
    // the replay, the choices up, the backend's choose_tokens, the ids down), host wall clock:
    // what a served step costs beyond the replay, greedy and with every row sampled (the
    // common chat setting: temperature 1, top_p 0.95).
    std::vector<int32_t> ids;
    const auto served = [&](const std::vector<ops::TokenChoice>& choices, std::vector<double>& ms) {
      for (int i = 0; i < 3; ++i) runner.step_tokens(meta, choices, &ids, {});
      for (int i = 0; i < std::min(replays, 50); ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        runner.step_tokens(meta, choices, &ids, {});
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
    };
    std::vector<ops::TokenChoice> choices(meta.logit_rows.size());
    served(choices, out.served_ms);
    for (size_t r = 0; r < choices.size(); ++r) {
      choices[r].temperature = 1.0f;
      choices[r].top_p = 0.95f;
      choices[r].seed = r;
      choices[r].position = p;
    }
    served(choices, out.served_sampled_ms);
  }
  if (after_timing) after_timing(runner, meta);

  // Eager, event-timed runs: per-stage times, the median over `eager_runs` runs, and from the
  // first run the routing of every layer (the runs are the same step, so the same routing).
  // Why a median: a stage's events also time whatever delays its launches, and one run is one
  // sample (at 256 rows on an H100 a single run read the shared expert at 3.77 ms, 34f27d5,
  // where a dozen other commits' runs read 0.78-1.03; and the first run is the slowest at every
  // batch, +0.4-1.0 ms at 9e508e3, with or without lazy module loading). --profile brackets the
  // first run.
  out.touched.resize(static_cast<size_t>(c.num_hidden_layers));
  auto timer = backend.make_timer();
  const std::regex layer_prefix("^L([0-9]+)\\.");
  const int64_t k = c.num_experts_per_tok;
  std::map<std::string, std::vector<double>> stage_runs;
  std::vector<double> comm_runs;
  for (int run = 0; run < eager_runs; ++run) {
    const bool first = run == 0;
    std::map<std::string, double> stage_ms;
    double comm_ms = 0;
    if (profile && first) backend.profiler_collect(true);
    runner.step_eager_with_hook(meta, [&](const model::Stage& stage, bool after) {
      if (!after) {
        timer->start();
        return;
      }
      timer->stop();
      const double ms = timer->elapsed_ms();
      const std::string kind = std::regex_replace(stage.name, layer_prefix, "");
      stage_ms[kind] += ms;
      if (stage.kind == model::StageKind::kComm) comm_ms += ms;
      std::smatch m;
      if (first && kind == "router" && std::regex_search(stage.name, m, layer_prefix)) {
        const int64_t l = std::stoll(m[1]);
        std::vector<int32_t> ids(size_t(B * k));
        backend.download(ids.data(), runner.buffers().router_ids.rows(0, B), ids.size() * 4);
        out.touched[size_t(l)].insert(ids.begin(), ids.end());
        std::map<int32_t, int64_t> rows;  // expert -> its rows (slots) in this layer
        for (int32_t e : ids) ++rows[e];
        for (const auto& [e, n] : rows) ++out.expert_rows[n];
      }
    });
    if (profile && first) backend.profiler_collect(false);
    double total = 0;
    for (const auto& [kind, ms] : stage_ms) {
      stage_runs[kind].push_back(ms);
      total += ms;
    }
    out.eager_step_ms.push_back(total);
    comm_runs.push_back(comm_ms);
  }
  for (auto& [kind, ms] : stage_runs) out.stage_ms[kind] = median(ms);
  out.comm_ms = median(comm_runs);

  const int64_t row_bytes = ops::kv_row_bytes(c.head_dim, c.qk_rope_head_dim);
  const int64_t index_row = ops::index_row_bytes(c.index_head_dim);
  for (int32_t s = 0; s < B; ++s) {
    const int64_t ps = decode_position(p, s, spread);
    const int64_t window = std::min<int64_t>(ps + 1, c.sliding_window);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      const int64_t ratio = c.compress_ratio(l);
      int64_t keys = window;
      if (ratio == 4) {
        const int64_t n_c = (ps + 1) / 4;
        keys += std::min(c.index_topk, n_c);
        out.kv_index_bytes += uint64_t(n_c * index_row);  // the indexer scans every row
      } else if (ratio == 128) {
        keys += (ps + 1) / 128;
      }
      out.kv_attention_bytes += uint64_t(keys * row_bytes);
    }
  }
  return out;
}

}  // namespace

Command add_bench_decode(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  app.footer(
      "Decode-step benchmark: each batch size runs one decode step per sequence at position --context\n"
      "(caches filled with random valid content), replayed from its CUDA graph; reports the median step\n"
      "time over --replays replays after --warmup, tokens/s, a per-stage breakdown (event-timed eager runs:\n"
      "each stage's median over --eager-runs),\n"
      "the bytes the step must move (weights actually touched given the routing, KV read) and the ratio\n"
      "to the memory roofline (bytes / device-to-device copy bandwidth measured in the same run), and each\n"
      "stage's eager time against its own bytes' roofline, furthest first. --json adds the routing's load:\n"
      "how many (layer, expert) pairs got each number of rows (expert_rows_histogram_rank0), and\n"
      "records the build (dsv4 --version), the device and the DSV4_* switches set (dsv4 env). On a GPU each batch\n"
      "size also reports the clocks during its timed replays (NVML every --clock-period-ms, where the driver has it:\n"
      "SM and memory MHz, board power, temperature, the share of samples under each clock-event reason such as\n"
      "sw_power_cap), and the JSON keeps every replay's time in order.");
  app.add_option("--preset", o->preset, "Model preset with synthetic weights")->default_val("bench-1g");
  app.add_option("--model", o->model_dir, "Checkpoint directory instead of a preset");
  app.add_option("--random-weights", o->weight_seed, "Seed of the synthetic weights")->default_val(1);
  app.add_option("--backend", o->backend, "auto, cuda or cpu")->default_val("auto")->check(
      CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--batch", o->batches, "Comma-separated batch sizes (sequences per step)")->default_val("1,16,64,256");
  app.add_option("--context", o->context, "Position of the decoded token (context length)")->default_val(4096)
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--position-spread", o->position_spread,
                 "Sequence s decodes at position --context - (s mod N): 1 puts every row at --context (at 4096 no "
                 "compressor emits a row); 128 spreads the rows over an HCA window, so the CSA and HCA compressors "
                 "emit rows as in serving")
      ->default_val(1)->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--warmup", o->warmup, "Graph replays before timing")->default_val(20);
  app.add_option("--replays", o->replays, "Timed graph replays (median reported)")->default_val(200)->check(
      CLI::Range(1, 100000));
  app.add_option("--eager-runs", o->eager_runs,
                 "Event-timed eager steps for the per-stage breakdown (each stage's median reported; the first "
                 "also gives the routing)")
      ->default_val(5)->check(CLI::Range(1, 1000));
  app.add_option("--clock-period-ms", o->clock_period_ms,
                 "How often the GPU's clocks are read (NVML) during each batch size's replays; 0: not read. A "
                 "256-row bench-1g step is ~11 ms, so 5 gives a few samples a step; a read is one host thread's "
                 "driver call, not GPU work")
      ->default_val(5)->check(CLI::Range(0, 1000));
  app.add_option("--threads", o->threads, "CPU backend threads")->default_val(1);
  app.add_option("--dp", o->dp, "Data-parallel ranks (CUDA: one GPU each, NCCL; CPU: in-process ranks); "
                 "--batch is then per rank")->default_val(1)->check(CLI::Range(1, 64));
  app.add_option("--moe", o->moe, "With --dp > 1: allgather or alltoall (experts split over the ranks)")
      ->default_val("allgather")->check(CLI::IsMember({"allgather", "alltoall"}));
  app.add_option("--nccl-max-ctas", o->nccl_max_ctas, "Cap on NCCL's CTAs per collective (0: NCCL's default)")
      ->default_val(0)->check(CLI::Range(0, 64));
  app.add_option("--comm-timeout", o->comm_timeout_s, "Seconds a collective may wait for a peer before failing")
      ->default_val(120)->check(CLI::Range(1.0, 3600.0));
  app.add_flag("!--no-cuda-graphs", o->use_graphs, "Time eager steps instead of graph replays");
  app.add_flag("--profile", o->profile,
               "Bracket the first event-timed eager step for a profiler started with collection off "
               "(ncu --profile-from-start off ...)");
  app.add_option("--pair-probe", o->pair_probe,
                 "Experiment (CUDA, --dp 1): after each batch size B, two independent copies of the B-row step "
                 "replayed at once on one GPU, the second started each of these comma-separated µs offsets after "
                 "the first, against one step of 2B rows (host-timed steps)");
  app.add_option("--cta-probe", o->cta_probe,
                 "Diagnostic (CUDA, --dp 1, a build configured with -DDSV4_CUDA_CTA_PROBE=ON): after each batch "
                 "size's timed replays, --cta-probe-replays more with the marked kernels' per-CTA clock stamps "
                 "(entry, dependency wait, their own marks, exit), written to this TSV file; "
                 "scripts/cta_probe_summary.py summarises it");
  app.add_option("--cta-probe-replays", o->cta_probe_replays, "Replays --cta-probe records")->default_val(3)
      ->check(CLI::Range(1, 100));
  app.add_option("--cta-probe-records", o->cta_probe_records,
                 "Record slots of --cta-probe (32 bytes each on the GPU; a CTA takes 16)")
      ->default_val(int64_t(16) << 20)->check(CLI::Range(int64_t(16), int64_t(1) << 28));
  app.add_option("--json", o->json, "Write the results as JSON");
  return [o] {
    if (!o->json.empty()) expect_writable_file(o->json, "--json");  // (before the long run, not after it)
    const std::string backend_name = o->backend == "auto" ? default_backend_name() : o->backend;
    const std::vector<int32_t> batches = parse_list(o->batches, "--batch");
    const model::ModelConfig source = engine::source_config(engine::ModelSource{o->model_dir, o->preset, 0, {}});
    if (o->context >= source.max_position_embeddings)
      core::fail("--context {}: the decoded token's position must be below the model's max_position_embeddings {}",
                 o->context, source.max_position_embeddings);
    if (o->position_spread > o->context)
      core::fail("--position-spread {} exceeds --context {}: a sequence would decode at a negative position",
                 o->position_spread, o->context);
    std::vector<int32_t> pair_offsets;
    if (!o->pair_probe.empty()) {
      pair_offsets = parse_list(o->pair_probe, "--pair-probe", 0);
      if (backend_name != "cuda" || o->dp != 1 || !o->use_graphs)
        core::fail("--pair-probe needs the CUDA backend, --dp 1 and CUDA graphs (got backend {}, dp {}{})",
                   backend_name, o->dp, o->use_graphs ? "" : ", --no-cuda-graphs");
    }
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> cta_probe_file(nullptr, &std::fclose);
    if (!o->cta_probe.empty()) {
      if (backend_name != "cuda" || o->dp != 1 || !o->use_graphs)
        core::fail("--cta-probe needs the CUDA backend, --dp 1 and CUDA graphs (got backend {}, dp {}{})", backend_name,
                   o->dp, o->use_graphs ? "" : ", --no-cuda-graphs");
#if DSV4_HAVE_CUDA
      if (!ops::cta_probe_kernels_marked())
        core::fail("--cta-probe: this build's kernels carry no probe marks; configure a build with "
                   "-DDSV4_CUDA_CTA_PROBE=ON (scripts/gpu_suite.sh OUT cta-probe does)");
      cta_probe_file.reset(std::fopen(o->cta_probe.c_str(), "w"));
      if (!cta_probe_file || std::fputs(kCtaProbeHeader, cta_probe_file.get()) < 0)
        core::fail("--cta-probe: cannot write {}: {}", o->cta_probe, std::strerror(errno));
#endif
    }
    const int32_t max_batch = *std::max_element(batches.begin(), batches.end());
    engine::DpRanksOptions dro;
    dro.dp = o->dp;
    dro.moe = o->dp > 1 ? engine::parse_moe_mode(o->moe) : engine::MoeMode::kLocal;
    dro.backend = backend_name;
    dro.threads_per_rank = o->threads;
    dro.source = engine::ModelSource{o->model_dir, o->model_dir.empty() ? o->preset : "", o->weight_seed,
                                     stderr_progress("bench decode: weights", uint64_t(1) << 30)};  // (large models only)
    dro.max_rows = max_batch;
    dro.comm.timeout = std::chrono::milliseconds(int64_t(o->comm_timeout_s * 1000));
    dro.nccl_max_ctas = o->nccl_max_ctas;
    // Said where every log of an A/B shows it: which variant this run is.
    for (const auto& [name, value] : dsv4_environment())
      std::fprintf(stderr, "bench decode: %s=%s\n", name.c_str(), value.c_str());
    std::fprintf(stderr, "bench decode: loading %s on %s x %d...\n",
                 o->model_dir.empty() ? o->preset.c_str() : o->model_dir.c_str(), backend_name.c_str(), o->dp);
    engine::DpRanks dp = engine::build_dp_ranks(dro);
    const model::ModelConfig& c = dp.config;
    const int W = o->dp;
    const double copy_bw = measure_copy_bandwidth(*dp.ranks[0]->backend);
    // Rank 0's GPU clocks while its replays run (NVML, where the driver has it).
    const std::string pci_bus_id = device_pci_bus_id(*dp.ranks[0]->backend);
    std::unique_ptr<core::ClockSampler> clock_sampler;
    if (!pci_bus_id.empty() && o->clock_period_ms > 0)
      clock_sampler = std::make_unique<core::ClockSampler>(pci_bus_id);
    const std::string no_clocks_why = o->clock_period_ms == 0 ? "--clock-period-ms 0"
                                                              : "the " + backend_name + " backend has no GPU clocks";
    if (clock_sampler && !clock_sampler->available())
      std::fprintf(stderr, "bench decode: no clock readings: %s\n", clock_sampler->why().c_str());
    const nlohmann::json device = device_json(*dp.ranks[0]->backend);
    std::fprintf(stderr, "bench decode: %s\n", device_text(device).c_str());
    std::fprintf(stderr, "bench decode: copy bandwidth %.0f GB/s (read + write)\n", copy_bw / 1e9);
    const auto sizes = tensor_bytes(c);
    const int64_t p = o->context;

    // Dense weights every rank reads whole, by the stage that reads them (the routed
    // experts are counted from the routing, the embedding by rows).
    uint64_t dense = 0;
    std::map<std::string, uint64_t> dense_by_stage;
    for (const auto& [name, n] : sizes) {
      const std::string stage = model::decode_stage_of_tensor(name);
      if (stage.empty() || stage == "experts" || stage == "embed") continue;
      dense += n;
      dense_by_stage[stage] += n;
    }
    const uint64_t per_expert = sizes.at("layers.0.ffn.experts.0.w1.weight") + sizes.at("layers.0.ffn.experts.0.w1.scale") +
                                sizes.at("layers.0.ffn.experts.0.w2.weight") + sizes.at("layers.0.ffn.experts.0.w2.scale") +
                                sizes.at("layers.0.ffn.experts.0.w3.weight") + sizes.at("layers.0.ffn.experts.0.w3.scale");

    nlohmann::json results = nlohmann::json::array();
    std::printf("%-6s %10s %10s %10s %10s %8s %8s   %s\n", "batch", "step ms", "tok/s", "GB moved", "GB/s", "x roof",
                "comm %", "stage ms (eager, event-timed, rank 0)");
    for (int32_t B : batches) {
      const bool graphs = o->use_graphs && dp.ranks[0]->backend->device() == core::Device::kCuda &&
                          (dp.ranks[0]->moe == nullptr || dp.ranks[0]->moe->graph_capturable());
      const engine::RunnerOptions ro = decode_runner_options(B, p, graphs);
      // Every rank steps in its own thread (collectives pair up across them).
      std::vector<RankRun> runs(static_cast<size_t>(W));
      std::vector<std::string> errors(static_cast<size_t>(W));
      std::vector<std::thread> threads;
      for (int r = 0; r < W; ++r)
        threads.emplace_back([&, r] {
          engine::DpRank& rank = *dp.ranks[size_t(r)];
          try {
            rank.backend->bind_to_current_thread();
            engine::ModelRunner runner(c, rank.model->weights, *rank.backend, ro, rank.moe.get());
            AfterTiming after;
#if DSV4_HAVE_CUDA
            if (cta_probe_file && graphs)
              after = [&](engine::ModelRunner& run, const engine::StepMetadata& meta) {
                run_cta_probe(run, meta, B, o->cta_probe_replays, o->cta_probe_records, cta_probe_file.get(),
                              o->cta_probe);
              };
#endif
            runs[size_t(r)] =
                measure_rank(runner, *rank.backend, c, B, p, o->position_spread, o->warmup, o->replays,
                             o->eager_runs, graphs, r, o->profile, after, r == 0 ? clock_sampler.get() : nullptr,
                             o->clock_period_ms);
          } catch (const std::exception& e) {
            errors[size_t(r)] = e.what();
            for (auto& comm : dp.comms) comm->abort(fmt::format("rank {}: {}", r, e.what()));
          }
        });
      for (auto& t : threads) t.join();
      for (int r = 0; r < W; ++r)
        if (!errors[size_t(r)].empty()) core::fail("bench decode, batch {}, rank {}: {}", B, r, errors[size_t(r)]);

      // Bytes per GPU: dense weights + the local experts any rank's rows touch + own KV.
      std::vector<std::set<int32_t>> touched(static_cast<size_t>(c.num_hidden_layers));
      for (const auto& run : runs)
        for (size_t l = 0; l < touched.size(); ++l) touched[l].insert(run.touched[l].begin(), run.touched[l].end());
      uint64_t worst_total = 0, worst_experts = 0, worst_kv = 0, rank0_experts = 0;
      size_t worst_touched = 0;
      double step_ms = 0, comm_ms = 0;
      for (int r = 0; r < W; ++r) {
        int64_t eb = 0, ee = c.n_routed_experts;
        if (dp.ranks[size_t(r)]->moe) std::tie(eb, ee) = parallel::expert_range(c.n_routed_experts, W, r);
        size_t n = 0;
        for (const auto& t : touched)
          for (int32_t e : t) n += (e >= eb && e < ee) ? 1 : 0;
        const uint64_t experts = n * per_expert;
        const uint64_t kv = runs[size_t(r)].kv_index_bytes + runs[size_t(r)].kv_attention_bytes;
        if (r == 0) rank0_experts = experts;
        const uint64_t total = dense + uint64_t(B) * uint64_t(c.hidden_size) * 2 + experts + kv;
        if (total > worst_total) worst_total = total, worst_experts = experts, worst_kv = kv, worst_touched = n;
        step_ms = std::max(step_ms, median(runs[size_t(r)].step_ms));
        comm_ms = std::max(comm_ms, runs[size_t(r)].comm_ms);
      }
      double eager_ms = 0;  // the stages' medians summed (the breakdown's total)
      for (const auto& [name, t] : runs[0].stage_ms) eager_ms += t;
      // Rank 0's bytes per stage against its eager stage times: which stages are
      // furthest from their own roofline (eager times include launch gaps).
      std::map<std::string, uint64_t> stage_bytes = dense_by_stage;
      stage_bytes["experts"] += rank0_experts;
      stage_bytes["index_topk"] += runs[0].kv_index_bytes;
      stage_bytes["attn_core"] += runs[0].kv_attention_bytes;
      stage_bytes["embed"] += uint64_t(B) * uint64_t(c.hidden_size) * 2;
      nlohmann::json stage_roof_ms = nlohmann::json::object(), stage_ratio = nlohmann::json::object();
      std::vector<std::pair<double, std::string>> by_ratio;
      for (const auto& [name, bytes] : stage_bytes) {
        const auto t = runs[0].stage_ms.find(name);
        if (bytes == 0 || t == runs[0].stage_ms.end()) continue;
        const double roof = double(bytes) / copy_bw * 1e3;
        stage_roof_ms[name] = roof;
        stage_ratio[name] = t->second / roof;
        by_ratio.push_back({t->second / roof, fmt::format("{}={:.3f}/{:.3f}={:.1f}x", name, t->second, roof,
                                                          t->second / roof)});
      }
      std::sort(by_ratio.rbegin(), by_ratio.rend());
      const double comm_share = eager_ms > 0 ? runs[0].comm_ms / eager_ms : 0.0;
      const double roofline_ms = double(worst_total) / copy_bw * 1e3;
      std::string breakdown;
      for (const auto& [name, t] : runs[0].stage_ms) breakdown += fmt::format("{}={:.3f} ", name, t);
      std::printf("%-6d %10.3f %10.0f %10.3f %10.0f %8.2f %8.1f   %s\n", B, step_ms, W * B / (step_ms * 1e-3),
                  worst_total / 1e9, worst_total / (step_ms * 1e-3) / 1e9, step_ms / roofline_ms, 100 * comm_share,
                  breakdown.c_str());
      std::string furthest;
      for (const auto& [ratio, text] : by_ratio) furthest += text + " ";
      std::printf("%-6s stage ms / its roofline ms (eager, rank 0, furthest first): %s\n", "", furthest.c_str());
      const double served_ms = runs[0].served_ms.empty() ? 0.0 : median(runs[0].served_ms);
      const double served_sampled_ms = runs[0].served_sampled_ms.empty() ? 0.0 : median(runs[0].served_sampled_ms);
      if (served_ms > 0)
        std::printf("%-6s served step (metadata up, replay, tokens chosen on the device, ids down; host wall, rank 0): "
                    "greedy %.3f ms, %.3f above the replay; sampled (T 1, top_p 0.95) %.3f ms, %.3f above\n",
                    "", served_ms, served_ms - median(runs[0].step_ms), served_sampled_ms,
                    served_sampled_ms - median(runs[0].step_ms));
      const nlohmann::json clocks = clocks_json(clock_sampler.get(), runs[0].clocks, no_clocks_why);
      std::printf("%-6s clocks during the replays (rank 0): %s\n", "", clocks_text(clocks).c_str());
      std::fflush(stdout);
      nlohmann::json r;
      r["batch_per_rank"] = B;
      r["context"] = p;
      r["position_spread"] = o->position_spread;
      r["graphs"] = graphs;
      r["step_ms_median"] = step_ms;  // slowest rank's median
      r["step_ms_min"] = *std::min_element(runs[0].step_ms.begin(), runs[0].step_ms.end());
      r["step_ms_max"] = *std::max_element(runs[0].step_ms.begin(), runs[0].step_ms.end());
      r["timed_steps"] = runs[0].step_ms.size();
      r["step_ms_replays_rank0"] = runs[0].step_ms;  // in replay order (a slow stretch shows against the clocks)
      r["clocks_during_replays_rank0"] = clocks;
      r["tokens_per_s"] = W * B / (step_ms * 1e-3);
      r["bytes_per_gpu"] = {{"weights_dense", dense}, {"experts", worst_experts}, {"experts_touched", worst_touched},
                            {"kv", worst_kv}, {"total", worst_total}};
      r["roofline_ms"] = roofline_ms;
      r["ratio_to_roofline"] = step_ms / roofline_ms;
      r["achieved_gb_s"] = worst_total / (step_ms * 1e-3) / 1e9;
      r["stage_ms_eager_rank0"] = runs[0].stage_ms;
      r["stage_bytes_rank0"] = stage_bytes;
      r["stage_roofline_ms_rank0"] = stage_roof_ms;
      r["stage_ratio_to_roofline_eager_rank0"] = stage_ratio;
      r["eager_step_ms_rank0"] = eager_ms;
      r["eager_runs"] = runs[0].eager_step_ms.size();
      r["eager_step_ms_runs_rank0"] = runs[0].eager_step_ms;  // each run's own sum, in run order
      if (served_ms > 0) r["served_step_ms_rank0"] = served_ms;
      if (served_sampled_ms > 0) r["served_sampled_step_ms_rank0"] = served_sampled_ms;
      // Load balance of the routing (rank 0): an expert GEMM's row tiles follow the busiest
      // experts, not the average (each tile reads its expert's weights; at 256 rows on
      // bench-1g the second tiles hit L2, docs/BENCHMARKS.md, sixty-seventh session).
      // [[rows, (layer, expert) pairs with that many rows], ...], rows ascending.
      nlohmann::json load = nlohmann::json::array();
      for (const auto& [n, count] : runs[0].expert_rows) load.push_back({n, count});
      r["expert_rows_histogram_rank0"] = load;
      r["comm_ms_eager"] = comm_ms;
      r["comm_ms_per_layer_eager"] = comm_ms / double(c.num_hidden_layers);
      r["comm_share_eager"] = comm_share;
      if (!pair_offsets.empty()) {
        const nlohmann::json probe =
            run_pair_probe(c, dp.ranks[0]->model->weights, p, o->position_spread, B, pair_offsets,
                           std::min(o->warmup, 10), o->replays);
        std::string pairs;
        for (const auto& e : probe["pairs"])
          pairs += fmt::format(" {} µs: {:.3f}", e["offset_us"].get<int>(), e["pair_ms"].get<double>());
        std::printf("%-6s pair probe (host-timed): one copy of %d rows %.3f ms (the other copy alone %.3f), one step of "
                    "%d rows %.3f ms; both copies at once, the second started after%s ms\n",
                    "", B, probe["one_copy_ms"].get<double>(), probe["copy_b_alone_ms"].get<double>(), 2 * B,
                    probe["double_batch_ms"].get<double>(), pairs.c_str());
        std::fflush(stdout);
        r["pair_probe"] = probe;
      }
      results.push_back(r);
    }
    if (!o->json.empty()) {
      nlohmann::json out;
      out["preset"] = o->model_dir.empty() ? o->preset : o->model_dir;
      out["backend"] = backend_name;
      out["dp"] = W;
      out["moe"] = W > 1 ? o->moe : "local";
      out["nccl_max_ctas"] = o->nccl_max_ctas;
      out["device"] = device;
      out["build"] = build_json();
      out["threads_per_rank"] = o->threads;  // (the CPU backend's)
      out["copy_bandwidth_gb_s"] = copy_bw / 1e9;
      out["environment"] = environment_json();  // the switches in effect (tools/env_switches.h)
      out["results"] = results;
      write_json_file(out, o->json, "--json");
    }
    return 0;
  };
}

}  // namespace dsv4::tools
