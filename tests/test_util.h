// Shared helpers for tests: temp directories and the tiny model in memory.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <unistd.h>
#include <random>
#include <filesystem>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "test_seed.h"

#include "model/config.h"
#include "model/weights.h"
#include "ops/batch.h"

namespace dsv4::testing {

// A fresh directory per process: ctest runs tests in parallel, each in its own
// process, and two of them must never share (or delete) each other's files.
inline std::string temp_dir(const std::string& name) {
  const char* base = std::getenv("DSV4_TEST_TMP");
  std::filesystem::path p = std::filesystem::path(base ? base : "/tmp") / (name + "." + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// The `tiny` preset's synthetic weights (seed 1), built once per test binary.
inline const model::SyntheticWeightStore& tiny_weights() {
  static const auto store = std::make_unique<model::SyntheticWeightStore>(model::preset_config("tiny"), 1);
  return *store;
}

// The bytes of every tensor of a runner's caches (what Transformer::cache_bytes must predict).
inline uint64_t cache_tensor_bytes(const std::vector<ops::LayerCache>& caches) {
  uint64_t bytes = 0;
  for (const ops::LayerCache& c : caches)
    for (const core::Tensor* t : {&c.window, &c.rows, &c.index_rows, &c.kv_state, &c.score_state, &c.index_kv_state,
                                  &c.index_score_state})
      if (t->data() != nullptr) bytes += t->nbytes();  // (a layer's absent parts are empty tensors)
  return bytes;
}

}  // namespace dsv4::testing
