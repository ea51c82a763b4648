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


}  // namespace dsv4::testing
