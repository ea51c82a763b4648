// Writes a synthetic checkpoint in the official layout (spec §8): config.json,
// model-XXXXX-of-YYYYY.safetensors shards and model.safetensors.index.json.
// Tensors are generated and written piecewise, so even the largest presets
// stream to disk in bounded memory.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "model/config.h"

namespace dsv4::model {

struct CheckpointWriteOptions {
  std::string out_dir;
  uint64_t seed = 0;
  uint64_t max_shard_bytes = 0;  // 0: automatic (about 8 shards, 16 MiB..5 GiB each)
  int threads = 0;               // 0: hardware concurrency
  // Called now and then with bytes written so far and the total.
  std::function<void(uint64_t done, uint64_t total)> progress;
};

struct CheckpointWriteResult {
  uint64_t total_bytes = 0;
  int num_shards = 0;
  size_t num_tensors = 0;
};

// Writes nothing and fails, naming the folder and both sizes, where the checkpoint does not
// fit the free space of its file system (checked before the first shard).
CheckpointWriteResult write_checkpoint(const ModelConfig& config, const CheckpointWriteOptions& options);

// The check write_checkpoint makes: `needed` tensor bytes (plus a margin for headers) against
// `available` bytes in `dir`.
void check_checkpoint_fits(const std::string& dir, uint64_t needed, uint64_t available);

}  // namespace dsv4::model
