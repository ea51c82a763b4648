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

// exp(x) from IEEE fp32 operations alone (explicit fmaf, multiplies, adds, rintf
// and exponent bits), so the host and the GPU compute the same bits at fp32 speed,
// where exp_f32_via_f64 costs a double-precision exp (half-rate or slower units).
// exp(x) = 2^t with t = x log2(e) = n + f, |f| <= 1/2: t is rounded once, and the
// product's rounding error (an fmaf, exact) and log2(e)'s low part go back into f,
// then Cephes' exp2f minimax polynomial (S. Moshier, Cephes Math Library: the six
// coefficients below) and n added to the exponent bits. About 20 operations (the
// device's expf is ~4-8, the Cody-Waite version this replaced ~26: the tensor-core
// attention evaluates one per score). Within 1 ulp of exp for x in [-86.6, 88.0]
// (results 2^-125 .. 2^127; tests/core sweeps the range); below it 0 (no
// subnormal results), above it inf, NaN stays NaN.
// Branch-free (the range ends are selects after the polynomial): the attention
// evaluates 16 independent exps per thread and chunk, and early returns made nvcc
// emit branches around each (~100 more PTX branches in the kernel). With this and
// one decode fix the kernel went from 1871 to 1781 us a step at batch 256 (ncu,
// H200; docs/BENCHMARKS.md, tenth session).
DSV4_HD float exp_f32_portable(float x) {
  const float t = x * 1.44269504088896341f;
  const float n = rintf(fminf(fmaxf(t, -125.0f), 127.0f));  // finite also for NaN / inf (fmaxf drops a NaN)
  // t's rounding error and log2(e)'s low part back into f (NaN for infinite x: replaced below).
  const float f = (t - n) + fmaf(x, 1.925963033500011e-8f, fmaf(x, 1.44269504088896341f, -t));
  float p = 1.535336188319500e-4f;
  p = fmaf(p, f, 1.339887440266574e-3f);
  p = fmaf(p, f, 9.618437357674640e-3f);
  p = fmaf(p, f, 5.550332471162809e-2f);
  p = fmaf(p, f, 2.402264791363012e-1f);
  p = fmaf(p, f, 6.931472028550421e-1f);
  p = fmaf(p, f, 1.0f);                                                // 2^f in [0.70, 1.42] in range
  float y = bits_float(float_bits(p) + (uint32_t(int32_t(n)) << 23));  // biased exponent stays in 1 .. 254
  y = t < -125.0f ? 0.0f : y;
  y = t > 127.0f ? INFINITY : y;
  return t != t ? t : y;
}

// log(x) from IEEE fp32 operations alone, for the synthetic weights' Box-Muller
// draw, which the CPU generator and the GPU builders must produce bit for bit (the
// host's logf and the device's are different approximations). x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), f = m - 1 (exact), Cephes' logf minimax polynomial in f
// (S. Moshier, Cephes Math Library: the nine coefficients below, ln2 split as
// 0.693359375 - 2.12194440e-4), every multiply-add an explicit fmaf. Within 2 ulp
// of log on the synthetic uniforms' grid (tests/core checks all 2^24 of them).
// Subnormals are scaled up first; 0 gives -inf, negatives and NaN give NaN.
DSV4_HD float log_f32_portable(float x) {
  if (!(x > 0.0f)) return x == 0.0f ? -INFINITY : (x - x) / (x - x);
  if (x == INFINITY) return x;
  int e = 0;
  if (x < 1.17549435e-38f) x *= 8388608.0f, e = -23;  // 2^23: subnormal to normal, exact
  const uint32_t b = float_bits(x);
  e += int(b >> 23) - 127;
  float m = bits_float((b & 0x7fffffu) | 0x3f800000u);  // [1, 2)
  if (m > 1.41421356f) m *= 0.5f, ++e;
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = fmaf(p, f, -1.1514610310e-1f);
  p = fmaf(p, f, 1.1676998740e-1f);
  p = fmaf(p, f, -1.2420140846e-1f);
  p = fmaf(p, f, 1.4249322787e-1f);
  p = fmaf(p, f, -1.6668057665e-1f);
  p = fmaf(p, f, 2.0000714765e-1f);
  p = fmaf(p, f, -2.4999993993e-1f);
  p = fmaf(p, f, 3.3333331174e-1f);
  const float ef = float(e);
  float y = (p * f) * z;
  y = fmaf(ef, -2.12194440e-4f, y);
  y = fmaf(-0.5f, z, y);
  return fmaf(ef, 0.693359375f, f + y);
}

// cos(2 pi u) from IEEE fp32 operations alone (see log_f32_portable for why).
// u = n/4 + r with |r| <= 1/8 (both steps exact for |u| < 2^21), theta = 2 pi r
// rounded once, then Cephes' sinf / cosf polynomials on [-pi/4, pi/4] (S. Moshier)
// picked and signed by the quadrant n mod 4. Within a few 1e-8 of cos(2 pi u).
DSV4_HD float cos_2pi_portable(float u) {
  const float n = rintf(u * 4.0f);
  const float r = fmaf(n, -0.25f, u);  // exact
  const float t = r * 6.28318530717958648f, z = t * t;
  const float s = fmaf(fmaf(fmaf(-1.9515295891e-4f, z, 8.3321608736e-3f), z, -1.6666654611e-1f) * z, t, t);
  const float c = fmaf(fmaf(fmaf(2.443315711809948e-5f, z, -1.388731625493765e-3f), z, 4.166664568298827e-2f) * z, z,
                       fmaf(-0.5f, z, 1.0f));
  switch (int(fmaf(-4.0f, floorf(n * 0.25f), n))) {  // n mod 4, also for negative n
    case 0: return c;
    case 1: return -s;
    case 2: return -c;
    default: return s;
  }
}

// IEEE fp32 square root, rounded to nearest, also under nvcc's fast-math flags.
DSV4_HD float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// IEEE fp32 add, subtract, multiply and divide, rounded to nearest, also under nvcc's
// fast-math flags, and never fused into an fma by nvcc (host sources that need the same
// build with -ffp-contract=off).
DSV4_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DSV4_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DSV4_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
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

// log(1 + y) for y > -1 from the portable log: u = 1 + y rounded, then
// log(u) * y / (u - 1), which cancels u's rounding error (Goldberg, "What every
// computer scientist should know about floating-point arithmetic", thm. 4); y itself
// where u rounds to 1. Within a few ulp.
DSV4_HD float log1p_f32_portable(float y) {
  const float u = add_rn(1.0f, y);
  const float r = log_f32_portable(u) * div_rn(y, u - 1.0f);
  return u == 1.0f ? y : r;
}

// torch.nn.functional.softplus with its default threshold of 20: log1p(exp(x)) from
// the portable fp32 exp and log1p, within a few ulp. (Until the tenth session: in
// double, rounded once; a double exp and log1p per expert made the router kernel
// ~2.4 us a launch slower than the device's fp32 functions, ncu on the H200.)
DSV4_HD float softplus_f32(float x) { return x > 20.0f ? x : log1p_f32_portable(exp_f32_portable(x)); }

}  // namespace dsv4::core
