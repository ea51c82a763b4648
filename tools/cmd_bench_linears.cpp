// dsv4 bench linears: what one linear costs inside a captured chain of them, as the
// decode step runs it (activation quantization + GEMM, or the bf16 GEMM), against its
// bytes at the copy bandwidth measured in the same run. A whole-step A/B resolves
// ~0.3%; this isolates the per-launch cost that dominates small batches
// (docs/design/batch1-persistent.md: ~6 µs a GEMM above its bytes under ncu).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "core/error.h"
#include "core/random.h"
#include "ops/weights.h"
#include "tools/commands.h"

namespace dsv4::tools {

namespace {

struct LinearsOptions {
  std::string backend = "auto";
  std::string shapes = "1024x4096,32768x1024,4096x8192,2048x4096,4096x2048";
  std::string rows = "1,16,64,256";
  std::string format = "fp8";
  int groups = 8;
  int chain = 32, warmup = 3, replays = 20, threads = 1;
  std::string weights_bytes = "256M";
  uint64_t seed = 1;
  std::string json;
};

struct Shape {
  int64_t n, k;
};

// "1024x4096,32768x1024": N x K pairs (weight rows x input width).
std::vector<Shape> parse_shapes(const std::string& text, bool fp8) {
  std::vector<Shape> out;
  for (const std::string& item : split_commas(text)) {
    const size_t x = item.find('x');
    Shape s{0, 0};
    try {
      size_t used_n = 0, used_k = 0;
      if (x == std::string::npos) throw std::invalid_argument("");
      s.n = std::stoll(item.substr(0, x), &used_n);
      s.k = std::stoll(item.substr(x + 1), &used_k);
      if (used_n != x || used_k != item.size() - x - 1 || s.n <= 0 || s.k <= 0) throw std::invalid_argument("");
    } catch (...) {
      core::fail("--shapes: \"{}\" is not NxK (expected a list such as 1024x4096,4096x8192)", item);
    }
    if (fp8 && s.k % 128 != 0) core::fail("--shapes: {}: K = {} must be a multiple of 128 for FP8 weights", item, s.k);
    if (!fp8 && s.k % 64 != 0) core::fail("--shapes: {}: K = {} must be a multiple of 64 for bf16 weights", item, s.k);
    out.push_back(s);
  }
  return out;
}

// Random bytes for a weight: e4m3 codes without NaN (0x7f / 0xff), UE8M0 scales of
// 2^-10 .. 2^-3, bf16 values of magnitude < 1. Never zeros: some memory paths compress them.
void fill_host(std::vector<uint8_t>& host, core::DType dtype, uint64_t seed, uint64_t stream) {
  if (dtype == core::DType::kBF16) {
    for (size_t i = 0; i + 1 < host.size(); i += 2) {
      const uint16_t h = core::float_to_bf16(core::random_uniform(seed, stream, i / 2) * 2.0f - 1.0f);
      std::memcpy(&host[i], &h, 2);
    }
    return;
  }
  for (size_t i = 0; i < host.size(); i += 8) {
    uint64_t r = core::random_bits(seed, stream, i / 8);
    for (size_t b = 0; b < 8 && i + b < host.size(); ++b, r >>= 8) {
      uint8_t v = uint8_t(r);
      if (dtype == core::DType::kF8E4M3 && (v & 0x7f) == 0x7f) v ^= 1;
      if (dtype == core::DType::kF8E8M0) v = uint8_t(117 + v % 8);
      host[i + b] = v;
    }
  }
}

core::Tensor random_tensor(ops::Backend& be, core::DType dtype, std::initializer_list<int64_t> shape, uint64_t seed,
                           uint64_t stream) {
  core::Tensor t = be.empty(dtype, shape);
  std::vector<uint8_t> host(t.nbytes());
  fill_host(host, dtype, seed, stream);
  be.upload(t, host.data(), host.size());
  return t;
}

struct Result {
  Shape shape;
  int64_t rows = 0, weights = 0, bytes = 0;  // distinct weights cycled; bytes a linear reads and writes
  double us = 0;                             // a linear, median of the replays / chain
};

}  // namespace

Command add_bench_linears(CLI::App& app) {
  auto o = std::make_shared<LinearsOptions>();
  app.footer(
      "For each --shapes N x K and --rows M: one CUDA graph of --chain linears y = x W^T, one after the\n"
      "other on the stream (dependent launch between them, as in the decode step), each reading one of\n"
      "several distinct weights that together exceed the L2 (--weights-bytes), so every launch streams\n"
      "its weight from memory. FP8 linears include the activation quantization, as the model runs them;\n"
      "fp8-grouped ones (wo_a's form) take bf16 activations as they are.\n"
      "Prints the median time a linear takes over --replays replays, its bytes (weight, scales,\n"
      "activations, output), their GB/s, and the microseconds it takes above those bytes at the copy\n"
      "bandwidth measured in the same run: the per-launch cost a decode step pays for each linear.\n"
      "Weights and inputs are random (never zeros). The CPU backend runs the same (slowly; for tests).");
  app.add_option("--backend", o->backend, "cuda, cpu or auto")->default_val("auto");
  app.add_option("--shapes", o->shapes, "Comma-separated NxK weight shapes (rows x input width)")
      ->default_val(o->shapes);
  app.add_option("--rows", o->rows, "Comma-separated activation row counts M")->default_val(o->rows);
  app.add_option("--format", o->format,
                 "Weight format: fp8 (e4m3, 128x128 block scales), bf16, or fp8-grouped (wo_a's grouped form, spec "
                 "5.6: the FP8 weight used dequantized with bf16 activations, not quantized; N x K is the whole "
                 "weight [G*R, C], the input is [M, G*K])")
      ->default_val("fp8")
      ->check(CLI::IsMember({"fp8", "bf16", "fp8-grouped"}));
  CLI::Option* groups_option =
      app.add_option("--groups", o->groups, "fp8-grouped: the groups G (N must be a multiple of G)")
          ->default_val(8)
          ->check(CLI::Range(1, 1024));
  app.add_option("--chain", o->chain, "Linears in the captured graph")->default_val(32)->check(CLI::Range(1, 4096));
  app.add_option("--weights-bytes", o->weights_bytes, "Bytes of distinct weights the chain cycles through")
      ->default_val("256M");
  app.add_option("--warmup", o->warmup, "Untimed replays first")->default_val(3)->check(CLI::Range(0, 1000));
  app.add_option("--replays", o->replays, "Timed replays (median)")->default_val(20)->check(CLI::Range(1, 10000));
  app.add_option("--threads", o->threads, "CPU backend threads")->default_val(1)->check(CLI::Range(1, 1024));
  app.add_option("--seed", o->seed, "Seed of the random weights and inputs")->default_val(1);
  app.add_option("--json", o->json, "Write the results as JSON");
  return [o, groups_option]() -> int {
    if (!o->json.empty()) expect_writable_file(o->json, "--json");
    const bool grouped = o->format == "fp8-grouped";
    if (!grouped && groups_option->count() > 0)
      core::fail("--groups: only --format fp8-grouped takes groups (the format is {})", o->format);
    const bool fp8 = o->format == "fp8" || grouped;
    const int64_t groups = grouped ? o->groups : 1;
    const std::vector<Shape> shapes = parse_shapes(o->shapes, fp8);
    for (const Shape& s : shapes)
      if (s.n % groups != 0)
        core::fail("--shapes: {}x{}: N = {} is not a multiple of --groups {}", s.n, s.k, s.n, groups);
    const std::vector<int32_t> rows = parse_list(o->rows, "--rows");
    const uint64_t pool_bytes = parse_size(o->weights_bytes, "--weights-bytes");
    if (pool_bytes == 0) core::fail("--weights-bytes: must be a size, not auto");
    auto backend = make_backend(o->backend == "auto" ? default_backend_name() : o->backend, o->threads);
    ops::Backend& be = *backend;
    const double copy_bw = measure_copy_bandwidth(be);
    std::printf("bench linears: %s weights, chain of %d, median of %d replays; copy bandwidth %.0f GB/s\n",
                o->format.c_str(), o->chain, o->replays, copy_bw / 1e9);
    std::printf("%7s %7s %5s %8s %10s %9s %8s %14s\n", "N", "K", "rows", "weights", "us/linear", "MB", "GB/s",
                "us above bytes");
    std::vector<Result> results;
    uint64_t stream = 0;
    for (const Shape& s : shapes) {
      const int64_t w_bytes = s.n * s.k * (fp8 ? 1 : 2);
      const int64_t s_bytes = fp8 ? ((s.n + 127) / 128) * (s.k / 128) : 0;
      const int64_t distinct =
          std::clamp<int64_t>(int64_t((pool_bytes + uint64_t(w_bytes) - 1) / uint64_t(w_bytes)), 1, o->chain);
      std::vector<ops::QuantLinear> wq;
      std::vector<core::Tensor> wb;
      for (int64_t i = 0; i < distinct; ++i, ++stream) {
        if (fp8) {
          ops::QuantLinear q;
          q.weight = random_tensor(be, core::DType::kF8E4M3, {s.n, s.k}, o->seed, 2 * stream);
          q.scale = random_tensor(be, core::DType::kF8E8M0, {(s.n + 127) / 128, s.k / 128}, o->seed, 2 * stream + 1);
          q.format = ops::QuantLinear::Format::kFp8Block128;
          q.n = s.n;
          q.k = s.k;
          wq.push_back(q);
        } else {
          wb.push_back(random_tensor(be, core::DType::kBF16, {s.n, s.k}, o->seed, 2 * stream));
        }
      }
      for (int32_t m : rows) {
        const core::Tensor x = random_tensor(be, core::DType::kBF16, {m, groups * s.k}, o->seed, 1ull << 40 | stream++);
        const core::Tensor y[2] = {be.empty(core::DType::kBF16, {m, s.n}), be.empty(core::DType::kBF16, {m, s.n})};
        auto body = [&] {
          for (int i = 0; i < o->chain; ++i) {
            const size_t w = size_t(i % distinct);
            if (grouped) be.grouped_linear(x, wq[w], groups, y[i % 2]);
            else if (fp8) be.linear(x, wq[w], y[i % 2]);
            else be.linear_bf16(x, wb[w], y[i % 2]);
          }
        };
        body();  // first use: kernels loaded, scratch grown (capture must not allocate)
        be.synchronize();
        std::unique_ptr<ops::Graph> graph = be.capture(body);
        for (int i = 0; i < o->warmup; ++i) graph->replay();
        auto timer = be.make_timer();
        std::vector<double> ms;
        for (int i = 0; i < o->replays; ++i) {
          timer->start();
          graph->replay();
          timer->stop();
          ms.push_back(timer->elapsed_ms());
        }
        Result r;
        r.shape = s;
        r.rows = m;
        r.weights = distinct;
        r.bytes = w_bytes + s_bytes + int64_t(m) * groups * s.k * 2 + int64_t(m) * s.n * 2;
        r.us = median(ms) * 1e3 / o->chain;
        const double bytes_us = double(r.bytes) / copy_bw * 1e6;
        std::printf("%7lld %7lld %5lld %8lld %10.2f %9.2f %8.0f %14.2f\n", static_cast<long long>(s.n),
                    static_cast<long long>(s.k), static_cast<long long>(m), static_cast<long long>(distinct), r.us,
                    r.bytes / 1e6, r.bytes / (r.us * 1e-6) / 1e9, r.us - bytes_us);
        std::fflush(stdout);
        results.push_back(r);
      }
    }
    if (!o->json.empty()) {
      nlohmann::json out;
      out["backend"] = be.device() == core::Device::kCuda ? "cuda" : "cpu";
      out["format"] = o->format;
      if (grouped) out["groups"] = groups;
      out["chain"] = o->chain;
      out["replays"] = o->replays;
      out["device"] = device_json(be);
      out["build"] = build_json();
      out["copy_bandwidth_gb_s"] = copy_bw / 1e9;
      out["environment"] = environment_json();  // the switches in effect (tools/env_switches.h)
      for (const Result& r : results)
        out["results"].push_back({{"n", r.shape.n},
                                  {"k", r.shape.k},
                                  {"rows", r.rows},
                                  {"distinct_weights", r.weights},
                                  {"bytes", r.bytes},
                                  {"us_per_linear", r.us},
                                  {"us_above_bytes", r.us - double(r.bytes) / copy_bw * 1e6}});
      write_json_file(out, o->json, "--json");
    }
    return 0;
  };
}

}  // namespace dsv4::tools
