// The indexer scoring's integer decode of e2m1 pairs (ops/cuda/e2m1_bf16.h) against the
// float product it replaces, bf16(e2m1 * e8m0), for every byte and every scale it takes.
#include <gtest/gtest.h>

#include <cstdint>

#include "core/dtype.h"
#include "ops/cuda/e2m1_bf16.h"

namespace dsv4::ops {
namespace {

uint16_t float_product_bits(uint32_t nibble, uint32_t e8m0) {
  return core::float_to_bf16(core::e2m1_to_float(uint8_t(nibble)) * core::e8m0_to_float(uint8_t(e8m0)));
}

TEST(E2m1Bf16, IntegerDecodeEqualsFloatProductOverItsRange) {
  int64_t checked = 0;
  for (uint32_t e = 0; e < 256; ++e) {
    if (!e2m1_scale_in_range(e)) continue;
    const uint32_t add = e2m1_scale_add(e);
    for (uint32_t byte = 0; byte < 256; ++byte) {
      const uint32_t got = e2m1_pair_scaled(e2m1_pair_bits(byte), add);
      const uint32_t want = uint32_t(float_product_bits(byte & 15u, e)) | uint32_t(float_product_bits(byte >> 4, e)) << 16;
      ASSERT_EQ(got, want) << "byte " << byte << " scale byte " << e;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 251 * 256);  // scale bytes 2..252
}

// The range is the widest the integer decode gets right: at the scale bytes just outside
// it some product is subnormal (1) or overflows (253), where the integer sum is wrong.
TEST(E2m1Bf16, RangeEndsWhereTheIntegerDecodeFails) {
  EXPECT_FALSE(e2m1_scale_in_range(0));
  EXPECT_FALSE(e2m1_scale_in_range(1));
  EXPECT_TRUE(e2m1_scale_in_range(2));
  EXPECT_TRUE(e2m1_scale_in_range(252));
  EXPECT_FALSE(e2m1_scale_in_range(253));
  EXPECT_FALSE(e2m1_scale_in_range(255));
  for (uint32_t e : {1u, 253u}) {
    int wrong = 0;
    for (uint32_t byte = 0; byte < 256; ++byte) {
      const uint32_t got = e2m1_pair_scaled(e2m1_pair_bits(byte), e2m1_scale_add(e));
      const uint32_t want = uint32_t(float_product_bits(byte & 15u, e)) | uint32_t(float_product_bits(byte >> 4, e)) << 16;
      wrong += got != want;
    }
    EXPECT_GT(wrong, 0) << "scale byte " << e;
  }
}

}  // namespace
}  // namespace dsv4::ops
