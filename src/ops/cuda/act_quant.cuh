// Activation quantization for the FP8 linears (spec §2.4): e4m3 codes per 128-wide
// block with a power-of-two (UE8M0) scale. Shared by act_quant_kernel (linear_kernels.cuh)
// and the kernels that quantize a linear's input as they form it (rms_norm_linear,
// hc_pre_norm_linear_pair in cuda_pointwise.cu), so that all give the same bits.
#pragma once

#include <cstdint>

#include "core/scalar_math.h"
#include "ops/cuda/e4m3_cast.cuh"

namespace dsv4::ops {

// UE8M0 exponent of an activation block (spec §2.4: amax floored at 1e-4, times fp32(1/448)).
__device__ __forceinline__ int act_exponent(float amax) {
  return core::ceil_log2_bits(fmaxf(amax, 1e-4f) * (1.0f / 448.0f));
}

// Against the software cast, the hardware one (e4m3_cast.cuh) made the step 1.0% /
// 1.1% faster at batch 1 / 256 on bench-1g (act_quant, swiglu_quant, moe_prep).
__device__ __forceinline__ uint32_t quant4_e4m3(const float (&v)[4], float inv) {
  return e4m3x4_sat(v[0] * inv, v[1] * inv, v[2] * inv, v[3] * inv);
}

// Quantizes chunk c (values 8c .. 8c+7, v) of a row whose 128-blocks are spread over
// half warps: lane l of a half warp holds chunk 16b + l of block b (a block-wide loop
// over chunks tid, tid + 256, ... does this). The block's amax is the max over its 16
// lanes (max is exact in any order), so codes and scale equal act_quant_item's.
// Codes go to q_row[8c ..] in element order, the scale to s_row[c / 16]. Every lane of
// the warp calls it (the shuffles take all 32); `live`: whether c is in the row, as
// one value for each half warp.
__device__ __forceinline__ void quant_chunk8(const float (&v)[8], bool live, int64_t c, uint8_t* q_row,
                                             float* s_row) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (!live) return;
  const int e = act_exponent(amax);
  const float inv = core::pow2_float(-e);
  const float lo[4] = {v[0], v[1], v[2], v[3]}, hi[4] = {v[4], v[5], v[6], v[7]};
  *reinterpret_cast<uint2*>(q_row + 8 * c) = make_uint2(quant4_e4m3(lo, inv), quant4_e4m3(hi, inv));
  if (c % 16 == 0) s_row[c / 16] = core::pow2_float(e);
}

}  // namespace dsv4::ops
