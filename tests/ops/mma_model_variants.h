// Variants of Hopper's bf16 k16 step model (ref::hopper_bf16_mma16), for diagnosis
// only: if the hardware ever disagrees with the model, the GPU test reports which
// variant would match, so the next fix is one measurement away. The default
// parameters are the model itself (a CPU test checks that). Also candidates for the
// e4m3 k32 step onto an accumulator, which no model covers yet (below).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "core/dtype.h"

namespace dsv4::testing {

namespace detail {

// An fp32 accumulator as sig * 2^(e - 23) (sig 0 for zero).
struct FloatParts {
  int64_t sig;
  int e;
  bool negative;
};
inline FloatParts float_parts(float c) {
  const uint32_t cu = core::float_bits(c);
  const int field = int((cu >> 23) & 0xff);
  return {field == 0 ? int64_t(cu & 0x7fffff) : int64_t((cu & 0x7fffff) | 0x800000), (field == 0 ? 1 : field) - 127,
          (cu & 0x80000000u) != 0};
}

// mag * 2^shift, truncated toward zero.
inline __int128 aligned(__int128 mag, int shift) {
  if (shift >= 0) return shift >= 100 ? 0 : mag << shift;
  return -shift >= 120 ? 0 : mag >> -shift;
}

// sum * 2^unit as a float of result_bits significant bits (fp32's subnormal floor
// included), cut toward zero or rounded to nearest-even.
inline float to_float(__int128 sum, int unit, int result_bits, bool round_nearest) {
  if (sum == 0) return 0.0f;
  unsigned __int128 mag = sum < 0 ? (unsigned __int128)(-sum) : (unsigned __int128)sum;
  int bits = 0;
  while (bits < 127 && (mag >> bits) != 0) ++bits;
  const int drop = std::max(bits - result_bits, -149 - unit);
  if (drop > 0) {
    const unsigned __int128 kept = drop >= 127 ? 0 : mag >> drop;
    const unsigned __int128 rest = drop >= 127 ? mag : mag - (kept << drop);
    const unsigned __int128 half = (unsigned __int128)1 << (drop - 1 > 126 ? 126 : drop - 1);
    mag = kept;
    if (round_nearest && drop <= 126 && (rest > half || (rest == half && (kept & 1)))) mag += 1;
    unit += drop;
  }
  const double d = std::ldexp(double(uint64_t(mag)), unit);
  return float(sum < 0 ? -d : d);
}

}  // namespace detail

struct Bf16StepVariant {
  int frac_bits = 25;            // bits kept below the largest exponent, per term
  bool round_nearest = false;    // final rounding to fp32: nearest-even instead of toward zero
  bool c_in_alignment = true;    // false: the products' sum (rounded as above) + c in IEEE fp32
};

// c + sum_{k<16} a_k b_k (bf16 a, b) under a variant; finite inputs only.
inline float bf16_step_variant(float c, const uint16_t* a, const uint16_t* b, const Bf16StepVariant& v) {
  const auto parts = [](uint16_t x, int64_t* sig, int* e) {  // x = sig * 2^(e - 7)
    const int field = (x >> 7) & 0xff, m = x & 0x7f;
    *sig = field == 0 ? m : 128 + m;
    *e = (field == 0 ? 1 : field) - 127;
  };
  const detail::FloatParts cp = detail::float_parts(v.c_in_alignment ? c : 0.0f);
  int64_t sig[16];
  int ep[16];
  int e_max = cp.sig == 0 ? -126 : cp.e;
  for (int k = 0; k < 16; ++k) {
    int64_t sa, sb;
    int ea, eb;
    parts(a[k], &sa, &ea);
    parts(b[k], &sb, &eb);
    sig[k] = sa * sb;  // * 2^(ep - 14)
    ep[k] = ea + eb;
    e_max = std::max(e_max, sig[k] == 0 ? -126 : ep[k]);
  }
  // Terms in units of 2^(e_max - F), truncated toward zero; __int128 for wide F.
  const int F = v.frac_bits;
  __int128 sum = 0;
  for (int k = 0; k < 16; ++k) {
    if (sig[k] == 0) continue;
    const __int128 term = detail::aligned(sig[k], ep[k] - 14 - e_max + F);
    sum += ((a[k] ^ b[k]) & 0x8000) ? -term : term;
  }
  if (cp.sig != 0) {
    const __int128 term = detail::aligned(cp.sig, cp.e - 23 - e_max + F);
    sum += cp.negative ? -term : term;
  }
  const float result = detail::to_float(sum, e_max - F, 24, v.round_nearest);
  return v.c_in_alignment ? result : c + result;
}

// Variants of Hopper's e4m3 k32 step onto an accumulator c (wgmma with scale-d 1),
// for diagnosis like the bf16 ones: the defaults are ref::hopper_e4m3_step (a CPU
// test checks), the step the FP8 GEMMs chain over each 128-wide stage. Each product a_k b_k is exact (an 8-bit significand), every term is cut
// toward zero to frac_bits below the largest exponent (the products' exponent sums,
// and c's exponent where c joins the alignment), the sum is exact, and the result
// keeps result_bits significant bits (toward zero, or nearest-even); with
// c_in_alignment false, c is added to that result in IEEE fp32 instead. The GPU test
// CudaMma.E4m3StepsWithAnAccumulator counts how often each candidate differs from the
// hardware. Finite codes only (no 0x7f, 0xff).
struct E4m3StepVariant {
  int frac_bits = 13;
  int result_bits = 14;
  bool round_nearest = false;
  bool c_in_alignment = true;
};

inline float e4m3_step_variant(float c, const uint8_t* a, const uint8_t* b, const E4m3StepVariant& v) {
  const auto parts = [](uint8_t x, int64_t* sig, int* e) {  // |x| = sig * 2^(e - 3)
    const int field = (x >> 3) & 15, m = x & 7;
    *sig = field == 0 ? m : 8 + m;
    *e = (field == 0 ? 1 : field) - 7;
  };
  const detail::FloatParts cp = detail::float_parts(v.c_in_alignment ? c : 0.0f);
  int64_t sig[32];
  int ep[32];
  bool any = cp.sig != 0;
  int e_max = cp.sig != 0 ? cp.e : -1000;
  for (int k = 0; k < 32; ++k) {
    int64_t sa, sb;
    int ea, eb;
    parts(a[k], &sa, &ea);
    parts(b[k], &sb, &eb);
    sig[k] = sa * sb;  // the product is sig * 2^(ep - 6)
    ep[k] = ea + eb;
    if (sig[k] != 0) e_max = std::max(e_max, ep[k]), any = true;
  }
  float result = 0.0f;
  if (any) {
    const int F = v.frac_bits;
    __int128 sum = 0;
    for (int k = 0; k < 32; ++k) {
      if (sig[k] == 0) continue;
      const __int128 term = detail::aligned(sig[k], ep[k] - 6 - e_max + F);
      sum += ((a[k] ^ b[k]) & 0x80) ? -term : term;
    }
    if (cp.sig != 0) {
      const __int128 term = detail::aligned(cp.sig, cp.e - 23 - e_max + F);
      sum += cp.negative ? -term : term;
    }
    result = detail::to_float(sum, e_max - F, v.result_bits, v.round_nearest);
  }
  return v.c_in_alignment ? result : c + result;
}

}  // namespace dsv4::testing
