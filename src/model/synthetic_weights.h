// Synthetic ("random but sane") weights: scaled Gaussians quantized exactly as a
// real checkpoint stores them, so every scale path is exercised. Element values
// are pure functions of (seed, tensor name, index) (core/random.h), so the disk
// writer, the CPU builder and the GPU builder produce the same weights.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "core/random.h"
#include "core/synthetic_values.h"
#include "model/weight_spec.h"

namespace dsv4::model {

// CPU generation of a tensor, or of a row range of it, into host memory.
// For an FP8/FP4 weight, `scale_out` receives the rows of its paired scale that
// cover the generated weight rows (FP8: row blocks of 128; rows must be aligned).
void fill_normal(const TensorSpec& spec, uint64_t seed, int64_t begin, int64_t count, void* out);
void fill_fp8_rows(const TensorSpec& weight, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out);
void fill_fp4_rows(const TensorSpec& weight, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out);
void fill_expert_ids(const TensorSpec& spec, uint64_t seed, int64_t num_experts, int64_t row_begin, int64_t row_count,
                     int64_t* out);

}  // namespace dsv4::model
