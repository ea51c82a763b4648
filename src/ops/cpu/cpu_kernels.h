// Inner loops shared by the CPU backend's ops. Dot products accumulate in fp32
// over 16 fixed lanes and then reduce in a fixed tree, so the result depends only
// on the inputs (never on the instruction set the clone runs on: the ISO C++
// mode keeps mul and add unfused).
#pragma once

#include <cstdint>
#include <cstring>

#include "core/dtype.h"

namespace dsv4::ops::cpu {

using v8f = float __attribute__((vector_size(32)));
using v8u = uint32_t __attribute__((vector_size(32)));
using v8h = uint16_t __attribute__((vector_size(16)));

inline float reduce8(v8f a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

__attribute__((target_clones("avx2", "default"))) inline float dot_f32(const float* a, const float* b, int64_t n) {
  v8f acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8f x0, y0, x1, y1;
    std::memcpy(&x0, a + i, 32);
    std::memcpy(&y0, b + i, 32);
    std::memcpy(&x1, a + i + 8, 32);
    std::memcpy(&y1, b + i + 8, 32);
    acc0 += x0 * y0;
    acc1 += x1 * y1;
  }
  float s = reduce8(acc0) + reduce8(acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[j] = a[j] . x for the `rows` rows of a (n floats each), and out[rows] = x . x,
// each summed in the CUDA mHC kernels' order (hc_mix_partial_kernel, then
// hc_finish_kernel): 128-wide slices of k, each a chain of fused multiply-adds in k
// order from zero, the slices added in order from zero. A fused multiply-add has one
// correct result, so both clones and the GPU give the same bits.
__attribute__((target_clones("fma", "default"))) inline void dots_in_slices_of_128(const float* a, const float* x,
                                                                                   int64_t n, int64_t rows,
                                                                                   float* out) {
  constexpr int64_t kSlice = 128;
  for (int64_t j = 0; j <= rows; ++j) {
    const float* w = j < rows ? a + j * n : x;
    float total = 0.0f;
    for (int64_t k0 = 0; k0 < n; k0 += kSlice) {
      const int64_t k1 = k0 + kSlice < n ? k0 + kSlice : n;
      float acc = 0.0f;
      for (int64_t k = k0; k < k1; ++k) acc = __builtin_fmaf(w[k], x[k], acc);
      total += acc;
    }
    out[j] = total;
  }
}

inline v8f load_bf16x8(const uint16_t* p) {
  v8h h;
  std::memcpy(&h, p, 16);
  v8u u = __builtin_convertvector(h, v8u) << 16;
  v8f f;
  std::memcpy(&f, &u, 32);
  return f;
}

__attribute__((target_clones("avx2", "default"))) inline float dot_f32_bf16(const float* a, const uint16_t* b,
                                                                             int64_t n) {
  v8f acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8f x0, x1;
    std::memcpy(&x0, a + i, 32);
    std::memcpy(&x1, a + i + 8, 32);
    acc0 += x0 * load_bf16x8(b + i);
    acc1 += x1 * load_bf16x8(b + i + 8);
  }
  float s = reduce8(acc0) + reduce8(acc1);
  for (; i < n; ++i) s += a[i] * core::bf16_to_float(b[i]);
  return s;
}

inline void bf16_row_to_float(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = core::bf16_to_float(src[i]);
}

}  // namespace dsv4::ops::cpu
