// The random seed of a test run: fresh per run, printed so that a failure can be
// replayed with DSV4_TEST_SEED. Header-only, no project dependencies.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace dsv4::testing {

inline uint64_t test_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("DSV4_TEST_SEED");
    uint64_t s = env ? std::strtoull(env, nullptr, 10) : uint64_t(std::random_device{}());
    std::fprintf(stderr, "[test seed %llu; rerun with DSV4_TEST_SEED=%llu]\n", (unsigned long long)s,
                 (unsigned long long)s);
    return s;
  }();
  return seed;
}

}  // namespace dsv4::testing
