// Element types of DeepSeek-V4 checkpoints and activations, and exact scalar
// conversions between them (spec §2.4, §2.5, §2.7, §2.8). Header-only so the CUDA
// kernels use the very same rounding code as the CPU reference (float_to_bf16: a
// hardware path on the GPU, checked against the integer one on every input).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#if defined(__CUDACC__)
#define DSV4_HD __host__ __device__ __forceinline__
#else
#define DSV4_HD inline
#endif

namespace dsv4::core {

enum class DType : uint8_t {
  kBF16,
  kF32,
  kI64,
  kI32,
  kI8,       // packed FP4 e2m1, two per byte, low nibble = even index (spec §2.8)
  kU8,
  kF8E4M3,   // float8_e4m3fn
  kF8E8M0,   // float8_e8m0fnu: value 2^(byte-127)
};

size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);              // safetensors spelling: "BF16", "F8_E4M3", ...
bool dtype_from_name(std::string_view name, DType* out);

DSV4_HD uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}
DSV4_HD float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// ---- bfloat16 -----------------------------------------------------------------
DSV4_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// Round to nearest even, NaN stays NaN (its sign and upper payload kept, quiet).
DSV4_HD uint16_t float_to_bf16_bits(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// float_to_bf16_bits' result. On the GPU the hardware's round-to-nearest-even
// conversion (F2FP), with the integer form's bits selected for NaNs, which the
// hardware makes canonical: ~5 instructions for the integer form's ~8, and kernels
// convert every value they write (-0.2 to -0.4% a decode step from 64 rows).
// CudaBf16.HardwareCastEqualsTheReferenceCast checks all 2^32 inputs.
DSV4_HD uint16_t float_to_bf16(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // (cvt to bf16: sm_80 on)
  // NaNs selected, not branched to: an isnan branch compiled to a branch (and its
  // convergence) at every conversion, more code than the integer form.
  uint16_t h;
  asm("{\n\t.reg .pred nan;\n\t.reg .b16 lo, hi, quiet, hw;\n\t"
      "cvt.rn.bf16.f32 hw, %1;\n\t"
      "testp.notanumber.f32 nan, %1;\n\t"
      "mov.b32 {lo, hi}, %2;\n\t"
      "or.b16 quiet, hi, 0x40;\n\t"
      "selp.b16 %0, quiet, hw, nan;\n\t}"
      : "=h"(h)
      : "f"(x), "r"(float_bits(x)));
  return h;
#else
  return float_to_bf16_bits(x);
#endif
}

DSV4_HD float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

// ---- power-of-two scales (UE8M0) -----------------------------------------------
// ceil(log2(x)) from the fp32 bits, as the reference kernels compute it:
// biased exponent - 127, plus one if any mantissa bit is set.
DSV4_HD int ceil_log2_bits(float x) {
  uint32_t u = float_bits(x);
  int exponent = int((u >> 23) & 0xff) - 127;
  return exponent + ((u & 0x7fffffu) != 0 ? 1 : 0);
}

DSV4_HD float pow2_float(int e) { return bits_float(uint32_t(e + 127) << 23); }  // e in [-126, 127]

// 0xff is NaN, 0 the subnormal 2^-127. Selects, not branches: the GEMM stage loops
// call it once a stage.
DSV4_HD float e8m0_to_float(uint8_t b) {
  const uint32_t bits = b == 0xff ? 0x7fc00000u : b == 0 ? 0x00400000u : uint32_t(b) << 23;
  return bits_float(bits);
}
DSV4_HD uint8_t e8m0_from_exponent(int e) { return uint8_t(e + 127); }

// ---- float8 e4m3fn --------------------------------------------------------------
DSV4_HD float e4m3_to_float(uint8_t b) {
  int sign = b >> 7, exp = (b >> 3) & 0xf, man = b & 7;
  float mag;
  if (exp == 15 && man == 7) {
    mag = NAN;
  } else if (exp == 0) {
    mag = float(man) * 0.001953125f;  // man * 2^-9
  } else {
    mag = (1.0f + float(man) * 0.125f) * pow2_float(exp - 7);
  }
  return sign ? -mag : mag;
}

// Round to nearest even; magnitudes above 448 saturate to 448 (callers clamp first,
// as the reference does before its cast).
DSV4_HD uint8_t float_to_e4m3(float x) {
  uint8_t sign = (float_bits(x) >> 24) & 0x80;
  float a = fabsf(x);
  if (!(a == a)) return 0x7f;
  if (a >= 448.0f) return sign | 0x7e;
  if (a < 0.015625f) {  // below 2^-6: subnormal grid of 2^-9
    int q = int(nearbyintf(a * 512.0f));
    return sign | uint8_t(q);  // q == 8 is the smallest normal, code 0x08
  }
  int e = int((float_bits(a) >> 23) & 0xff) - 127;
  float frac = a * pow2_float(-e) - 1.0f;  // exact: power-of-two scaling
  int m = int(nearbyintf(frac * 8.0f));
  if (m == 8) {
    m = 0;
    ++e;
  }
  uint32_t code = uint32_t((e + 7) << 3) | uint32_t(m);
  if (code > 0x7e) code = 0x7e;
  return sign | uint8_t(code);
}

// ---- float4 e2m1 (one nibble: sign bit 0x8 + 3-bit magnitude index) -------------
DSV4_HD float e2m1_to_float(uint8_t nibble) {
  const float kMag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  float m = kMag[nibble & 7];
  return (nibble & 8) ? -m : m;
}

// Round to nearest, ties to the even code (the hardware cvt rule).
DSV4_HD uint8_t float_to_e2m1(float x) {
  uint8_t sign = (float_bits(x) >> 31) ? 8 : 0;
  float a = fabsf(x);
  uint8_t code;
  if (a <= 0.25f) code = 0;
  else if (a < 0.75f) code = 1;
  else if (a <= 1.25f) code = 2;
  else if (a < 1.75f) code = 3;
  else if (a <= 2.5f) code = 4;
  else if (a < 3.5f) code = 5;
  else if (a <= 5.0f) code = 6;
  else code = 7;
  return sign | code;
}

}  // namespace dsv4::core
