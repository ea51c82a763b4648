// dsv4 bench: benchmarks. `bench serve` is a load generator for a running
// OpenAI-compatible server, reporting what vLLM's benchmark_serving reports
// (TTFT, TPOT, ITL, end-to-end latency; request and token throughput).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <mutex>
#include <random>
#include <thread>

#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tools/commands.h"

namespace dsv4::tools {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Endpoint {
  std::string host;
  int port = 8000;
  std::string prefix;  // path before /v1, from --base-url
};

Endpoint parse_base_url(const std::string& url) {
  const std::string scheme = "http://";
  if (url.rfind(scheme, 0) != 0)
    core::fail("--base-url {}: expected http://HOST[:PORT][/PREFIX] (https is not supported)", url);
  std::string rest = url.substr(scheme.size());
  Endpoint e;
  const size_t slash = rest.find('/');
  if (slash != std::string::npos) {
    e.prefix = rest.substr(slash);
    while (!e.prefix.empty() && e.prefix.back() == '/') e.prefix.pop_back();
    rest = rest.substr(0, slash);
  }
  auto port = [&](const std::string& text) {
    try {
      size_t used = 0;
      const int p = std::stoi(text, &used);
      if (used == text.size() && p > 0 && p < 65536) return p;
    } catch (...) {
    }
    core::fail("--base-url {}: bad port \"{}\"", url, text);
  };
  e.port = 80;
  if (!rest.empty() && rest.front() == '[') {  // [IPv6]:port
    const size_t close = rest.find(']');
    if (close == std::string::npos) core::fail("--base-url {}: unclosed [", url);
    const std::string after = rest.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') core::fail("--base-url {}: expected :PORT after ]", url);
      e.port = port(after.substr(1));
    }
    rest = rest.substr(1, close - 1);
  } else if (const size_t colon = rest.rfind(':'); colon != std::string::npos) {
    e.port = port(rest.substr(colon + 1));
    rest = rest.substr(0, colon);
  }
  if (rest.empty()) core::fail("--base-url {}: no host", url);
  e.host = rest;
  return e;
}

struct RequestResult {
  bool ok = false;
  std::string error;
  double ttft = 0, latency = 0;  // seconds
  std::vector<double> itl;       // seconds between token-carrying chunks
  int64_t prompt_tokens = 0, output_tokens = 0;
};

// Server-sent events of one response: timestamps the chunks that carry tokens.
class SseReader {
 public:
  SseReader(RequestResult& r, Clock::time_point start) : r_(r), start_(start) {}
  void feed(const char* data, size_t len) {
    buffer_.append(data, len);
    size_t pos;
    while ((pos = buffer_.find('\n')) != std::string::npos) {
      std::string line = buffer_.substr(0, pos);
      buffer_.erase(0, pos + 1);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.rfind("data:", 0) == 0) event(line.substr(line.size() > 5 && line[5] == ' ' ? 6 : 5));
    }
  }
  bool done() const { return done_; }
  int64_t chunk_tokens() const { return chunk_tokens_; }

 private:
  void event(const std::string& payload) {
    if (payload == "[DONE]") {
      done_ = true;
      return;
    }
    json j = json::parse(payload, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      r_.error = "unparsable event: " + payload.substr(0, 200);
      return;
    }
    if (j.contains("error")) {
      r_.error = j["error"].value("message", j["error"].dump());
      return;
    }
    if (j.contains("usage") && j["usage"].is_object()) {
      r_.prompt_tokens = j["usage"].value("prompt_tokens", int64_t(0));
      r_.output_tokens = j["usage"].value("completion_tokens", int64_t(0));
    }
    if (!j.contains("choices") || !j["choices"].is_array() || j["choices"].empty()) return;
    const json& c = j["choices"][0];
    int64_t tokens = 0;
    if (c.contains("token_ids") && c["token_ids"].is_array()) {
      tokens = int64_t(c["token_ids"].size());
    } else {
      const json* text = c.contains("text") ? &c["text"] : nullptr;
      if (c.contains("delta") && c["delta"].contains("content")) text = &c["delta"]["content"];
      tokens = text && text->is_string() && !text->get<std::string>().empty() ? 1 : 0;
    }
    if (tokens == 0) return;
    const auto now = Clock::now();
    if (chunk_tokens_ == 0)
      r_.ttft = std::chrono::duration<double>(now - start_).count();
    else
      r_.itl.push_back(std::chrono::duration<double>(now - last_).count());
    last_ = now;
    chunk_tokens_ += tokens;
  }

  RequestResult& r_;
  Clock::time_point start_, last_;
  std::string buffer_;
  bool done_ = false;
  int64_t chunk_tokens_ = 0;
};

struct Stats {
  double mean = 0, std = 0, median = 0, p90 = 0, p99 = 0;
};

// numpy.percentile's default (linear interpolation).
double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double pos = p / 100.0 * double(v.size() - 1);
  const size_t lo = size_t(std::floor(pos)), hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - double(lo));
}

Stats stats_ms(const std::vector<double>& seconds) {
  Stats s;
  if (seconds.empty()) return s;
  std::vector<double> ms(seconds.size());
  for (size_t i = 0; i < ms.size(); ++i) ms[i] = seconds[i] * 1000.0;
  double sum = 0;
  for (double x : ms) sum += x;
  s.mean = sum / double(ms.size());
  double var = 0;
  for (double x : ms) var += (x - s.mean) * (x - s.mean);
  s.std = std::sqrt(var / double(ms.size()));
  s.median = percentile(ms, 50);
  s.p90 = percentile(ms, 90);
  s.p99 = percentile(ms, 99);
  return s;
}

}  // namespace

Command add_bench_serve(CLI::App& app) {
  struct Options {
    std::string host = "127.0.0.1", base_url, model, endpoint = "completions", json_path, request_rate = "inf";
    int port = 8000;
    int num_prompts = 100, input_len = 32, output_len = 64, concurrency = 0;
    uint64_t seed = 0;
    double timeout = 600, temperature = 0, top_p = 1;
    int top_k = 0, logprobs = -1;
  };
  auto o = std::make_shared<Options>();
  app.footer(
      "Load-test a running OpenAI-compatible server (dsv4 serve, vLLM, ...) the way vLLM's benchmark_serving\n"
      "does: random prompts of --input-len tokens, --output-len tokens each (ignore_eos), streamed; reports\n"
      "TTFT, TPOT (per request: (latency - TTFT) / (output tokens - 1)), ITL (every gap between token chunks),\n"
      "end-to-end latency (mean, std, median, P90, P99) and request/token throughput. The same --seed gives\n"
      "the same prompts and arrival times.");
  app.add_option("--host", o->host, "Server host")->default_val("127.0.0.1");
  app.add_option("--port", o->port, "Server port")->default_val(8000)->check(CLI::Range(1, 65535));
  app.add_option("--base-url", o->base_url, "http://HOST:PORT[/PREFIX], instead of --host/--port");
  app.add_option("--model", o->model, "Model name to send (default: the first one /v1/models lists)");
  app.add_option("--endpoint", o->endpoint,
                 "completions: prompts as random token ids (exact input length); chat: /v1/chat/completions with "
                 "random words (about one token each; lengths from usage)")
      ->default_val("completions")
      ->check(CLI::IsMember({"completions", "chat"}));
  app.add_option("--num-prompts", o->num_prompts, "Requests to send")->default_val(100)->check(CLI::Range(1, 1 << 20));
  app.add_option("--input-len", o->input_len, "Prompt tokens per request")->default_val(32)->check(CLI::Range(1, 1 << 22));
  app.add_option("--output-len", o->output_len, "Generated tokens per request (max_tokens with ignore_eos)")
      ->default_val(64)
      ->check(CLI::Range(1, 1 << 22));
  app.add_option("--concurrency", o->concurrency,
                 "Most requests in flight at once (0: no limit beyond 1024 client threads)")
      ->default_val(0)
      ->check(CLI::Range(0, 1 << 16));
  app.add_option("--request-rate", o->request_rate,
                 "Requests per second, Poisson arrivals; inf sends them all at once")
      ->default_val("inf");
  app.add_option("--seed", o->seed, "Seed of the prompts and arrival times (and of each request's sampling)")
      ->default_val(0);
  app.add_option("--temperature", o->temperature, "Sampling temperature sent (0: greedy, as vLLM's benchmark)")
      ->default_val(0.0)
      ->check(CLI::Range(0.0, 2.0));
  app.add_option("--top-p", o->top_p, "top_p sent with --temperature > 0, in (0, 1]")
      ->default_val(1.0)
      ->check(CLI::Range(1e-6, 1.0));
  app.add_option("--top-k", o->top_k, "top_k sent with --temperature > 0 (0: none)")->default_val(0)->check(CLI::Range(0, 1 << 20));
  app.add_option("--logprobs", o->logprobs,
                 "Ask for each token's log-probability and the N most likely tokens' (completions: \"logprobs\": N; "
                 "chat: \"logprobs\": true, \"top_logprobs\": N); -1: none")
      ->default_val(-1)
      ->check(CLI::Range(-1, 20));
  app.add_option("--json", o->json_path, "Also write the results as JSON to this file");
  app.add_option("--timeout", o->timeout, "Seconds a request may take")->default_val(600)->check(CLI::Range(1.0, 86400.0));

  return [o] {
    if (!o->json_path.empty()) expect_writable_file(o->json_path, "--json");
    Endpoint ep = o->base_url.empty() ? Endpoint{o->host, o->port, ""} : parse_base_url(o->base_url);
    const std::string url = fmt::format("http://{}:{}{}", ep.host, ep.port, ep.prefix);
    double rate = std::numeric_limits<double>::infinity();
    if (o->request_rate != "inf") {
      try {
        rate = std::stod(o->request_rate);
      } catch (...) {
        rate = -1;
      }
      if (!(rate > 0)) core::fail("--request-rate must be a positive number or inf, got \"{}\"", o->request_rate);
    }

    std::string model = o->model;
    {
      httplib::Client cli(ep.host, ep.port);
      cli.set_connection_timeout(10);
      cli.set_read_timeout(30);
      auto res = cli.Get(ep.prefix + "/v1/models");
      if (!res) core::fail("cannot reach {}/v1/models: {}", url, httplib::to_string(res.error()));
      if (res->status != 200) core::fail("{}/v1/models answered HTTP {}: {}", url, res->status, res->body);
      if (model.empty()) {
        json j = json::parse(res->body, nullptr, false);
        if (j.is_discarded() || !j.contains("data") || !j["data"].is_array() || j["data"].empty() ||
            !j["data"][0].contains("id"))
          core::fail("{}/v1/models lists no model; pass --model", url);
        model = j["data"][0]["id"].get<std::string>();
      }
    }

    // Prompts and arrival times, all from the seed.
    std::mt19937_64 rng(o->seed);
    // Ordinary BPE tokens of the DeepSeek vocabulary (no control tokens).
    std::uniform_int_distribution<int32_t> token(1000, 99999);
    static const char* kWords[] = {"the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with",
                                   "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which",
                                   "but", "have", "an", "had", "they", "you", "were", "their", "one", "all", "we",
                                   "can", "her", "has", "there", "been", "if", "more", "when", "will", "would",
                                   "who", "so", "no", "time", "people"};
    std::uniform_int_distribution<size_t> word(0, std::size(kWords) - 1);
    std::vector<std::string> bodies(size_t(o->num_prompts));
    for (auto& body : bodies) {
      json j;
      j["model"] = model;
      if (o->endpoint == "completions") {
        std::vector<int32_t> ids(size_t(o->input_len));
        for (auto& t : ids) t = token(rng);
        j["prompt"] = ids;
        j["max_tokens"] = o->output_len;
      } else {
        std::string text;
        for (int i = 0; i < o->input_len; ++i) text += (i ? " " : "") + std::string(kWords[word(rng)]);
        j["messages"] = json::array({{{"role", "user"}, {"content", text}}});
        j["max_completion_tokens"] = o->output_len;
      }
      j["temperature"] = o->temperature;
      if (o->temperature > 0) {
        if (o->top_p < 1) j["top_p"] = o->top_p;
        if (o->top_k > 0) j["top_k"] = o->top_k;
        j["seed"] = o->seed * 1000003 + uint64_t(&body - bodies.data());  // each request its own draws
      }
      if (o->logprobs >= 0 && o->endpoint == "completions") j["logprobs"] = o->logprobs;
      if (o->logprobs >= 0 && o->endpoint == "chat") {
        j["logprobs"] = true;
        j["top_logprobs"] = o->logprobs;
      }
      j["ignore_eos"] = true;
      j["stream"] = true;
      j["stream_options"] = {{"include_usage", true}};
      j["return_token_ids"] = true;
      body = j.dump();
    }
    std::vector<double> arrival(size_t(o->num_prompts), 0.0);
    if (std::isfinite(rate)) {
      std::mt19937_64 arrivals(o->seed + 1);
      std::exponential_distribution<double> gap(rate);
      double t = 0;
      for (auto& a : arrival) a = (t += gap(arrivals));
      const double first = arrival.front();
      for (auto& a : arrival) a -= first;
    }

    const std::string path = ep.prefix + (o->endpoint == "completions" ? "/v1/completions" : "/v1/chat/completions");
    std::fprintf(stderr,
                 "dsv4 bench serve: %d requests to %s%s (model \"%s\"), input %d, output %d tokens, rate %s, "
                 "concurrency %s\n",
                 o->num_prompts, url.c_str(), path.substr(ep.prefix.size()).c_str(), model.c_str(), o->input_len,
                 o->output_len, o->request_rate.c_str(),
                 o->concurrency ? std::to_string(o->concurrency).c_str() : "unlimited");

    std::vector<RequestResult> results(size_t(o->num_prompts));
    std::atomic<int> next{0};
    const auto bench_start = Clock::now();
    std::atomic<int64_t> last_end_ns{0};
    const int workers = std::min(o->num_prompts, o->concurrency > 0 ? o->concurrency : 1024);
    std::vector<std::thread> threads;
    for (int w = 0; w < workers; ++w)
      threads.emplace_back([&] {
        httplib::Client cli(ep.host, ep.port);
        cli.set_connection_timeout(30);
        cli.set_read_timeout(time_t(o->timeout));
        cli.set_write_timeout(30);
        cli.set_keep_alive(true);
        for (int i; (i = next++) < o->num_prompts;) {
          std::this_thread::sleep_until(bench_start +
                                        std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(arrival[size_t(i)])));
          RequestResult& r = results[size_t(i)];
          const auto start = Clock::now();
          SseReader reader(r, start);
          std::string raw;
          httplib::Request req;
          req.method = "POST";
          req.path = path;
          req.headers = {{"Content-Type", "application/json"}, {"Accept", "text/event-stream"}};
          req.body = bodies[size_t(i)];
          req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
            if (raw.size() < 4096) raw.append(data, std::min<size_t>(len, 4096));
            reader.feed(data, len);
            return true;
          };
          auto res = cli.send(req);
          const auto end = Clock::now();
          r.latency = std::chrono::duration<double>(end - start).count();
          int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(end - bench_start).count();
          for (int64_t prev = last_end_ns.load(); ns > prev && !last_end_ns.compare_exchange_weak(prev, ns);) {
          }
          if (!res) {
            r.error = "HTTP client error: " + httplib::to_string(res.error());
          } else if (res->status != 200) {
            r.error = fmt::format("HTTP {}: {}", res->status, raw.substr(0, 300));
          } else if (r.error.empty() && !reader.done()) {
            r.error = "the stream ended without [DONE]";
          } else if (r.error.empty() && reader.chunk_tokens() == 0) {
            r.error = "no tokens received";
          }
          if (r.error.empty()) {
            r.ok = true;
            if (r.output_tokens == 0) r.output_tokens = reader.chunk_tokens();
            if (r.prompt_tokens == 0) r.prompt_tokens = o->input_len;
          }
        }
      });
    for (auto& t : threads) t.join();
    const double duration = double(last_end_ns.load()) / 1e9;

    int completed = 0, failed = 0;
    int64_t total_in = 0, total_out = 0;
    std::vector<double> ttfts, tpots, itls, e2els;
    json input_lens = json::array(), output_lens = json::array(), ttft_list = json::array(), itl_list = json::array(),
         errors = json::array();
    for (const RequestResult& r : results) {
      errors.push_back(r.error);
      input_lens.push_back(r.prompt_tokens);
      output_lens.push_back(r.ok ? r.output_tokens : 0);
      ttft_list.push_back(r.ttft);
      itl_list.push_back(r.itl);
      if (!r.ok) {
        ++failed;
        continue;
      }
      ++completed;
      total_in += r.prompt_tokens;
      total_out += r.output_tokens;
      ttfts.push_back(r.ttft);
      e2els.push_back(r.latency);
      if (r.output_tokens > 1) tpots.push_back((r.latency - r.ttft) / double(r.output_tokens - 1));
      itls.insert(itls.end(), r.itl.begin(), r.itl.end());
    }
    int shown = 0;
    for (const RequestResult& r : results)
      if (!r.ok && shown++ < 5) std::fprintf(stderr, "dsv4 bench serve: request failed: %s\n", r.error.c_str());

    const Stats ttft = stats_ms(ttfts), tpot = stats_ms(tpots), itl = stats_ms(itls), e2el = stats_ms(e2els);
    const double safe = duration > 0 ? duration : 1e-9;
    auto line = [](const std::string& name, const std::string& value) {
      std::printf("%s\n", fmt::format("{:<40} {:<10}", name, value).c_str());
    };
    auto num = [](double v) { return fmt::format("{:.2f}", v); };
    std::printf("============ Serving Benchmark Result ============\n");
    line("Successful requests:", std::to_string(completed));
    line("Failed requests:", std::to_string(failed));
    if (o->concurrency > 0) line("Maximum request concurrency:", std::to_string(o->concurrency));
    line("Request rate configured (RPS):", std::isfinite(rate) ? num(rate) : "inf");
    line("Benchmark duration (s):", num(duration));
    line("Total input tokens:", std::to_string(total_in));
    line("Total generated tokens:", std::to_string(total_out));
    line("Request throughput (req/s):", num(completed / safe));
    line("Output token throughput (tok/s):", num(double(total_out) / safe));
    line("Total Token throughput (tok/s):", num(double(total_in + total_out) / safe));
    auto section = [&](const char* title, const char* abbrev, const Stats& s) {
      std::printf("%s\n", fmt::format("{:-^50}", title).c_str());
      line(fmt::format("Mean {} (ms):", abbrev), num(s.mean));
      line(fmt::format("Std {} (ms):", abbrev), num(s.std));
      line(fmt::format("Median {} (ms):", abbrev), num(s.median));
      line(fmt::format("P90 {} (ms):", abbrev), num(s.p90));
      line(fmt::format("P99 {} (ms):", abbrev), num(s.p99));
    };
    section("Time to First Token", "TTFT", ttft);
    section("Time per Output Token (excl. 1st token)", "TPOT", tpot);
    section("Inter-token Latency", "ITL", itl);
    section("End-to-end Latency", "E2EL", e2el);
    std::printf("==================================================\n");
    std::fflush(stdout);

    if (!o->json_path.empty()) {
      json j;
      j["backend"] = "openai";
      j["base_url"] = url;
      j["endpoint"] = path;
      j["model_id"] = model;
      j["num_prompts"] = o->num_prompts;
      j["input_len"] = o->input_len;
      j["output_len"] = o->output_len;
      j["seed"] = o->seed;
      j["temperature"] = o->temperature;
      j["top_p"] = o->top_p;
      j["top_k"] = o->top_k;
      j["logprobs"] = o->logprobs;
      j["request_rate"] = std::isfinite(rate) ? json(rate) : json("inf");
      j["max_concurrency"] = o->concurrency > 0 ? json(o->concurrency) : json(nullptr);
      j["duration"] = duration;
      j["completed"] = completed;
      j["failed"] = failed;
      j["total_input_tokens"] = total_in;
      j["total_output_tokens"] = total_out;
      j["request_throughput"] = completed / safe;
      j["output_throughput"] = double(total_out) / safe;
      j["total_token_throughput"] = double(total_in + total_out) / safe;
      auto put = [&](const char* key, const Stats& s) {
        j[fmt::format("mean_{}_ms", key)] = s.mean;
        j[fmt::format("std_{}_ms", key)] = s.std;
        j[fmt::format("median_{}_ms", key)] = s.median;
        j[fmt::format("p90_{}_ms", key)] = s.p90;
        j[fmt::format("p99_{}_ms", key)] = s.p99;
      };
      put("ttft", ttft);
      put("tpot", tpot);
      put("itl", itl);
      put("e2el", e2el);
      j["input_lens"] = input_lens;
      j["output_lens"] = output_lens;
      j["ttfts"] = ttft_list;
      j["itls"] = itl_list;
      j["errors"] = errors;
      write_json_file(j, o->json_path, "--json");
      std::fprintf(stderr, "dsv4 bench serve: results written to %s\n", o->json_path.c_str());
    }
    return completed > 0 ? 0 : 1;
  };
}


}  // namespace dsv4::tools
