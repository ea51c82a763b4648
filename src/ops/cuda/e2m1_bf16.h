// Two e2m1 values (one byte) times an e8m0 scale 2^(E - 127), as two bf16 bit
// patterns, by integer adds: the indexer scoring's key decode (cuda_attention.cu).
// Host and device code, tested on the CPU for every byte and scale of its range
// (tests/ops/e2m1_bf16_test.cpp) against the float product it replaces.
//
// Why it is exact: e2m1 magnitudes (0.5 to 6) have at most two significant bits, so
// times a power of two they are bf16 values with no rounding; the scaled value's bits
// are the magnitude's with E - 127 added to the exponent field, while the product is
// a normal number: 2 <= E <= 252. A zero keeps its sign and gets no exponent.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace dsv4::ops {

// Per 16-bit half (low half: the byte's low nibble): x = sign << 15 | (bits of
// |value| - 0x3f00), 0 for a zero magnitude; y = 0xffff where the magnitude is not
// zero. x stays below 0x1c1 a half, so x + (E - 1) << 7 never reaches bit 15 for
// E <= 252 (0x1c0 + 251 * 128 = 0x7f40): no half carries into the sign or the other.
struct E2m1PairBits {
  uint32_t x, y;
};

DSV4_HD E2m1PairBits e2m1_pair_bits(uint32_t byte) {
  uint32_t x = 0, y = 0;
  for (int half = 0; half < 2; ++half) {
    const uint32_t nib = (byte >> (4 * half)) & 15u, m = nib & 7u;
    // bf16 bits of 0, 0.5, 1, 1.5, 2, 3, 4, 6
    const uint32_t mag = m == 0 ? 0u : m == 1 ? 0x3f00u : 0x3f80u + ((m - 2u) << 6);
    x |= ((nib & 8u) << 12 | (mag != 0 ? mag - 0x3f00u : 0u)) << (16 * half);
    y |= (mag != 0 ? 0xffffu : 0u) << (16 * half);
  }
  return {x, y};
}

// The scales whose products the integer decode gives exactly.
DSV4_HD bool e2m1_scale_in_range(uint32_t e8m0) { return e8m0 - 2u <= 250u; }

// (E - 1) << 7 in both halves, for e2m1_pair_scaled.
DSV4_HD uint32_t e2m1_scale_add(uint32_t e8m0) { return (e8m0 - 1u) << 7 | (e8m0 - 1u) << 23; }

// The two scaled values' bf16 bits (low half: the low nibble), for a scale in range.
DSV4_HD uint32_t e2m1_pair_scaled(E2m1PairBits p, uint32_t scale_add) { return p.x + (scale_add & p.y); }

}  // namespace dsv4::ops
