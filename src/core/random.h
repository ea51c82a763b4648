// Counter-based random numbers: value i of stream s under seed k is a pure
// function of (k, s, i). Synthetic weights are therefore identical whether they
// are written to disk in a stream, built on the CPU, or built on the GPU in
// parallel, and no generator state needs to be threaded through.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#include "core/dtype.h"
#include "core/scalar_math.h"

namespace dsv4::core {

DSV4_HD uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

DSV4_HD uint64_t random_bits(uint64_t seed, uint64_t stream, uint64_t index) {
  return mix64(mix64(seed ^ mix64(stream)) + index * 0x9e3779b97f4a7c15ull);
}

// Uniform in [0, 1) with 24 random bits.
DSV4_HD float random_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return float(random_bits(seed, stream, index) >> 40) * (1.0f / 16777216.0f);
}

// Standard normal via Box-Muller over two uniforms. The log and cos are the
// portable fp32 ones, so the CPU generator and the GPU builders draw the same bits
// (with the libm / CUDA logf and cosf, about 1 value in 1e4 differed by an ulp,
// and a model built on the GPU then diverged from the same model built on the CPU
// after a few greedy tokens).
DSV4_HD float random_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  const float u1 = 1.0f - random_uniform(seed, stream, 2 * index);  // (0, 1], exact
  const float u2 = random_uniform(seed, stream, 2 * index + 1);
  return sqrt_rn(-2.0f * log_f32_portable(u1)) * cos_2pi_portable(u2);
}

// FNV-1a, to turn a tensor name into a stream id.
inline uint64_t stream_id(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : name) h = (h ^ uint8_t(c)) * 0x100000001b3ull;
  return h;
}

}  // namespace dsv4::core
