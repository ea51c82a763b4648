// The CUDA routed experts' launch plan (ops/cuda/expert_plan.h), on the CPU: the
// decisions bench-1g's decode batches get on an H200 (the measured cases), and the
// list-tile bound against a brute force over every way the pairs can fall.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/cuda/expert_plan.h"

namespace dsv4::ops {
namespace {

constexpr int64_t kH200Sms = 132;
constexpr int64_t kFusedSlotsH200 = 4 * kH200Sms;  // expert_ffn_fused_kernel: 4 CTAs an SM (registers, smem)
constexpr int64_t kWeightTiles = 32;               // bench-1g's gate/up and down GEMMs (ncu: grids of 32 x list tiles)
constexpr int64_t kExperts = 256, kTopK = 6, kTileRows = 8;

int64_t bench_tiles(int64_t rows) { return expert_max_tiles(rows * kTopK, kExperts, kTileRows); }

TEST(ExpertPlan, Bench1gSplitOnlyAtOneRow) {
  EXPECT_EQ(bench_tiles(1), 6);
  EXPECT_EQ(bench_tiles(2), 12);
  EXPECT_TRUE(expert_split_k(kWeightTiles, bench_tiles(1), kH200Sms));   // 192 CTAs: split measured 3.3% faster
  EXPECT_FALSE(expert_split_k(kWeightTiles, bench_tiles(2), kH200Sms));  // 384 CTAs: walking measured 4.8% faster
  for (int64_t rows = 2; rows <= 256; ++rows) EXPECT_FALSE(expert_split_k(kWeightTiles, bench_tiles(rows), kH200Sms));
}

TEST(ExpertPlan, Bench1gFusedFromThreeToTwentyRows) {
  for (int64_t rows = 1; rows <= 256; ++rows) {
    const bool want = rows >= 3 && rows <= 20;
    EXPECT_EQ(fused_experts_auto(rows, kWeightTiles * bench_tiles(rows), kFusedSlotsH200), want) << rows << " rows";
  }
  // 2 rows: 384 gate/up CTAs leave 144 of the 528 slots to down CTAs that would wait.
  EXPECT_LT(kWeightTiles * bench_tiles(2), kFusedSlotsH200);
  EXPECT_GE(kWeightTiles * bench_tiles(3), kFusedSlotsH200);
}

// expert_max_tiles is at least the most list tiles any routing can need: the maximum of
// sum_e ceil(count_e / bm) over every way of giving the pairs to at most num_local
// experts (a dynamic program over the pairs left and the experts left), and at most one
// tile a pair.
TEST(ExpertPlan, MaxTilesBoundsEveryRouting) {
  constexpr int64_t kMaxPairs = 64;
  for (int64_t bm : {8, 16, 32})
    for (int64_t num_local : {1, 2, 3, 7, 16, 40}) {
      // most[n][e]: the most tiles n pairs can make on at most e experts.
      std::vector<std::vector<int64_t>> most(kMaxPairs + 1, std::vector<int64_t>(num_local + 1, 0));
      for (int64_t n = 1; n <= kMaxPairs; ++n)
        for (int64_t e = 1; e <= num_local; ++e)
          for (int64_t c = 1; c <= n; ++c) most[n][e] = std::max(most[n][e], (c + bm - 1) / bm + most[n - c][e - 1]);
      for (int64_t pairs = 0; pairs <= kMaxPairs; ++pairs) {
        const int64_t bound = expert_max_tiles(pairs, num_local, bm);
        EXPECT_GE(bound, most[pairs][num_local]) << "pairs " << pairs << ", experts " << num_local << ", bm " << bm;
        EXPECT_LE(bound, pairs);
      }
    }
}

}  // namespace
}  // namespace dsv4::ops
