// Spec §2 primitives against closed-form or hand-computed values.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "ops/backend.h"
#include "ops/cpu/primitives.h"

namespace dsv4::ops {
namespace {

using core::bf16_to_float;
using core::float_to_bf16;

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out;
  for (float x : v) out.push_back(float_to_bf16(x));
  return out;
}

TEST(Rope, PlainFrequencies) {
  auto f = rope_inv_freq(64, 10000.0, false, 0, 0, 0, 0);
  ASSERT_EQ(f.size(), 32u);
  EXPECT_EQ(f[0], 1.0f);
  for (int i = 0; i < 32; ++i) EXPECT_NEAR(f[size_t(i)], std::pow(10000.0, -2.0 * i / 64), 1e-6 * f[size_t(i)] + 1e-12);
}

TEST(Rope, YarnRampBetweenPairs15And25) {
  // Spec §2.2: for base 160000, factor 16, original 65536: lo = 15, hi = 25.
  auto plain = rope_inv_freq(64, 160000.0, false, 0, 0, 0, 0);
  auto yarn = rope_inv_freq(64, 160000.0, true, 16.0, 65536, 32, 1);
  for (int i = 0; i <= 15; ++i) EXPECT_FLOAT_EQ(yarn[size_t(i)], plain[size_t(i)]) << i;
  for (int i = 25; i < 32; ++i) EXPECT_FLOAT_EQ(yarn[size_t(i)], plain[size_t(i)] / 16.0f) << i;
  for (int i = 16; i < 25; ++i) {
    const double ramp = (i - 15) / 10.0;
    EXPECT_NEAR(yarn[size_t(i)], plain[size_t(i)] * ((1 - ramp) + ramp / 16), 1e-6 * plain[size_t(i)]) << i;
  }
}

TEST(Rope, RotatesInterleavedPairsAndInverts) {
  // Pairs are (2i, 2i+1) of the slice (GPT-J style), not rotate_half (spec §12.1).
  std::vector<float> inv = {1.0f, 0.5f};
  auto v = to_bf16({1.0f, 0.0f, 0.0f, 1.0f});
  ref::rope_bf16(v.data(), 2, inv.data(), 1, false);
  EXPECT_EQ(bf16_to_float(v[0]), core::round_bf16(std::cos(1.0f)));
  EXPECT_EQ(bf16_to_float(v[1]), core::round_bf16(std::sin(1.0f)));
  EXPECT_EQ(bf16_to_float(v[2]), core::round_bf16(-std::sin(0.5f)));
  EXPECT_EQ(bf16_to_float(v[3]), core::round_bf16(std::cos(0.5f)));
  ref::rope_bf16(v.data(), 2, inv.data(), 1, true);
  EXPECT_NEAR(bf16_to_float(v[0]), 1.0f, 1e-2);
  EXPECT_NEAR(bf16_to_float(v[1]), 0.0f, 1e-2);
  EXPECT_NEAR(bf16_to_float(v[3]), 1.0f, 1e-2);
}

TEST(ActQuant, Ue8m0ScaleRoundsUp) {
  // amax 1.0: 1/448 -> ceil(log2) = -8, scale 2^-8 (round-to-nearest would give 2^-9).
  std::vector<float> x(128, 0.0f);
  x[0] = 1.0f;
  x[1] = 0.3f;
  x[2] = -0.0009f;
  EXPECT_EQ(ref::fp8_block_exponent(x.data(), 128), -8);
  std::vector<uint8_t> q(128);
  int e = 0;
  ref::act_quant_fp8(x.data(), 128, 128, q.data(), &e);
  EXPECT_EQ(e, -8);
  EXPECT_EQ(core::e4m3_to_float(q[0]), 256.0f);
  EXPECT_EQ(core::e4m3_to_float(q[1]), 80.0f);  // 76.8 -> e4m3 grid step 8 in [64,128)
  EXPECT_EQ(core::e4m3_to_float(q[2]), -0.234375f);  // -0.2304 -> nearest e4m3 (2^-3 * 1.875)
  // amax floor 1e-4: an all-zero block still gets a finite scale.
  std::vector<float> z(128, 0.0f);
  EXPECT_EQ(ref::fp8_block_exponent(z.data(), 128), core::ceil_log2_bits(1e-4f * (1.0f / 448.0f)));
}

TEST(ActQuant, Fp8SimulationInPlace) {
  std::vector<float> vals(64, 0.0f);
  vals[0] = 1.0f;
  vals[1] = 0.3f;
  vals[5] = -0.7f;
  auto v = to_bf16(vals);
  ref::fp8_sim_bf16(v.data(), 64, 64);
  EXPECT_EQ(bf16_to_float(v[0]), 1.0f);
  EXPECT_EQ(bf16_to_float(v[1]), 0.3125f);
  EXPECT_EQ(bf16_to_float(v[5]), -0.6875f);  // -179.2/256 -> -176/256
}

TEST(ActQuant, Fp4SimulationInPlace) {
  std::vector<float> vals(32, 0.0f);
  vals[0] = 6.0f;   // amax 6: scale 2^ceil(log2(1)) = 1
  vals[1] = 2.6f;   // -> 3
  vals[2] = -0.3f;  // -> -0.5
  vals[3] = 0.2f;   // -> 0
  auto v = to_bf16(vals);
  ref::fp4_sim_bf16(v.data(), 32, 32);
  EXPECT_EQ(bf16_to_float(v[0]), 6.0f);
  EXPECT_EQ(bf16_to_float(v[1]), 3.0f);
  EXPECT_EQ(bf16_to_float(v[2]), -0.5f);
  EXPECT_EQ(bf16_to_float(v[3]), 0.0f);
  vals[0] = 12.0f;  // scale 2: grid doubles
  v = to_bf16(vals);
  ref::fp4_sim_bf16(v.data(), 32, 32);
  EXPECT_EQ(bf16_to_float(v[0]), 12.0f);
  EXPECT_EQ(bf16_to_float(v[1]), 3.0f);  // 1.297 -> 1.5 on the grid, times 2
  EXPECT_EQ(bf16_to_float(v[2]), 0.0f);
}

TEST(Hadamard, SylvesterOrderAndNormalisation) {
  auto v = to_bf16({1.0f, 2.0f});
  ref::hadamard_bf16(v.data(), 2);
  EXPECT_EQ(bf16_to_float(v[0]), core::round_bf16(3.0f / std::sqrt(2.0f)));
  EXPECT_EQ(bf16_to_float(v[1]), core::round_bf16(-1.0f / std::sqrt(2.0f)));
  // H_4 row 1 is (1, -1, 1, -1): e_1 maps to column 1.
  auto w = to_bf16({0.0f, 1.0f, 0.0f, 0.0f});
  ref::hadamard_bf16(w.data(), 4);
  EXPECT_EQ(bf16_to_float(w[0]), 0.5f);
  EXPECT_EQ(bf16_to_float(w[1]), -0.5f);
  EXPECT_EQ(bf16_to_float(w[2]), 0.5f);
  EXPECT_EQ(bf16_to_float(w[3]), -0.5f);
  // Orthogonal and symmetric: applying it twice returns the input (to bf16 rounding).
  std::vector<float> x(128);
  for (int i = 0; i < 128; ++i) x[size_t(i)] = std::sin(0.37f * float(i));
  auto h = to_bf16(x);
  ref::hadamard_bf16(h.data(), 128);
  ref::hadamard_bf16(h.data(), 128);
  for (int i = 0; i < 128; ++i) EXPECT_NEAR(bf16_to_float(h[size_t(i)]), x[size_t(i)], 2e-2);
}

// The Q norm's sum runs in 32 interleaved partials then a pairwise tree (what a
// warp's butterfly computes), not left to right: 2^24 + 1 + 1 is 2^24 + 2 when
// the ones sit in lanes 1 and 3 (they meet first), 2^24 added left to right.
TEST(QNormSum, InterleavedPartialsThenPairwiseTree) {
  EXPECT_EQ(ref::sum_bf16_squares_lanes32(nullptr, 0), 0.0f);
  std::vector<float> x(64, 0.0f);
  x[0] = 4096.0f;  // square 2^24
  x[1] = 1.0f;
  x[3] = 1.0f;
  auto v = to_bf16(x);
  EXPECT_EQ(ref::sum_bf16_squares_lanes32(v.data(), 64), 16777218.0f);
  // Otherwise a sum of the bf16-rounded squares.
  for (int64_t n : {1, 31, 33, 512, 1000}) {
    std::vector<float> y(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) y[size_t(i)] = std::sin(0.71f * float(i) + 0.3f) * 3.0f;
    auto b = to_bf16(y);
    double want = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float a = bf16_to_float(b[size_t(i)]);
      want += double(core::round_bf16(a * a));
    }
    EXPECT_NEAR(ref::sum_bf16_squares_lanes32(b.data(), n), want, 1e-6 * want) << "n " << n;
  }
}

TEST(Sinkhorn, ReferenceOrderGivesDoublyStochastic) {
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 0.5f, 1.5f, 0.0f, 0.3f, -0.2f,
                               -2.0f, 0.7f, 1.1f, 0.4f, 0.9f, -0.6f, 0.2f, 1.8f};
  std::vector<float> c = logits;
  ref::sinkhorn(c.data(), 4, 20, 1e-6f);
  for (int j = 0; j < 4; ++j) {  // the last pass normalises columns
    float col = 0;
    for (int i = 0; i < 4; ++i) col += c[size_t(i * 4 + j)];
    EXPECT_NEAR(col, 1.0f, 1e-5);
  }
  for (int i = 0; i < 4; ++i) {
    float row = 0;
    for (int j = 0; j < 4; ++j) row += c[size_t(i * 4 + j)];
    EXPECT_NEAR(row, 1.0f, 1e-3);
  }
  // One pass = row softmax + eps, then one column normalisation.
  std::vector<float> one = logits;
  ref::sinkhorn(one.data(), 4, 1, 1e-6f);
  std::vector<double> s(16);
  for (int i = 0; i < 4; ++i) {
    double z = 0;
    for (int j = 0; j < 4; ++j) z += std::exp(double(logits[size_t(i * 4 + j)]));
    for (int j = 0; j < 4; ++j) s[size_t(i * 4 + j)] = std::exp(double(logits[size_t(i * 4 + j)])) / z + 1e-6;
  }
  for (int j = 0; j < 4; ++j) {
    double col = 0;
    for (int i = 0; i < 4; ++i) col += s[size_t(i * 4 + j)];
    for (int i = 0; i < 4; ++i) EXPECT_NEAR(one[size_t(i * 4 + j)], s[size_t(i * 4 + j)] / (col + 1e-6), 1e-6);
  }
}

TEST(Activations, SqrtSoftplusAndSilu) {
  EXPECT_NEAR(std::sqrt(ref::softplus(0.0f)), std::sqrt(std::log(2.0)), 1e-7);
  EXPECT_EQ(ref::softplus(25.0f), 25.0f);  // torch's threshold of 20
  EXPECT_NEAR(ref::silu(1.0f), 1.0 / (1.0 + std::exp(-1.0)), 1e-7);
}

}  // namespace
}  // namespace dsv4::ops
