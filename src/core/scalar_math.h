// Scalar functions whose bits both backends must agree on: the CPU reference and
// the CUDA kernels call these very definitions, so exp, sigmoid, SiLU and softplus
// give the same fp32 result on either side (the host's expf and the device's expf
// are different approximations; both within an ulp or so, rarely equal on ties of
// a later argmax or quantization step).
#pragma once

#include <cmath>

#include "core/dtype.h"

namespace dsv4::core {

// exp of an fp32 value computed in double and rounded to fp32: a correctly rounded
// expf except in double-rounding cases (~2^-29 of inputs). glibc's and CUDA's double
// exp are each within an ulp of double, so the fp32 results agree except there too.
DSV4_HD float exp_f32_via_f64(float x) { return float(exp(double(x))); }

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

// x * sigmoid(x), computed as x / (1 + exp(-x)).
DSV4_HD float silu_f32(float x) { return div_rn(x, add_rn(1.0f, exp_f32_via_f64(-x))); }

// torch.nn.functional.softplus with its default threshold of 20: log(1 + e^x) in
// double, rounded once to fp32.
DSV4_HD float softplus_f32(float x) { return x > 20.0f ? x : float(log1p(exp(double(x)))); }

}  // namespace dsv4::core
