#include "model/checkpoint_writer.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/safetensors.h"
#include "model/synthetic_weights.h"
#include "model/weight_spec.h"

namespace dsv4::model {

namespace fs = std::filesystem;
using core::DType;

namespace {

uint64_t spec_bytes(const TensorSpec& s) {
  uint64_t n = core::dtype_size(s.dtype);
  for (int64_t d : s.shape) n *= uint64_t(d);
  return n;
}

struct Shard {
  std::vector<size_t> specs;  // indices into the spec list
  uint64_t bytes = 0;
};

// Greedy packing in spec order; a weight and its scale always share a shard.
std::vector<Shard> plan_shards(const std::vector<TensorSpec>& specs, uint64_t max_bytes) {
  std::vector<Shard> shards(1);
  for (size_t i = 0; i < specs.size(); ++i) {
    const bool is_scale = specs[i].init == WeightInit::kFp8Scale || specs[i].init == WeightInit::kFp4Scale;
    uint64_t unit = spec_bytes(specs[i]);
    if (!is_scale && !specs[i].pair.empty()) unit += spec_bytes(specs[i + 1]);
    if (!is_scale && !shards.back().specs.empty() && shards.back().bytes + unit > max_bytes) shards.emplace_back();
    shards.back().specs.push_back(i);
    shards.back().bytes += spec_bytes(specs[i]);
  }
  return shards;
}

// One unit of generation work: a tensor (or a weight+scale pair), split in row chunks.
void generate_tensor(const std::vector<TensorSpec>& specs, size_t i, const ModelConfig& config, uint64_t seed,
                     SafetensorsWriter& writer, std::atomic<uint64_t>& done) {
  const TensorSpec& s = specs[i];
  constexpr int64_t kChunkElems = 1 << 22;
  switch (s.init) {
    case WeightInit::kNormal: {
      const int64_t n = [&] {
        int64_t v = 1;
        for (int64_t d : s.shape) v *= d;
        return v;
      }();
      std::vector<uint8_t> buf(size_t(std::min(n, kChunkElems)) * core::dtype_size(s.dtype));
      for (int64_t b = 0; b < n; b += kChunkElems) {
        const int64_t c = std::min(kChunkElems, n - b);
        fill_normal(s, seed, b, c, buf.data());
        const uint64_t bytes = uint64_t(c) * core::dtype_size(s.dtype);
        writer.write(s.name, uint64_t(b) * core::dtype_size(s.dtype), buf.data(), bytes);
        done += bytes;
      }
      break;
    }
    case WeightInit::kFp8Weight: {
      const TensorSpec& scale = specs[i + 1];
      const int64_t N = s.logical_n, K = s.logical_k, kb = (K + 127) / 128;
      const int64_t rows_per_chunk = std::max<int64_t>(128, kChunkElems / K / 128 * 128);
      std::vector<uint8_t> w(static_cast<size_t>(rows_per_chunk * K)), sc(size_t((rows_per_chunk / 128) * kb));
      for (int64_t r = 0; r < N; r += rows_per_chunk) {
        const int64_t rows = std::min(rows_per_chunk, N - r);
        fill_fp8_rows(s, seed, r, rows, w.data(), sc.data());
        writer.write(s.name, uint64_t(r * K), w.data(), uint64_t(rows * K));
        const int64_t scale_rows = (rows + 127) / 128;
        writer.write(scale.name, uint64_t((r / 128) * kb), sc.data(), uint64_t(scale_rows * kb));
        done += uint64_t(rows * K + scale_rows * kb);
      }
      break;
    }
    case WeightInit::kFp4Weight: {
      const TensorSpec& scale = specs[i + 1];
      const int64_t N = s.logical_n, K = s.logical_k;
      const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / K);
      std::vector<uint8_t> w(static_cast<size_t>(rows_per_chunk * K / 2)), sc(static_cast<size_t>(rows_per_chunk * K / 32));
      for (int64_t r = 0; r < N; r += rows_per_chunk) {
        const int64_t rows = std::min(rows_per_chunk, N - r);
        fill_fp4_rows(s, seed, r, rows, w.data(), sc.data());
        writer.write(s.name, uint64_t(r * K / 2), w.data(), uint64_t(rows * K / 2));
        writer.write(scale.name, uint64_t(r * K / 32), sc.data(), uint64_t(rows * K / 32));
        done += uint64_t(rows * K / 2 + rows * K / 32);
      }
      break;
    }
    case WeightInit::kExpertIds: {
      const int64_t V = s.shape[0], k = s.shape[1];
      const int64_t rows_per_chunk = 1 << 16;
      std::vector<int64_t> ids(static_cast<size_t>(rows_per_chunk * k));
      for (int64_t r = 0; r < V; r += rows_per_chunk) {
        const int64_t rows = std::min(rows_per_chunk, V - r);
        fill_expert_ids(s, seed, config.n_routed_experts, r, rows, ids.data());
        writer.write(s.name, uint64_t(r * k * 8), ids.data(), uint64_t(rows * k * 8));
        done += uint64_t(rows * k * 8);
      }
      break;
    }
    case WeightInit::kFp8Scale:
    case WeightInit::kFp4Scale:
      break;  // written together with the paired weight
  }
}

}  // namespace

CheckpointWriteResult write_checkpoint(const ModelConfig& config, const CheckpointWriteOptions& options) {
  validate_config(config, "checkpoint config");
  const std::vector<TensorSpec> specs = checkpoint_tensor_specs(config);
  const uint64_t total = total_bytes(specs);
  uint64_t max_shard = options.max_shard_bytes;
  if (max_shard == 0) max_shard = std::clamp<uint64_t>(total / 8, 16ull << 20, 5ull << 30);

  std::error_code ec;
  fs::create_directories(options.out_dir, ec);
  if (ec) core::fail("cannot create output directory {}: {}", options.out_dir, ec.message());

  const std::vector<Shard> shards = plan_shards(specs, max_shard);
  const int n = int(shards.size());
  nlohmann::json weight_map = nlohmann::json::object();
  std::atomic<uint64_t> done{0};
  int threads = options.threads > 0 ? options.threads : int(std::max(1u, std::thread::hardware_concurrency()));

  for (int si = 0; si < n; ++si) {
    const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", si + 1, n);
    std::vector<TensorDecl> decls;
    for (size_t i : shards[size_t(si)].specs) {
      decls.push_back({specs[i].name, specs[i].dtype, specs[i].shape});
      weight_map[specs[i].name] = file;
    }
    SafetensorsWriter writer((fs::path(options.out_dir) / file).string(), decls);
    // Workers take tensors from a shared cursor; each writes its own byte ranges.
    std::atomic<size_t> next{0};
    std::mutex error_mutex;
    std::exception_ptr error;
    auto work = [&] {
      try {
        for (size_t j = next++; j < shards[size_t(si)].specs.size(); j = next++)
          generate_tensor(specs, shards[size_t(si)].specs[j], config, options.seed, writer, done);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(work);
    std::thread reporter;
    std::atomic<bool> stop{false};
    if (options.progress)
      reporter = std::thread([&] {
        while (!stop) {
          options.progress(done.load(), total);
          for (int k = 0; k < 10 && !stop; ++k) std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
      });
    work();
    for (auto& t : pool) t.join();
    stop = true;
    if (reporter.joinable()) reporter.join();
    if (error) std::rethrow_exception(error);
    writer.finish();
  }
  if (options.progress) options.progress(done.load(), total);

  nlohmann::json index;
  index["metadata"] = {{"total_size", total}};
  index["weight_map"] = weight_map;
  std::ofstream(fs::path(options.out_dir) / "model.safetensors.index.json") << index.dump(2) << "\n";
  std::ofstream cfg(fs::path(options.out_dir) / "config.json");
  cfg << config_to_json(config).dump(2) << "\n";
  if (!cfg) core::fail("cannot write {}/config.json", options.out_dir);
  return CheckpointWriteResult{total, n, specs.size()};
}

}  // namespace dsv4::model
