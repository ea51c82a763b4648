// The FP8 linears of cuda_linear.cu on activations another kernel has already
// quantized: the ops that form a linear's input (rms_norm_linear,
// hc_pre_norm_linear_pair in cuda_pointwise.cu) quantize it as they write it, one
// launch less on the layer's critical path at small batch.
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/weights.h"

namespace dsv4::ops {

// Activations quantized as linear's act_quant does (spec §2.4): e4m3 codes [M, K] in
// element order and the per-128 power-of-two scales [M, K/128].
struct QuantizedRows {
  uint8_t* codes = nullptr;
  float* scales = nullptr;
};

// True when linear (wb == nullptr) or linear_pair with these weights reads its
// activations in element order and from one quantization: FP8 weights, and for a
// pair the one stacked launch. Otherwise the caller runs the ops one after another.
bool linears_take_quantized_rows(const QuantLinear& wa, const QuantLinear* wb);

// The scratch linear and linear_pair quantize M x K activations into, on the current stream.
QuantizedRows linear_activation_scratch(CudaBackend& be, int64_t M, int64_t K);

// ya = linear(a, wa) (and yb = linear(a, wb)) with `a` already quantized: the GEMM
// launch(es) of linear / linear_pair, the same bits.
void linears_on_quantized_rows(CudaBackend& be, const QuantizedRows& a, int64_t M, const QuantLinear& wa,
                               const core::Tensor& ya, const QuantLinear* wb, const core::Tensor* yb);

}  // namespace dsv4::ops
