// Values of synthetic weights as pure functions of (seed, stream, index), usable
// on the host and in CUDA kernels, so every builder draws the same weights
// (model/synthetic_weights.h builds on these).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "core/random.h"

namespace dsv4::core {

// Per 128x128 block gain 2^u, u uniform in [-1, 1): spreads block scales over
// several binades so the UE8M0 paths see different exponents.
DSV4_HD float fp8_block_gain(uint64_t seed, uint64_t stream, int64_t block_index) {
  const float u = fmaf(random_uniform(seed, stream ^ 0x5bd1e995ull, uint64_t(block_index)), 2.0f, -1.0f);  // exact
  return exp_f32_portable(u * 0.693147180559945f);  // not exp2f: the host's and the device's differ in last bits
}

// Unquantized value of FP8 weight element (n, k) of an [N, K] matrix.
DSV4_HD float fp8_weight_value(uint64_t seed, uint64_t stream, float std, int64_t K, int64_t n, int64_t k) {
  int64_t kb = (K + 127) / 128;
  float gain = fp8_block_gain(seed, stream, (n / 128) * kb + k / 128);
  return std * gain * random_normal(seed, stream, uint64_t(n * K + k));
}

DSV4_HD float fp4_weight_value(uint64_t seed, uint64_t stream, float std, int64_t K, int64_t n, int64_t k) {
  return std * random_normal(seed, stream, uint64_t(n * K + k));
}

// UE8M0 exponent for a block with absolute maximum `amax` and format maximum
// `format_max` (448 for e4m3, 6 for e2m1): 2^ceil(log2(amax / format_max)).
DSV4_HD int weight_scale_exponent(float amax, float format_max_inv, float amax_floor) {
  return ceil_log2_bits(fmaxf(amax, amax_floor) * format_max_inv);
}

// Distinct expert ids for token `t` (hash-routing table row).
DSV4_HD void expert_ids_row(uint64_t seed, uint64_t stream, int64_t t, int64_t num_experts, int64_t k, int64_t* out) {
  for (int64_t i = 0; i < k; ++i) {
    int64_t r = int64_t(random_bits(seed, stream, uint64_t(t * k + i)) % uint64_t(num_experts - i));
    int64_t id = 0;
    // Pick the r-th id not used yet, in ascending order.
    for (id = 0; id < num_experts; ++id) {
      bool used = false;
      for (int64_t j = 0; j < i; ++j) used = used || out[j] == id;
      if (used) continue;
      if (r == 0) break;
      --r;
    }
    out[i] = id;
  }
}

}  // namespace dsv4::core
