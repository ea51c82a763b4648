#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"

namespace dsv4::core {
namespace {

TEST(Bf16, RoundsToNearestEven) {
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(float_to_bf16(1.0f + 0.00390625f), 0x3f80);
  // 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6 (even).
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0.00390625f), 0x3f82);
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_float(float_to_bf16(-2.5f)), -2.5f);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_EQ(bf16_to_float(float_to_bf16(INFINITY)), INFINITY);
}

TEST(E4m3, DecodesEveryCodeAndRoundTrips) {
  int finite = 0;
  for (int code = 0; code < 256; ++code) {
    const float v = e4m3_to_float(uint8_t(code));
    if ((code & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(v)) << code;
      continue;
    }
    ++finite;
    if (code == 0x80) continue;  // -0 encodes back as -0 (0x80) too
    EXPECT_EQ(float_to_e4m3(v), code) << "value " << v;
  }
  EXPECT_EQ(finite, 254);
  EXPECT_EQ(e4m3_to_float(0x7e), 448.0f);     // largest finite
  EXPECT_EQ(e4m3_to_float(0x01), 0.001953125f);  // smallest subnormal, 2^-9
  EXPECT_EQ(e4m3_to_float(0x08), 0.015625f);     // smallest normal, 2^-6
}

TEST(E4m3, RoundsToNearestEvenAndSaturates) {
  // Between 1.0 (m=0) and 1.125 (m=1): the midpoint goes to the even code 1.0.
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1.0625f)), 1.0f);
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1.1875f)), 1.25f);  // between 1.125 (odd) and 1.25 (even)
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1.07f)), 1.125f);
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(1000.0f)), 448.0f);
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(-1000.0f)), -448.0f);
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(0.0009765625f)), 0.0f);  // 2^-10: tie between 0 and 2^-9 -> 0
  EXPECT_EQ(e4m3_to_float(float_to_e4m3(15.5f)), 16.0f);           // 15 (odd) vs 16 (even)
}

TEST(E2m1, TableAndTiesToEvenCode) {
  const float mags[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  for (int c = 0; c < 16; ++c) EXPECT_EQ(e2m1_to_float(uint8_t(c)), (c & 8 ? -1.0f : 1.0f) * mags[c & 7]);
  for (int c = 0; c < 8; ++c) EXPECT_EQ(float_to_e2m1(mags[c]) & 7, c);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(0.25f)), 0.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(0.75f)), 1.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(1.25f)), 1.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(1.75f)), 2.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(2.5f)), 2.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(3.5f)), 4.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(5.0f)), 4.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(5.01f)), 6.0f);
  EXPECT_EQ(e2m1_to_float(float_to_e2m1(-2.9f)), -3.0f);
}

TEST(Ue8m0, CeilLog2FromBitsAndDecode) {
  EXPECT_EQ(ceil_log2_bits(1.0f), 0);
  EXPECT_EQ(ceil_log2_bits(1.0000001f), 1);
  EXPECT_EQ(ceil_log2_bits(0.5f), -1);
  EXPECT_EQ(ceil_log2_bits(3.0f), 2);
  EXPECT_EQ(ceil_log2_bits(0.75f), 0);
  EXPECT_EQ(e8m0_to_float(127), 1.0f);
  EXPECT_EQ(e8m0_to_float(130), 8.0f);
  EXPECT_EQ(e8m0_to_float(120), 1.0f / 128);
  EXPECT_TRUE(std::isnan(e8m0_to_float(255)));
  for (int b = 0; b < 255; ++b)  // every finite code, 0 the subnormal 2^-127
    EXPECT_EQ(e8m0_to_float(uint8_t(b)), std::ldexp(1.0f, b - 127)) << "code " << b;
  EXPECT_EQ(pow2_float(-126), std::ldexp(1.0f, -126));
}

}  // namespace
}  // namespace dsv4::core
