// Helpers for op tests: random tensors from a printed seed, bf16 conversions,
// a hand-built batch view.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "model/synthetic_weights.h"
#include "model/weight_spec.h"
#include "ops/batch.h"
#include "ops/gemm_order.h"
#include "ops/token_choice.h"
#include "ops/weights.h"
#include "test_util.h"

namespace dsv4::testing {

// For tests whose small shapes reach a split path (fold launch, cluster fold, last-CTA
// fold, the fused experts' walked slices) through one-stage K slices: the floor of one
// stage a slice (ops/gemm_order.h) for both backends while it lives; the default floor
// of two would halve their S and take other paths.
struct OneStageSlices {
  OneStageSlices() { ops::gemm_force_min_slice_stages(1); }
  ~OneStageSlices() { ops::gemm_force_min_slice_stages(0); }
  OneStageSlices(const OneStageSlices&) = delete;
  OneStageSlices& operator=(const OneStageSlices&) = delete;
};

class Rng {
 public:
  explicit Rng(uint64_t salt) : gen_(test_seed() ^ (salt * 0x9e3779b97f4a7c15ull)) {}
  float normal(float std = 1.0f) { return std::normal_distribution<float>(0.0f, std)(gen_); }
  int64_t uniform_int(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen_); }
  // bf16 tensor of N(0, std) values.
  core::Tensor bf16(std::initializer_list<int64_t> shape, float std = 1.0f) {
    core::Tensor t = core::Tensor::empty_cpu(core::DType::kBF16, shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.as<uint16_t>()[i] = core::float_to_bf16(normal(std));
    return t;
  }
  core::Tensor f32(std::initializer_list<int64_t> shape, float std = 1.0f, float mean = 0.0f) {
    core::Tensor t = core::Tensor::empty_cpu(core::DType::kF32, shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.as<float>()[i] = mean + normal(std);
    return t;
  }

 private:
  std::mt19937_64 gen_;
};

inline float bf(const core::Tensor& t, int64_t i) { return core::bf16_to_float(t.as<uint16_t>()[i]); }

// Poisons a tensor so unwritten outputs show up.
inline void poison(const core::Tensor& t) { std::memset(t.data(), 0x7f, t.nbytes()); }

// The host arrays behind a BatchView, and the view of them.
struct BatchArrays {
  std::vector<int32_t> token_ids, positions, token_seq, seq_begin, seq_len, seq_start, seq_slot, block_table;
  int32_t max_blocks = 1;
  ops::BatchView view() const {
    ops::BatchView v;
    v.num_tokens = int32_t(positions.size());
    v.num_seqs = int32_t(seq_begin.size());
    v.max_blocks = max_blocks;
    for (int32_t l : seq_len) v.max_seq_len = std::max(v.max_seq_len, l);  // (as the step builder sets it)
    v.token_ids = token_ids.data();
    v.positions = positions.data();
    v.token_seq = token_seq.data();
    v.seq_begin = seq_begin.data();
    v.seq_len = seq_len.data();
    v.seq_start_pos = seq_start.data();
    v.seq_slot = seq_slot.data();
    v.block_table = block_table.data();
    return v;
  }
  int64_t rows() const { return int64_t(positions.size()); }
};

// A batch of sequences with given (slot, start, length), rows in order, pages
// 0.. assigned to sequence s as s * pages_per_seq + b.
struct HostBatch : BatchArrays {
  HostBatch(const std::vector<std::array<int32_t, 3>>& seqs, int32_t pages_per_seq) {
    max_blocks = pages_per_seq;
    for (size_t s = 0; s < seqs.size(); ++s) {
      auto [slot, start, len] = seqs[s];
      seq_begin.push_back(int32_t(positions.size()));
      seq_len.push_back(len);
      seq_start.push_back(start);
      seq_slot.push_back(slot);
      for (int32_t i = 0; i < len; ++i) {
        token_ids.push_back(int32_t((start + i) * 7 % 1000));
        positions.push_back(start + i);
        token_seq.push_back(int32_t(s));
      }
      for (int32_t b = 0; b < pages_per_seq; ++b) block_table.push_back(int32_t(s) * pages_per_seq + b);
    }
  }
};

// A host weight [n, k] in FP8 (128x128 block scales) or FP4 (per-32 scales) with
// make-checkpoint's synthetic values; `name` and `seed` pick the values.
inline ops::QuantLinear synthetic_quant(const std::string& name, int64_t n, int64_t k, bool fp4, uint64_t seed) {
  model::TensorSpec s;
  s.name = name + std::to_string(seed);
  s.logical_n = n;
  s.logical_k = k;
  s.std = 1.0f / std::sqrt(float(std::max<int64_t>(k, 1)));
  ops::QuantLinear q;
  q.n = n;
  q.k = k;
  if (fp4) {
    q.format = ops::QuantLinear::Format::kFp4Group32;
    q.weight = core::Tensor::empty_cpu(core::DType::kI8, {n, k / 2});
    q.scale = core::Tensor::empty_cpu(core::DType::kF8E8M0, {n, k / 32});
    if (n > 0 && k > 0) model::fill_fp4_rows(s, seed, 0, n, q.weight.as<uint8_t>(), q.scale.as<uint8_t>());
  } else {
    q.format = ops::QuantLinear::Format::kFp8Block128;
    q.weight = core::Tensor::empty_cpu(core::DType::kF8E4M3, {n, k});
    q.scale = core::Tensor::empty_cpu(core::DType::kF8E8M0, {(n + 127) / 128, (k + 127) / 128});
    if (n > 0 && k > 0) model::fill_fp8_rows(s, seed, 0, n, q.weight.as<uint8_t>(), q.scale.as<uint8_t>());
  }
  return q;
}

// Logits rows and token choices on which the rules of the token-choice law
// (ops/token_choice.h) decide: row r by r mod 10 (N(0, 3); logits on a coarse grid, so that
// top_k and top_p cut through ties; NaNs and a repeated maximum; all equal, +0 and -0; +inf
// twice; NaNs and -infs only; -infs among normals; one logit far above the rest, most weights
// 0; a near-flat row, where top_p keeps most of the vocabulary; magnitudes near the float
// limit, where logit - max overflows), and choice r with a temperature, top_k and top_p from
// lists of the edges (greedy, a temperature whose reciprocal overflows, an infinite one; k of
// 1, V - 1, V and more; p tiny and near 1), a random seed and position.
struct TokenChoiceCase {
  core::Tensor logits;                     // f32 [R, V]
  std::vector<ops::TokenChoice> choices;   // R
};

// Backend::token_logprobs' records, got against want, for the rows whose choice asks: every
// field bit for bit (NaN logits included), the alternatives up to the count.
inline void expect_logprob_records_equal(const ops::TokenLogprobRecord* got, const ops::TokenLogprobRecord* want,
                                         const std::vector<ops::TokenChoice>& choices, const std::string& what) {
  const auto bits = [](float x) { return core::float_bits(x); };
  for (size_t r = 0; r < choices.size(); ++r) {
    if (choices[r].logprobs < 0) continue;
    const ops::TokenLogprobRecord &g = got[r], &w = want[r];
    SCOPED_TRACE(::testing::Message() << what << " row " << r << " asking " << choices[r].logprobs);
    EXPECT_EQ(bits(g.max_logit), bits(w.max_logit));
    EXPECT_EQ(g.z1, w.z1);
    EXPECT_EQ(g.token, w.token);
    EXPECT_EQ(bits(g.token_logit), bits(w.token_logit));
    ASSERT_EQ(g.count, w.count);
    for (int32_t j = 0; j < w.count; ++j) {
      EXPECT_EQ(g.ids[j], w.ids[j]) << "alternative " << j;
      EXPECT_EQ(bits(g.logits[j]), bits(w.logits[j])) << "alternative " << j;
    }
  }
}

inline TokenChoiceCase token_choice_case(Rng& rng, int64_t R, int64_t V) {
  TokenChoiceCase c;
  c.logits = core::Tensor::empty_cpu(core::DType::kF32, {R, V});
  for (int64_t r = 0; r < R; ++r) {
    float* x = c.logits.as<float>() + r * V;
    const auto any = [&] { return rng.uniform_int(0, V - 1); };
    for (int64_t i = 0; i < V; ++i) x[i] = rng.normal(3.0f);
    switch (r % 10) {
      case 1: for (int64_t i = 0; i < V; ++i) x[i] = float(rng.uniform_int(-20, 20)) / 4.0f; break;
      case 2:
        for (int64_t i = 0; i < V; ++i) x[i] = rng.uniform_int(0, 19) == 0 ? NAN : x[i];
        x[any()] = 12.0f, x[any()] = 12.0f;
        break;
      case 3: for (int64_t i = 0; i < V; ++i) x[i] = i % 2 ? 0.0f : -0.0f; break;
      case 4: x[any()] = INFINITY, x[any()] = INFINITY; break;
      case 5: for (int64_t i = 0; i < V; ++i) x[i] = i % 3 ? -INFINITY : NAN; break;
      case 6: for (int64_t i = 0; i < V; ++i) x[i] = rng.uniform_int(0, 2) == 0 ? -INFINITY : x[i]; break;
      case 7: x[any()] = 100.0f; break;
      case 8: for (int64_t i = 0; i < V; ++i) x[i] = rng.normal(0.01f); break;
      case 9: for (int64_t i = 0; i < V; ++i) x[i] = (i % 2 ? 3e38f : -3e38f) * float(rng.uniform_int(1, 9)) / 9.0f; break;
      default: break;
    }
  }
  const float temperatures[] = {0.0f, 0.3f, 0.7f, 1.0f, 1.0f, 1.5f, 1e-39f, INFINITY};
  const int64_t top_ks[] = {0, 0, 0, 1, 2, 40, V - 1, V, V + 5};
  const float top_ps[] = {1.0f, 1.0f, 0.9f, 0.5f, 1e-6f, 0.999f, 0.95f};
  for (int64_t r = 0; r < R; ++r) {
    ops::TokenChoice t;
    t.temperature = temperatures[rng.uniform_int(0, 7)];
    t.top_k = int32_t(top_ks[rng.uniform_int(0, 8)]);
    t.top_p = top_ps[rng.uniform_int(0, 6)];
    t.seed = uint64_t(rng.uniform_int(0, INT64_MAX));
    t.position = rng.uniform_int(0, 1 << 20);
    const int32_t logprobs[] = {-1, -1, 0, 1, 5, ops::kMaxTokenLogprobs, ops::kMaxTokenLogprobs + 9};
    t.logprobs = logprobs[rng.uniform_int(0, 6)];
    if (rng.uniform_int(0, 5) == 0) t.given_token = int32_t(rng.uniform_int(0, V - 1));  // a scored row
    const float min_ps[] = {0.0f, 0.0f, 0.0f, 1e-9f, 0.05f, 0.3f, 1.0f};
    t.min_p = min_ps[rng.uniform_int(0, 6)];
    c.choices.push_back(t);
  }
  return c;
}

}  // namespace dsv4::testing
