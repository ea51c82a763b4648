// Float -> e4m3 by the hardware conversion (cvt.rn.satfinite.e4m3x2.f32, sm_89+):
// round to nearest even, finite values saturated to +-448. For every float x it gives
// the bits of core::float_to_e4m3(clamp(x, -448, 448)), the reference cast
// (CudaE4m3.HardwareCastEqualsTheReferenceCast checks all 2^32 inputs); NaN inputs
// take the reference's code 0x7f (the hardware keeps their sign).
#pragma once

#include <cstdint>

namespace dsv4::ops {

// Codes of a0 (low byte) and a1.
__device__ __forceinline__ uint32_t e4m3x2_sat(float a0, float a1) {
  uint16_t packed;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %2, %1;\n" : "=h"(packed) : "f"(a0), "f"(a1));
  uint32_t r = packed;
  if ((a0 != a0) | (a1 != a1)) r = (a0 != a0 ? 0x7fu : r & 0xffu) | (a1 != a1 ? 0x7f00u : r & 0xff00u);
  return r;
}

// Codes of a0..a3, byte i = value i.
__device__ __forceinline__ uint32_t e4m3x4_sat(float a0, float a1, float a2, float a3) {
  return e4m3x2_sat(a0, a1) | (e4m3x2_sat(a2, a3) << 16);
}

}  // namespace dsv4::ops
