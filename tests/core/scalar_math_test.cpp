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
// the whole finite range (results from subnormal to FLT_MAX) and random floats.
TEST(ExpPortable, WithinOneUlpOfExpEverywhere) {
  int64_t worst = 0;
  float worst_x = 0.0f;
  const auto check = [&](float x) {
    const float want = exp_f32_via_f64(x), got = exp_f32_portable(x);
    ASSERT_TRUE(std::isfinite(got) || !std::isfinite(want)) << x;
    const int64_t d = ulps(got, want);
    if (d > worst) worst = d, worst_x = x;
  };
  for (float x = -103.9f; x < 88.72f; x += 1.0f / 4096.0f) check(x);
  std::mt19937 gen(1);
  std::uniform_real_distribution<float> dist(-104.0f, 88.7f);
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
  EXPECT_EQ(exp_f32_portable(89.0f), INFINITY);
  EXPECT_EQ(exp_f32_portable(-105.0f), 0.0f);
  EXPECT_GT(exp_f32_portable(88.72f), 3.0e38f);  // near FLT_MAX, finite
  EXPECT_GT(exp_f32_portable(-103.0f), 0.0f);    // a subnormal
  EXPECT_LT(exp_f32_portable(-103.0f), std::numeric_limits<float>::min());
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
