// core/scalar_math.h: the functions both backends share.
#include "core/scalar_math.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

namespace dsv4::core {
namespace {

// Distance in units in the last place between two finite floats of one sign class.
int64_t ulps(float a, float b) {
  const auto key = [](float x) {
    const int32_t i = int32_t(float_bits(x));
    return i < 0 ? int64_t(INT32_MIN) - int64_t(i) : int64_t(i);  // monotone over all floats
  };
  return std::llabs(key(a) - key(b));
}

// The portable fp32 exp against exp in double rounded once, over a dense sweep of
// its range (results 2^-125 .. 2^127) and random floats in it.
TEST(ExpPortable, WithinOneUlpOfExpEverywhere) {
  int64_t worst = 0;
  float worst_x = 0.0f;
  const auto check = [&](float x) {
    const float want = exp_f32_via_f64(x), got = exp_f32_portable(x);
    ASSERT_TRUE(std::isfinite(got)) << x;
    const int64_t d = ulps(got, want);
    if (d > worst) worst = d, worst_x = x;
  };
  for (float x = -86.64f; x < 88.02f; x += 1.0f / 4096.0f) check(x);
  std::mt19937 gen(1);
  std::uniform_real_distribution<float> dist(-86.64f, 88.02f);
  for (int i = 0; i < 2000000; ++i) check(dist(gen));
  for (float x = -1e-3f; x < 1e-3f; x += 1e-7f) check(x);  // around 1
  EXPECT_LE(worst, 1) << "worst at x = " << worst_x;
  std::printf("exp_f32_portable: worst %lld ulp (x = %a)\n", (long long)worst, worst_x);
}

TEST(ExpPortable, SpecialValuesAndRangeEnds) {
  EXPECT_EQ(exp_f32_portable(0.0f), 1.0f);
  EXPECT_EQ(exp_f32_portable(-0.0f), 1.0f);
  EXPECT_EQ(exp_f32_portable(-INFINITY), 0.0f);
  EXPECT_EQ(exp_f32_portable(INFINITY), INFINITY);
  EXPECT_TRUE(std::isnan(exp_f32_portable(NAN)));
  EXPECT_EQ(exp_f32_portable(88.1f), INFINITY);   // above 2^127: inf
  EXPECT_GT(exp_f32_portable(88.0f), 1.6e38f);    // just below, finite
  EXPECT_EQ(exp_f32_portable(-86.7f), 0.0f);      // below 2^-125: 0, no subnormal results
  EXPECT_GE(exp_f32_portable(-86.6f), std::numeric_limits<float>::min());
  EXPECT_LT(exp_f32_portable(-86.6f), 4.0f * std::numeric_limits<float>::min());
}

// The synthetic weights' Box-Muller draw evaluates log on u1 = 1 - k 2^-24 and
// cos(2 pi u2) on u2 = k 2^-24: every one of those 2^24 inputs, against double.
TEST(LogCosPortable, AccurateOnEverySyntheticUniform) {
  int64_t worst_log = 0;
  double worst_cos = 0;
  for (uint32_t k = 0; k < (1u << 24); ++k) {
    const float u1 = 1.0f - float(k) * (1.0f / 16777216.0f), u2 = float(k) * (1.0f / 16777216.0f);
    worst_log = std::max(worst_log, ulps(log_f32_portable(u1), float(std::log(double(u1)))));
    worst_cos = std::max(worst_cos, std::fabs(double(cos_2pi_portable(u2)) -
                                              std::cos(6.283185307179586476925 * double(u2))));
  }
  std::printf("log_f32_portable worst %lld ulp, cos_2pi_portable worst absolute error %.2e\n",
              (long long)worst_log, worst_cos);
  EXPECT_LE(worst_log, 2);
  EXPECT_LT(worst_cos, 2e-7);  // fp32 spacing near 1 is 6e-8
}

TEST(LogCosPortable, SpecialValuesAndQuadrants) {
  EXPECT_EQ(log_f32_portable(1.0f), 0.0f);
  EXPECT_EQ(log_f32_portable(0.0f), -INFINITY);
  EXPECT_TRUE(std::isnan(log_f32_portable(-1.0f)));
  EXPECT_TRUE(std::isnan(log_f32_portable(NAN)));
  EXPECT_EQ(log_f32_portable(INFINITY), INFINITY);
  EXPECT_NEAR(log_f32_portable(1e-40f), std::log(1e-40), 1e-5);  // subnormal input
  EXPECT_NEAR(log_f32_portable(3.0e38f), std::log(3.0e38), 1e-5);
  EXPECT_EQ(cos_2pi_portable(0.0f), 1.0f);
  EXPECT_EQ(cos_2pi_portable(0.5f), -1.0f);
  EXPECT_EQ(cos_2pi_portable(0.25f), -0.0f);  // -sin(0)
  for (float u : {-1.3f, -0.6f, 0.1f, 0.37f, 0.62f, 0.9f, 2.7f})
    EXPECT_NEAR(cos_2pi_portable(u), std::cos(6.283185307179586476925 * u), 2e-7) << u;
}

// softplus (the sqrtsoftplus router's score) and log1p from fp32 operations, against
// double: a dense sweep of the router's range and of log1p's.
TEST(SoftplusPortable, WithinFewUlpOfDouble) {
  int64_t worst_sp = 0, worst_l1p = 0;
  for (float x = -86.0f; x <= 25.0f; x += 1.0f / 8192.0f) {
    const float want = x > 20.0f ? x : float(std::log1p(std::exp(double(x))));
    worst_sp = std::max(worst_sp, ulps(softplus_f32(x), want));
  }
  for (float y = -0.999f; y < 0.0f; y += 1e-5f) worst_l1p = std::max(worst_l1p, ulps(log1p_f32_portable(y), float(std::log1p(double(y)))));
  for (float y = 1e-30f; y < 1e30f; y *= 1.001f) worst_l1p = std::max(worst_l1p, ulps(log1p_f32_portable(y), float(std::log1p(double(y)))));
  std::printf("softplus_f32 worst %lld ulp, log1p_f32_portable worst %lld ulp\n", (long long)worst_sp, (long long)worst_l1p);
  EXPECT_LE(worst_sp, 4);
  EXPECT_LE(worst_l1p, 3);
  EXPECT_EQ(softplus_f32(30.0f), 30.0f);
  EXPECT_EQ(softplus_f32(-100.0f), 0.0f);  // exp underflows to 0 below -86.6 (true value < 1e-43)
  EXPECT_EQ(log1p_f32_portable(0.0f), 0.0f);
}

TEST(ScalarMath, ClampKeepsNanAndSiluUsesThePortableExp) {
  EXPECT_TRUE(std::isnan(clamp_f32(NAN, -448.0f, 448.0f)));
  EXPECT_EQ(clamp_f32(500.0f, -448.0f, 448.0f), 448.0f);
  EXPECT_EQ(clamp_f32(-500.0f, -448.0f, 448.0f), -448.0f);
  for (float x : {-20.0f, -1.5f, 0.0f, 0.75f, 3.0f, 30.0f})
    EXPECT_EQ(float_bits(silu_f32(x)), float_bits(x / (1.0f + exp_f32_portable(-x)))) << x;
  EXPECT_NEAR(silu_f32(1.0f), 1.0 / (1.0 + std::exp(-1.0)), 1e-7);
}

}  // namespace
}  // namespace dsv4::core
