#include "model/synthetic_weights.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace dsv4::model {

using core::DType;

void fill_normal(const TensorSpec& spec, uint64_t seed, int64_t begin, int64_t count, void* out) {
  const uint64_t stream = core::stream_id(spec.name);
  if (spec.dtype == DType::kBF16) {
    auto* p = static_cast<uint16_t*>(out);
    for (int64_t i = 0; i < count; ++i)
      p[i] = core::float_to_bf16(spec.mean + spec.std * core::random_normal(seed, stream, uint64_t(begin + i)));
  } else {
    DSV4_CHECK(spec.dtype == DType::kF32, "fill_normal on {} of dtype {}", spec.name, core::dtype_name(spec.dtype));
    auto* p = static_cast<float*>(out);
    for (int64_t i = 0; i < count; ++i)
      p[i] = spec.mean + spec.std * core::random_normal(seed, stream, uint64_t(begin + i));
  }
}

void fill_fp8_rows(const TensorSpec& w, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out) {
  const int64_t N = w.logical_n, K = w.logical_k, kb = (K + 127) / 128;
  DSV4_CHECK(row_begin % 128 == 0 && (row_count % 128 == 0 || row_begin + row_count == N),
             "FP8 rows of {} must be generated in blocks of 128", w.name);
  const uint64_t stream = core::stream_id(w.name);
  std::vector<float> block(128 * 128);
  for (int64_t n0 = row_begin; n0 < row_begin + row_count; n0 += 128) {
    const int64_t rows = std::min<int64_t>(128, N - n0);
    for (int64_t b = 0; b < kb; ++b) {
      const int64_t k0 = b * 128, cols = std::min<int64_t>(128, K - k0);
      float amax = 0.0f;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          float v = core::fp8_weight_value(seed, stream, w.std, K, n0 + r, k0 + c);
          block[size_t(r * 128 + c)] = v;
          amax = std::max(amax, std::fabs(v));
        }
      const int e = core::weight_scale_exponent(amax, 1.0f / 448.0f, 1e-4f);
      const float inv = core::pow2_float(-e);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          float q = std::clamp(block[size_t(r * 128 + c)] * inv, -448.0f, 448.0f);
          weight_out[(n0 - row_begin + r) * K + k0 + c] = core::float_to_e4m3(q);
        }
      scale_out[((n0 - row_begin) / 128) * kb + b] = core::e8m0_from_exponent(e);
    }
  }
}

void fill_fp4_rows(const TensorSpec& w, uint64_t seed, int64_t row_begin, int64_t row_count, uint8_t* weight_out,
                   uint8_t* scale_out) {
  const int64_t K = w.logical_k, groups = K / 32;
  const uint64_t stream = core::stream_id(w.name);
  float v[32];
  for (int64_t r = 0; r < row_count; ++r) {
    const int64_t n = row_begin + r;
    for (int64_t g = 0; g < groups; ++g) {
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) {
        v[i] = core::fp4_weight_value(seed, stream, w.std, K, n, g * 32 + i);
        amax = std::max(amax, std::fabs(v[i]));
      }
      const int e = core::weight_scale_exponent(amax, 1.0f / 6.0f, 6.0f * 1.1754943508222875e-38f);
      const float inv = core::pow2_float(-e);
      uint8_t* row = weight_out + r * (K / 2) + g * 16;
      for (int i = 0; i < 32; i += 2) {
        uint8_t lo = core::float_to_e2m1(std::clamp(v[i] * inv, -6.0f, 6.0f));
        uint8_t hi = core::float_to_e2m1(std::clamp(v[i + 1] * inv, -6.0f, 6.0f));
        row[i / 2] = uint8_t(lo | (hi << 4));  // low nibble = even element (spec §2.8)
      }
      scale_out[r * groups + g] = core::e8m0_from_exponent(e);
    }
  }
}

void fill_expert_ids(const TensorSpec& spec, uint64_t seed, int64_t num_experts, int64_t row_begin, int64_t row_count,
                     int64_t* out) {
  const uint64_t stream = core::stream_id(spec.name);
  const int64_t k = spec.shape[1];
  for (int64_t r = 0; r < row_count; ++r) core::expert_ids_row(seed, stream, row_begin + r, num_experts, k, out + r * k);
}

}  // namespace dsv4::model
