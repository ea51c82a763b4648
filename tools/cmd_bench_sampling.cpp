// dsv4 bench sampling: what choosing a step's tokens costs, beside the step itself. Before
// the seventy-second session the engine brought every logits row to the host (rows x
// vocabulary x 4 bytes: 132 MB a step at 256 rows of a 129,280-token vocabulary) and took the
// argmax or sampled there, one row after another; in the seventy-second, greedy rows took the
// backend's argmax_rows and sampled rows were copied and sampled on a host pool; now every
// row's token is chosen on the backend (Backend::choose_tokens). This times each way on the
// backend's logits, and fails where the backend's tokens differ from the host reference's.
#include <algorithm>
#include <chrono>
#include <memory>
#include <cmath>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/random.h"
#include "core/thread_pool.h"
#include "engine/sampler.h"
#include "ops/cpu/primitives.h"
#include "tools/commands.h"

namespace dsv4::tools {

namespace {

struct SamplingOptions {
  std::string backend = "auto";
  std::string rows = "1,16,64,256";
  int64_t vocab = 129280;
  int replays = 10, threads = 1;
  double logit_std = 3.0;
  uint64_t seed = 1;
  std::string json;
};

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// The median of `replays` host wall times of fn() (ms), after one untimed call (first touches
// of buffers, pool threads waking).
template <typename F>
double median_ms(int replays, F&& fn) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < replays; ++i) {
    const auto start = Clock::now();
    fn();
    t.push_back(ms_since(start));
  }
  return median(t);
}

struct SamplerCase {
  const char* name;
  engine::SamplingParams params;
};

}  // namespace

Command add_bench_sampling(CLI::App& app) {
  auto o = std::make_shared<SamplingOptions>();
  app.footer(
      "For each --rows R: R random logits rows (normal, --logit-std) on the backend, then the host wall time\n"
      "(median of --replays) of:\n"
      "  all rows to host   copying every row to the host (what the engine did for every step before)\n"
      "  to host buffer     the same into Backend::host_buffer (page-locked on CUDA: where the engine copies\n"
      "                     the rows a request asks to return)\n"
      "  host argmax        the greedy token of each row on the host, one row after another (the same)\n"
      "  backend argmax     argmax_rows on the backend and the R ids to the host (the seventy-second session's\n"
      "                     greedy rows; choose_tokens' greedy rows take the same scan)\n"
      "and, per sampler (temperature 1 over the whole vocabulary; top_k 50; top_p 0.9 at temperature 0.7;\n"
      "top_p 0.95 at temperature 1; top_k 40 with top_p 0.9; min_p 0.05 at temperature 1), the time to\n"
      "sample the R rows on the host one after another and on a pool of min(16, cores) threads (as the\n"
      "engine did in the seventy-second session), and on the backend: choose_tokens with the choices\n"
      "uploaded and the ids downloaded (as the engine does now). The backend's tokens must equal the\n"
      "host's, bit for bit. Last, \"logprobs top 5\": each row's log-probability record with the 5 most\n"
      "likely tokens (ops/token_choice.h) on the host, one thread and the pool, and on the backend\n"
      "(choose_tokens, then token_logprobs, ids and records down: what the engine runs for requests that\n"
      "ask for logprobs); the records must be equal.");
  app.add_option("--backend", o->backend, "cuda, cpu or auto")->default_val("auto");
  app.add_option("--rows", o->rows, "Comma-separated logits rows a step")->default_val(o->rows);
  app.add_option("--vocab", o->vocab, "Columns a row (the vocabulary)")->default_val(o->vocab)->check(CLI::Range(1, 1 << 24));
  app.add_option("--replays", o->replays, "Timed repetitions (median)")->default_val(10)->check(CLI::Range(1, 1000));
  app.add_option("--logit-std", o->logit_std, "Standard deviation of the random logits")->default_val(3.0);
  app.add_option("--threads", o->threads, "CPU backend threads")->default_val(1)->check(CLI::Range(1, 1024));
  app.add_option("--seed", o->seed, "Seed of the random logits")->default_val(1);
  app.add_option("--json", o->json, "Write the results as JSON");
  return [o]() -> int {
    if (!o->json.empty()) expect_writable_file(o->json, "--json");
    const std::vector<int32_t> rows_list = parse_list(o->rows, "--rows");
    auto backend = make_backend(o->backend == "auto" ? default_backend_name() : o->backend, o->threads);
    ops::Backend& be = *backend;
    const int64_t V = o->vocab;
    const int pool_threads = int(std::clamp(std::thread::hardware_concurrency(), 1u, 16u));
    core::ThreadPool pool(pool_threads);
    engine::SamplingParams whole, top_k, top_p, chat, both, min_p;
    whole.temperature = 1.0f;
    top_k.temperature = 1.0f;
    top_k.top_k = 50;
    top_p.temperature = 0.7f;
    top_p.top_p = 0.9f;
    chat.temperature = 1.0f;
    chat.top_p = 0.95f;
    both.temperature = 0.8f;
    both.top_k = 40;
    both.top_p = 0.9f;
    min_p.temperature = 1.0f;
    min_p.min_p = 0.05f;
    const SamplerCase cases[] = {{"temperature 1", whole}, {"top_k 50", top_k},     {"top_p 0.9", top_p},
                                 {"top_p 0.95 T 1", chat}, {"k 40 p 0.9", both}, {"min_p 0.05 T 1", min_p}};
    const nlohmann::json device = device_json(be);
    std::printf("bench sampling: %s; vocabulary %lld, logits N(0, %.1f); host pool %d threads; median of %d\n",
                device_text(device).c_str(), static_cast<long long>(V), o->logit_std, pool_threads, o->replays);
    std::printf("%5s %16s %16s %12s %15s | %-14s %12s %12s %12s\n", "rows", "all rows to host", "to host buffer",
                "host argmax", "backend argmax", "sampler", "one thread", "pool", "backend");
    nlohmann::json results = nlohmann::json::array();
    for (int32_t R : rows_list) {
      std::vector<float> host(size_t(R) * size_t(V));
      for (size_t i = 0; i < host.size(); ++i) {  // normal by Box-Muller (never exactly zero)
        const double u1 = (double(core::random_bits(o->seed, 0x10617, 2 * i) >> 11) + 0.5) / 9007199254740992.0;
        const double u2 = double(core::random_uniform(o->seed, 0x10617, 2 * i + 1));
        host[i] = float(o->logit_std * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
      }
      core::Tensor logits = be.empty(core::DType::kF32, {R, V});
      core::Tensor ids = be.empty(core::DType::kI32, {R});
      core::Tensor choices = be.empty(core::DType::kI32, {R, ops::kTokenChoiceWords});
      be.upload(logits, host.data(), host.size() * sizeof(float));
      std::vector<float> copy(host.size());
      std::vector<int32_t> got(static_cast<size_t>(R)), want(static_cast<size_t>(R));
      be.synchronize();
      const double to_host = median_ms(o->replays, [&] {
        be.download(copy.data(), logits, copy.size() * sizeof(float));
        be.synchronize();
      });
      const std::shared_ptr<void> locked = be.host_buffer(copy.size() * sizeof(float));
      const double to_locked = median_ms(o->replays, [&] {
        be.download(locked.get(), logits, copy.size() * sizeof(float));
        be.synchronize();
      });
      const double host_argmax = median_ms(o->replays, [&] {
        for (int32_t r = 0; r < R; ++r) want[size_t(r)] = engine::argmax_lowest(copy.data() + size_t(r) * size_t(V), V);
      });
      const double backend_argmax = median_ms(o->replays, [&] {
        be.argmax_rows(logits, ids);
        be.download(got.data(), ids, size_t(R) * 4);
        be.synchronize();
      });
      if (got != want) core::fail("bench sampling: the backend's argmax_rows differs from the host's at {} rows", R);
      nlohmann::json entry = {{"rows", R},
                              {"all_rows_to_host_ms", to_host},
                              {"all_rows_to_host_buffer_ms", to_locked},
                              {"host_argmax_ms", host_argmax},
                              {"backend_argmax_ms", backend_argmax}};
      bool first = true;
      for (const SamplerCase& c : cases) {
        std::vector<int32_t> one(static_cast<size_t>(R)), many(static_cast<size_t>(R));
        const auto sample = [&](int64_t r, std::vector<int32_t>& out) {
          out[size_t(r)] = engine::sample_token(copy.data() + size_t(r) * size_t(V), V, c.params, r);
        };
        const double serial = median_ms(o->replays, [&] {
          for (int32_t r = 0; r < R; ++r) sample(r, one);
        });
        const double parallel = median_ms(o->replays, [&] {
          pool.parallel_for(R, [&](int64_t b, int64_t e) {
            for (int64_t r = b; r < e; ++r) sample(r, many);
          });
        });
        if (one != many) core::fail("bench sampling: {} drew other tokens on the pool", c.name);
        std::vector<ops::TokenChoice> row_choices;
        for (int32_t r = 0; r < R; ++r) row_choices.push_back(engine::token_choice(c.params, r));
        std::vector<int32_t> chosen(static_cast<size_t>(R));
        const double on_backend = median_ms(o->replays, [&] {
          be.upload(choices, row_choices.data(), row_choices.size() * sizeof(ops::TokenChoice));
          be.choose_tokens(logits, choices, ids);
          be.download(chosen.data(), ids, size_t(R) * 4);
          be.synchronize();
        });
        for (int32_t r = 0; r < R; ++r)
          if (chosen[size_t(r)] != one[size_t(r)])
            core::fail("bench sampling: {}: the backend chose token {} in row {}, the host reference {}", c.name,
                       chosen[size_t(r)], r, one[size_t(r)]);
        if (first)
          std::printf("%5d %13.3f ms %13.3f ms %9.3f ms %12.3f ms | %-14s %9.3f ms %9.3f ms %9.3f ms\n", R, to_host,
                      to_locked, host_argmax, backend_argmax, c.name, serial, parallel, on_backend);
        else
          std::printf("%5s %16s %16s %12s %15s | %-14s %9.3f ms %9.3f ms %9.3f ms\n", "", "", "", "", "", c.name,
                      serial, parallel, on_backend);
        first = false;
        entry["samplers"].push_back(
            {{"sampler", c.name}, {"one_thread_ms", serial}, {"pool_ms", parallel}, {"backend_ms", on_backend}});
      }
      // Log-probabilities with the 5 most likely tokens' (greedy rows): each row's record on the
      // host (the reference) and on the backend with the ids and records down (as the engine
      // takes them for requests that ask); the records must be equal.
      std::vector<ops::TokenLogprobRecord> want_records(static_cast<size_t>(R)), got_records(static_cast<size_t>(R));
      const auto score = [&](int64_t r) {
        want_records[size_t(r)] =
            ops::ref::token_logprob_record(copy.data() + size_t(r) * size_t(V), V, want[size_t(r)], 5);
      };
      const double logprobs_serial = median_ms(o->replays, [&] {
        for (int32_t r = 0; r < R; ++r) score(r);
      });
      const double logprobs_pool = median_ms(o->replays, [&] {
        pool.parallel_for(R, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) score(r);
        });
      });
      ops::TokenChoice scored;
      scored.logprobs = 5;
      const std::vector<ops::TokenChoice> scored_choices(static_cast<size_t>(R), scored);
      core::Tensor records = be.empty(core::DType::kI32, {R, ops::kTokenLogprobWords});
      const double logprobs_backend = median_ms(o->replays, [&] {
        be.upload(choices, scored_choices.data(), scored_choices.size() * sizeof(ops::TokenChoice));
        be.choose_tokens(logits, choices, ids);
        be.token_logprobs(logits, choices, ids, records);
        be.download(got.data(), ids, size_t(R) * 4);
        be.download(got_records.data(), records, got_records.size() * sizeof(ops::TokenLogprobRecord));
        be.synchronize();
      });
      for (int32_t r = 0; r < R; ++r) {
        const ops::TokenLogprobRecord &g = got_records[size_t(r)], &w = want_records[size_t(r)];
        bool same = g.max_logit == w.max_logit && g.z1 == w.z1 && g.token == w.token &&
                    g.token_logit == w.token_logit && g.count == w.count;
        for (int32_t j = 0; same && j < w.count; ++j) same = g.ids[j] == w.ids[j] && g.logits[j] == w.logits[j];
        if (!same)
          core::fail("bench sampling: the backend's log-probability record of row {} differs from the host's (Z1 {} "
                     "against {}, max {} against {})",
                     r, g.z1, w.z1, g.max_logit, w.max_logit);
      }
      std::printf("%5s %16s %16s %12s %15s | %-14s %9.3f ms %9.3f ms %9.3f ms\n", "", "", "", "", "",
                  "logprobs top 5", logprobs_serial, logprobs_pool, logprobs_backend);
      entry["logprobs_top5"] = {
          {"one_thread_ms", logprobs_serial}, {"pool_ms", logprobs_pool}, {"backend_ms", logprobs_backend}};
      std::fflush(stdout);
      results.push_back(entry);
    }
    if (!o->json.empty()) {
      nlohmann::json out;
      out["backend"] = be.device() == core::Device::kCuda ? "cuda" : "cpu";
      out["vocab"] = V;
      out["logit_std"] = o->logit_std;
      out["replays"] = o->replays;
      out["pool_threads"] = pool_threads;
      out["device"] = device;
      out["build"] = build_json();
      out["environment"] = environment_json();
      out["results"] = results;
      write_json_file(out, o->json, "--json");
    }
    return 0;
  };
}

}  // namespace dsv4::tools
