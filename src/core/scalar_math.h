// Scalar functions whose bits both backends must agree on: the CPU reference and
// the CUDA kernels call these very definitions, so exp, sigmoid, SiLU, softplus and
// clamp give the same fp32 result on either side. (The host's and the device's expf
// are different approximations, each within about an ulp; a last-bit difference can
// flip a later bf16 rounding, FP8 quantization step or argmax.) No a * b + c appears
// outside an explicit fmaf, so neither compiler can contract differently.
#pragma once

#include <cmath>

#include "core/dtype.h"

namespace dsv4::core {

// exp of an fp32 value computed in double and rounded to fp32: a correctly rounded
// expf except in double-rounding cases (~2^-29 of inputs). glibc's and CUDA's double
// exp are each within an ulp of double, so the fp32 results agree except there too.
DSV4_HD float exp_f32_via_f64(float x) { return float(exp(double(x))); }

// 2^e for e in [-126, 127], from the exponent bits.
DSV4_HD float exp2i_f32(int e) { return bits_float(uint32_t(e + 127) << 23); }

// exp(x) from IEEE fp32 operations alone (explicit fmaf, multiplies, one add, rintf
// and exponent bits), so the host and the GPU compute the same bits at fp32 speed,
// where exp_f32_via_f64 costs a double-precision exp (half-rate or slower units).
// Cody-Waite reduction x = n ln2 + r with ln2 in two parts, then Cephes' expf
// minimax polynomial (S. Moshier, Cephes Math Library: C1 = 0.693359375,
// C2 = -2.12194440e-4, the six coefficients below), then 2^n applied as two exact
// power-of-two factors so that subnormal results round once. Within 1 ulp of exp
// for every fp32 input (checked exhaustively against exp in double rounded once:
// 0.8% of the inputs in range are 1 ulp off; tests/core samples it). For the hot
// loops of the tensor-core attention and the SwiGLU; NaN stays NaN, -inf gives 0.
DSV4_HD float exp_f32_portable(float x) {
  if (!(x > -104.0f)) return x != x ? x : 0.0f;  // below -103.98 exp rounds to 0
  if (x > 88.72283935546875f) return INFINITY;   // above ln(FLT_MAX)
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, x);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float y = fmaf(p, r * r, r) + 1.0f;
  const int e = int(n), e1 = e / 2;
  return (y * exp2i_f32(e1)) * exp2i_f32(e - e1);
}

// IEEE fp32 add and divide, rounded to nearest, also under nvcc's fast-math flags.
DSV4_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DSV4_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// std::clamp(x, lo, hi) as the CPU reference calls it: NaN stays NaN (fminf/fmaxf
// would turn it into a bound).
DSV4_HD float clamp_f32(float x, float lo, float hi) { return x < lo ? lo : (hi < x ? hi : x); }

// 1 / (1 + exp(-x)).
DSV4_HD float sigmoid_f32(float x) { return div_rn(1.0f, add_rn(1.0f, exp_f32_via_f64(-x))); }

// x * sigmoid(x), computed as x / (1 + exp(-x)) with the portable fp32 exp (the
// routed experts' SwiGLU evaluates it per intermediate value).
DSV4_HD float silu_f32(float x) { return div_rn(x, add_rn(1.0f, exp_f32_portable(-x))); }

// torch.nn.functional.softplus with its default threshold of 20: log(1 + e^x) in
// double, rounded once to fp32.
DSV4_HD float softplus_f32(float x) { return x > 20.0f ? x : float(log1p(exp(double(x)))); }

}  // namespace dsv4::core
