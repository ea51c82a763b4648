#include "model/checkpoint_writer.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
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

}  // namespace

void check_checkpoint_fits(const std::string& dir, uint64_t needed, uint64_t available) {
  // (each shard's header and the index: a few MB at most on top of the tensors)
  const uint64_t with_headers = needed + (uint64_t(16) << 20);
  if (with_headers > available)
    core::fail("checkpoint {}: its tensors take {:.2f} GB and {:.2f} GB are free there; free some space or write it "
               "elsewhere (--out)",
               dir, double(needed) / 1e9, double(available) / 1e9);
}

CheckpointWriteResult write_checkpoint(const ModelConfig& config, const CheckpointWriteOptions& options) {
  validate_config(config, "checkpoint config");
  const std::vector<TensorSpec> specs = checkpoint_tensor_specs(config);
  const uint64_t total = total_bytes(specs);
  uint64_t max_shard = options.max_shard_bytes;
  if (max_shard == 0) max_shard = std::clamp<uint64_t>(total / 8, 16ull << 20, 5ull << 30);

  const std::vector<Shard> shards = plan_shards(specs, max_shard);
  const int n = int(shards.size());
  // A checkpoint that does not fit stops here, before anything is created, not after hours of
  // writing (v4-flash: 160 GB). The free space is that of the nearest folder that exists;
  // shards of the same names already there are rewritten in place, so their bytes count as free.
  std::error_code ec;
  fs::path existing = fs::absolute(options.out_dir, ec);
  while (!ec && !fs::exists(existing, ec) && existing.has_parent_path() && existing != existing.parent_path())
    existing = existing.parent_path();
  if (const fs::space_info space = fs::space(existing, ec); !ec) {
    uint64_t reused = 0;
    for (int si = 0; si < n; ++si) {
      const fs::path old = fs::path(options.out_dir) / fmt::format("model-{:05d}-of-{:05d}.safetensors", si + 1, n);
      if (const uintmax_t size = fs::file_size(old, ec); !ec) reused += size;
    }
    check_checkpoint_fits(options.out_dir, total, uint64_t(space.available) + reused);
  }
  ec.clear();
  fs::create_directories(options.out_dir, ec);
  if (ec) core::fail("cannot create output directory {}: {}", options.out_dir, ec.message());
  nlohmann::json weight_map = nlohmann::json::object();
  std::atomic<uint64_t> done{0};

  for (int si = 0; si < n; ++si) {
    const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", si + 1, n);
    std::vector<TensorDecl> decls;
    for (size_t i : shards[size_t(si)].specs) {
      decls.push_back({specs[i].name, specs[i].dtype, specs[i].shape});
      weight_map[specs[i].name] = file;
    }
    SafetensorsWriter writer((fs::path(options.out_dir) / file).string(), decls);
    // Workers take tensors from a shared cursor; each writes its own byte ranges.
    generate_tensors(
        specs, shards[size_t(si)].specs, config.n_routed_experts, options.seed,
        [&writer](const std::string& name, uint64_t offset, const void* data, uint64_t size) {
          writer.write(name, offset, data, size);
        },
        options.threads, done, total, options.progress);
    writer.finish();
  }
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
