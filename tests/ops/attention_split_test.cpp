// The CUDA sparse attention's split of a row's key segments over CTAs
// (ops/cuda/attention_split.h), on the CPU: the shapes bench-1g runs, and over a grid
// of shapes that the choice is the cheapest split with the fewest CTAs.
#include <gtest/gtest.h>

#include <cstdint>

#include "ops/cuda/attention_split.h"

namespace dsv4::ops {
namespace {

constexpr int64_t kH200Sms = 132;

TEST(AttentionSplit, Bench1gShapes) {
  // A CSA row at context 4096: 640 keys, 10 segments of 64.
  EXPECT_EQ(attention_split_ctas(4, 10, kH200Sms), 10);   // batch 1, 4 CTAs of 16 heads a row
  EXPECT_EQ(attention_split_ctas(16, 10, kH200Sms), 5);   // 80 CTAs of 2 segments, not 9 (144: two waves)
  EXPECT_EQ(attention_split_ctas(32, 10, kH200Sms), 4);   // 128 CTAs of 3 segments
  EXPECT_EQ(attention_split_ctas(64, 10, kH200Sms), 2);   // 128 CTAs of 5 segments
  EXPECT_EQ(attention_split_ctas(16, 3, kH200Sms), 3);    // HCA: 160 keys
  EXPECT_EQ(attention_split_ctas(16, 2, kH200Sms), 2);    // SWA: the 128-key window
  EXPECT_EQ(attention_split_ctas(16, 1, kH200Sms), 1);    // nothing to split
  EXPECT_EQ(attention_split_ctas(131, 10, kH200Sms), 1);  // a second CTA a row would start a second wave
}

TEST(AttentionSplit, CheapestWithFewestCtas) {
  for (int64_t sms : {78, 114, 132})
    for (int64_t row_ctas = 1; row_ctas < sms; ++row_ctas)
      for (int64_t segs = 1; segs <= 48; ++segs) {
        const int n = attention_split_ctas(row_ctas, segs, sms);
        ASSERT_GE(n, 1);
        ASSERT_LE(n, segs);
        const int64_t cost = attention_split_cost(row_ctas, segs, sms, n);
        // Never more segments one after another than one CTA a row walking them all.
        ASSERT_LE(cost, segs) << row_ctas << " " << segs << " " << sms;
        for (int64_t m = 1; m <= segs; ++m) {
          const int64_t other = attention_split_cost(row_ctas, segs, sms, m);
          ASSERT_TRUE(other > cost || (other == cost && m >= n))
              << "rows " << row_ctas << ", segments " << segs << ", SMs " << sms << ": n = " << n << " (cost " << cost
              << "), but n = " << m << " costs " << other;
        }
      }
}

}  // namespace
}  // namespace dsv4::ops
