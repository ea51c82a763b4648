// GPU builders of synthetic weights: the values of model/synthetic_weights.h
// (core/synthetic_values.h math), drawn directly in device memory. Results are
// byte-identical to the CPU generator except where the device logf / cosf / exp2f
// round differently from the host libm (at most an ulp, so a rare bf16, e4m3 or
// e2m1 code differs). Kernels run on the backend's stream; nothing synchronises.
// No CUDA headers here: callers compile as plain C++.
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "ops/backend.h"

namespace dsv4::ops {
class CudaBackend;
}

namespace dsv4::ops::cuda_synthetic {

// out[i] = mean + std * N(0,1)[seed, stream_id, i], rounded to out's dtype (bf16 or f32).
void fill_normal(CudaBackend& backend, const core::Tensor& out, uint64_t seed, uint64_t stream_id, float mean,
                 float std);

// FP8 weight e4m3 [n, k] quantized per 128x128 block from core::fp8_weight_value;
// scale UE8M0 [ceil(n/128), ceil(k/128)]. role: kPlain (checkpoint order) or
// kGroupedFp8Weight (grouped_linear's weight, in ops/cuda/fp8_bf16_layout.h's order).
void fill_fp8_weight(CudaBackend& backend, const core::Tensor& weight, const core::Tensor& scale, int64_t n, int64_t k,
                     uint64_t seed, uint64_t stream_id, float std, TensorRole role = TensorRole::kPlain);

// FP4 weight e2m1 packed I8 [n, k/2] quantized per 32 along K from
// core::fp4_weight_value, stored in the CUDA backend's FP4 order (download gives the
// checkpoint's: low nibble = even k); scale UE8M0 [n, k/32]. k % 128 == 0.
void fill_fp4_weight(CudaBackend& backend, const core::Tensor& weight, const core::Tensor& scale, int64_t n, int64_t k,
                     uint64_t seed, uint64_t stream_id, float std);

// Hash-routing table i64 [V, k]: core::expert_ids_row for every row.
void fill_expert_ids(CudaBackend& backend, const core::Tensor& out, uint64_t seed, uint64_t stream_id,
                     int64_t num_experts);

}  // namespace dsv4::ops::cuda_synthetic
