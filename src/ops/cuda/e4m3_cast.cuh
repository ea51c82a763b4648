// Float -> e4m3 by the hardware conversion (cvt.rn.satfinite.e4m3x2.f32, sm_89+):
// round to nearest even, finite values saturated to +-448. For every float x it gives
// the bits of core::float_to_e4m3(clamp(x, -448, 448)), the reference cast
// (CudaE4m3.HardwareCastEqualsTheReferenceCast checks all 2^32 inputs); NaN inputs
// take the reference's code 0x7f (the hardware keeps their sign). And the way back:
// e4m3 pairs to floats (the hardware) or to scaled bf16 pairs (integer steps), and a
// NaN-code test, each checked against the reference over every code pair.
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

// The e4m3 codes in the low two bytes of `codes` (byte 0 -> .x) as floats, by the
// hardware (cvt.rn.f16x2.e4m3x2, sm_89+): every finite e4m3 value is exact in f16, so
// these are core::e4m3_to_float's values. NaN codes (low 7 bits set) give the
// hardware's NaN, not the reference's: callers that keep NaN bits test for them.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t codes) {
  float2 v;
  asm("{\n .reg .b16 c, lo, hi;\n .reg .b32 h;\n cvt.u16.u32 c, %2;\n cvt.rn.f16x2.e4m3x2 h, c;\n"
      " mov.b32 {lo, hi}, h;\n cvt.f32.f16 %0, lo;\n cvt.f32.f16 %1, hi;\n}\n"
      : "=f"(v.x), "=f"(v.y)
      : "r"(codes));
  return v;
}

// Two e4m3 codes of w (chosen by kSel) times a power of two, as a bf16 pair, by integer
// steps and one bf16 multiply (the ALU and FMA pipes, not the conversion unit): each
// byte sign-extended into its 16-bit half (prmt), shifted so the sign lands on bit 15
// and exponent + mantissa on bits 4..10, which reads as bf16 2^-120 x the e4m3 value
// (subnormals too, as bf16 subnormals), then times `factor` (a bf16 power of two in
// both halves). Exact wherever the product is a bf16 normal or zero. NaN codes (0x7f,
// 0xff) read as +-480 x 2^-120: callers that must keep them test first.
// kSel 0x9180: bytes 0, 1 of w (byte 0 -> the low half); 0xB3A2: bytes 2, 3.
template <uint32_t kSel>
__device__ __forceinline__ uint32_t e4m3x2_times_bf16x2(uint32_t w, uint32_t factor) {
  uint32_t v;
  asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(v) : "r"(w), "n"(kSel));
  v = (v << 4) & 0x87f087f0u;
  uint32_t out;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(out) : "r"(v), "r"(factor));
  return out;
}

// Whether any of the 4 codes in w is an e4m3 NaN (0x7f or 0xff).
__device__ __forceinline__ bool e4m3x4_has_nan(uint32_t w) { return (((w & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u) != 0; }

// Codes of a0..a3, byte i = value i.
__device__ __forceinline__ uint32_t e4m3x4_sat(float a0, float a1, float a2, float a3) {
  return e4m3x2_sat(a0, a1) | (e4m3x2_sat(a2, a3) << 16);
}

}  // namespace dsv4::ops
