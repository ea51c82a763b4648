// Synthetic ("random but sane") weights: scaled Gaussians quantized exactly as a
// real checkpoint stores them, so every scale path is exercised. Element values
// are pure functions of (seed, tensor name, index) (core/random.h), so the disk
// writer, the CPU builder and the GPU builder produce the same weights.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/random.h"
#include "model/weight_spec.h"

namespace dsv4::model {

// Per 128x128 block gain 2^u, u uniform in [-1, 1): spreads block scales over
// several binades so the UE8M0 paths see different exponents.
DSV4_HD float fp8_block_gain(uint64_t seed, uint64_t stream, int64_t block_index) {
  float u = core::random_uniform(seed, stream ^ 0x5bd1e995ull, uint64_t(block_index)) * 2.0f - 1.0f;
  return exp2f(u);
}

// Unquantized value of FP8 weight element (n, k) of an [N, K] matrix.
DSV4_HD float fp8_weight_value(uint64_t seed, uint64_t stream, float std, int64_t K, int64_t n, int64_t k) {
  int64_t kb = (K + 127) / 128;
  float gain = fp8_block_gain(seed, stream, (n / 128) * kb + k / 128);
  return std * gain * core::random_normal(seed, stream, uint64_t(n * K + k));
}

DSV4_HD float fp4_weight_value(uint64_t seed, uint64_t stream, float std, int64_t K, int64_t n, int64_t k) {
  return std * core::random_normal(seed, stream, uint64_t(n * K + k));
}

// UE8M0 exponent for a block with absolute maximum `amax` and format maximum
// `format_max` (448 for e4m3, 6 for e2m1): 2^ceil(log2(amax / format_max)).
DSV4_HD int weight_scale_exponent(float amax, float format_max_inv, float amax_floor) {
  return core::ceil_log2_bits(fmaxf(amax, amax_floor) * format_max_inv);
}

// Distinct expert ids for token `t` (hash-routing table row).
DSV4_HD void expert_ids_row(uint64_t seed, uint64_t stream, int64_t t, int64_t num_experts, int64_t k, int64_t* out) {
  for (int64_t i = 0; i < k; ++i) {
    int64_t r = int64_t(core::random_bits(seed, stream, uint64_t(t * k + i)) % uint64_t(num_experts - i));
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

// CPU generation of a tensor, or of a row range of it, into host memory.
// For an FP8/FP4 weight, `scale_out` receives the rows of its paired scale that
// cover the generated weight rows (FP8: row blocks of 128; rows must be aligned).
void fill_normal(const TensorSpec& spec, uint64_t seed, int64_t begin, int64_t count, void* out);
void fill_fp8_rows(const TensorSpec& weight, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out);
void fill_fp4_rows(const TensorSpec& weight, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out);
void fill_expert_ids(const TensorSpec& spec, uint64_t seed, int64_t num_experts, int64_t row_begin, int64_t row_count,
                     int64_t* out);

}  // namespace dsv4::model
