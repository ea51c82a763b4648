// The warp-specialised wide GEMM's grid when CTAs walk tiles (ops/cuda/wide_ws_grid.h),
// on the CPU: bench-1g's wide FP8 shapes, and over a grid of shapes that the busiest
// CTA walks as many tiles as with one CTA an SM, with the fewest CTAs that do.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>

#include "ops/cuda/wide_ws_grid.h"

namespace dsv4::ops {
namespace {

constexpr int64_t kSms = 132;

int64_t busiest(int64_t tiles, int64_t ctas) { return (tiles + ctas - 1) / ctas; }

TEST(WideWsGrid, Bench1gShapes) {
  EXPECT_EQ(wide_ws_walk_ctas(512, kSms), 128);  // wq_b at 256 rows: 256 column tiles x 2 row tiles
  EXPECT_EQ(wide_ws_walk_ctas(640, kSms), 128);  // wq_b with the indexer's q (CSA layers)
  EXPECT_EQ(wide_ws_walk_ctas(256, kSms), 128);  // wq_b at 128 rows
  EXPECT_EQ(wide_ws_walk_ctas(128, kSms), 128);  // wo_a, wo_b, the shared expert at 256 rows: one round
  EXPECT_EQ(wide_ws_walk_ctas(133, kSms), 67);   // one tile past an SM each: two rounds either way
  EXPECT_EQ(wide_ws_walk_ctas(512, kSms, false), 132);
  EXPECT_EQ(wide_ws_walk_ctas(7, 3), 3);  // the tests' cap: 3, 2 and 2 tiles
  EXPECT_EQ(wide_ws_walk_ctas(4, 3), 2);  // 2 and 2, not 2, 1 and 1
  EXPECT_EQ(wide_ws_walk_ctas(0, kSms), 1);
}

TEST(WideWsGrid, SameRoundsFewestCtas) {
  for (int64_t most : {1, 3, 78, 114, 132})
    for (int64_t tiles = 1; tiles <= 2000; ++tiles) {
      const int64_t ctas = wide_ws_walk_ctas(tiles, most);
      const int64_t sms_ctas = std::min(tiles, most);
      ASSERT_GE(ctas, 1);
      ASSERT_LE(ctas, sms_ctas) << tiles << " tiles, " << most << " SMs";
      ASSERT_EQ(busiest(tiles, ctas), busiest(tiles, sms_ctas)) << tiles << " tiles, " << most << " SMs";
      if (ctas > 1)
        ASSERT_GT(busiest(tiles, ctas - 1), busiest(tiles, sms_ctas))
            << tiles << " tiles, " << most << " SMs: " << ctas - 1 << " CTAs would do";
    }
}

}  // namespace
}  // namespace dsv4::ops
