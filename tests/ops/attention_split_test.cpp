// The CUDA sparse attention's split of a row's key segments over CTAs
// (ops/cuda/attention_split.h), on the CPU: the shapes bench-1g runs, and over a grid
// of shapes that the choice is the cheapest split with the fewest CTAs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

TEST(AttentionSplit, LeadFoldBench1gShapes) {
  // A CSA row of 10 segments: 64 rows take 2 CTAs a row, the lead CTA 6 segments
  // (no stores), the other 4 (5 partials instead of 10); 16 rows take 5 CTAs of 2.
  EXPECT_EQ(attention_split_lead_segs(10, 2), 6);
  EXPECT_EQ(attention_split_lead_partials(10, 2), 5);
  EXPECT_EQ(attention_split_lead_segs(10, 5), 2);
  EXPECT_EQ(attention_split_lead_partials(10, 5), 9);
  EXPECT_EQ(attention_split_lead_segs(10, 10), 1);  // a segment a CTA: a partial a segment, as before
  EXPECT_EQ(attention_split_lead_partials(10, 10), 10);
  EXPECT_EQ(attention_split_lead_partials(1, 4), 1);
  EXPECT_EQ(attention_split_lead_partials(0, 4), 0);  // no keys: the combine's pad row
  EXPECT_EQ(attention_split_lead_segs(7, 1), 7);
}

// Every segment has one owner (the lead CTA's [0, k), then CTA j > 0 the segments
// k + j - 1 + i (n - 1)), the lead CTA at least one; the balance is the cheapest
// max(5 k, 6 r); and a row's partials never exceed those of a longer row, so that the
// longest row sizes the buffer.
TEST(AttentionSplit, LeadFoldCoversEverySegmentOnce) {
  for (int64_t n = 2; n <= 24; ++n) {
    int prev_partials = 0;
    for (int64_t segs = 1; segs <= 64; ++segs) {
      const int k = attention_split_lead_segs(segs, n);
      ASSERT_GE(k, 1);
      ASSERT_LE(k, segs);
      std::vector<int> owners(size_t(segs), 0);
      for (int64_t s = 0; s < k; ++s) owners[size_t(s)] += 1;
      int64_t busiest = 0;
      for (int64_t j = 1; j < n; ++j) {
        int64_t mine = 0;
        for (int64_t s = k + j - 1; s < segs; s += n - 1) owners[size_t(s)] += 1, mine += 1;
        busiest = std::max(busiest, mine);
      }
      for (int64_t s = 0; s < segs; ++s) ASSERT_EQ(owners[size_t(s)], 1) << "n " << n << " segs " << segs << " seg " << s;
      const int64_t cost = std::max<int64_t>(5 * k, 6 * busiest);
      for (int64_t other = 1; other <= segs; ++other) {
        const int64_t rest = (segs - other + n - 2) / (n - 1);
        ASSERT_GE(std::max<int64_t>(5 * other, 6 * rest), cost) << "n " << n << " segs " << segs << " k " << other;
      }
      const int partials = attention_split_lead_partials(segs, n);
      ASSERT_EQ(partials, 1 + segs - k);
      ASSERT_GE(partials, prev_partials) << "n " << n << " segs " << segs;
      prev_partials = partials;
    }
  }
}

// The pair form's choice at bench-1g's shapes (SWA 2, HCA 3, CSA 10 segments a row at
// context 4096), each side at the split the launcher would take (no partial cap).
bool pair_pays(int64_t rows, int64_t segs, int64_t sms = kH200Sms) {
  const auto split = [&](int64_t row_ctas) {
    return row_ctas >= sms || segs <= 1 ? int64_t(1) : int64_t(attention_split_ctas(row_ctas, segs, sms));
  };
  return attention_pair_pays(rows, segs, sms, split(rows), split(2 * rows));
}

TEST(AttentionSplit, PairBench1gShapes) {
  for (int64_t segs : {2, 3, 10}) EXPECT_TRUE(pair_pays(1, segs)) << segs;  // batch 1: a segment a cluster
  EXPECT_TRUE(pair_pays(16, 2));    // SWA: 32 clusters of 1 segment against 32 CTAs of 1
  EXPECT_TRUE(pair_pays(16, 3));    // HCA: 48 clusters of 1 against 48 CTAs of 1
  EXPECT_FALSE(pair_pays(16, 10));  // CSA: 4 clusters of 3 segments a row against 5 CTAs of 2
  for (int64_t segs : {2, 3, 10}) EXPECT_TRUE(pair_pays(64, segs)) << segs;  // no split, no combine
  for (int64_t segs : {2, 3, 10}) {
    EXPECT_FALSE(pair_pays(96, segs)) << segs;   // 192 clusters' CTAs: two waves against one
    EXPECT_FALSE(pair_pays(256, segs)) << segs;  // ~4 waves against 2
  }
}

TEST(AttentionSplit, PairNeverWalksMoreSegmentsUnlessItDropsTheSplit) {
  for (int64_t sms : {78, 114, 132})
    for (int64_t rows = 1; rows <= 2 * sms; ++rows)
      for (int64_t segs = 1; segs <= 24; ++segs) {
        const auto split = [&](int64_t row_ctas) {
          return row_ctas >= sms || segs <= 1 ? int64_t(1) : int64_t(attention_split_ctas(row_ctas, segs, sms));
        };
        const int64_t n_one = split(rows), n_pair = split(2 * rows);
        if (!attention_pair_pays(rows, segs, sms, n_one, n_pair)) continue;
        const int64_t one = attention_split_cost(rows, segs, sms, n_one);
        const int64_t pair = attention_split_cost(2 * rows, segs, sms, n_pair);
        if (pair > one) {  // only where one CTA a row would split and the pair fits one wave unsplit
          ASSERT_EQ(n_pair, 1) << rows << " " << segs << " " << sms;
          ASSERT_GT(n_one, 1) << rows << " " << segs << " " << sms;
          ASSERT_LE(2 * rows, sms) << rows << " " << segs << " " << sms;
        }
      }
}

}  // namespace
}  // namespace dsv4::ops
