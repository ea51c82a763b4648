// The router's top k by rank (ops/cuda/topk_rank.h): its two passes run on the CPU as a
// block would run them (every pass-one item, then every pass-two item) against the CPU
// reference's partial_sort order (value descending, then index ascending), on random
// values with ties, infinities and signed zeros, at V4's expert counts and short chunks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "ops/cuda/topk_rank.h"

namespace dsv4::ops {
namespace {

std::vector<int> by_rank(const std::vector<float>& v, int k) {
  const int n = int(v.size());
  std::vector<int> cand(size_t(topk_rank_slots(n, k)), -7), ids(size_t(k), -7);
  for (int i = 0; i < n; ++i) topk_rank_chunk_pass(v.data(), n, k, i, cand.data());
  for (int s = 0; s < topk_rank_slots(n, k); ++s) {
    if (topk_rank_slot_used(n, k, s)) {
      EXPECT_NE(cand[size_t(s)], -7) << "slot " << s << " of n " << n << " k " << k;
    }
    topk_rank_candidate_pass(v.data(), n, k, s, cand.data(), ids.data());
  }
  return ids;
}

std::vector<int> by_partial_sort(const std::vector<float>& v, int k) {  // cpu_moe.cpp's order
  std::vector<int> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int a, int c) { return v[size_t(a)] != v[size_t(c)] ? v[size_t(a)] > v[size_t(c)] : a < c; });
  order.resize(size_t(k));
  return order;
}

TEST(TopkRank, EqualsThePartialSortOrder) {
  std::mt19937 gen(0x7a);
  int checked = 0;
  for (const int n : {1, 5, 16, 31, 32, 33, 40, 64, 72, 100, 256, 384}) {
    for (const int k : {1, 2, 6, 8, 13, 32}) {
      if (k > n) continue;
      for (int trial = 0; trial < 60; ++trial) {
        std::vector<float> v(static_cast<size_t>(n));
        const int style = trial % 4;
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        std::uniform_int_distribution<int> few(0, 3);
        for (float& x : v) {
          if (style == 0) x = u(gen);  // distinct (almost surely)
          if (style == 1) x = float(few(gen)) * 0.25f;  // many ties
          if (style == 2) x = few(gen) == 0 ? -INFINITY : few(gen) == 1 ? INFINITY : u(gen);
          if (style == 3) x = few(gen) < 2 ? (few(gen) < 2 ? 0.0f : -0.0f) : u(gen);  // zeros of both signs
        }
        ASSERT_EQ(by_rank(v, k), by_partial_sort(v, k)) << "n " << n << " k " << k << " trial " << trial;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 3000);
}

TEST(TopkRank, SlotsOfAShortLastChunk) {
  EXPECT_EQ(topk_rank_chunks(72), 3);
  EXPECT_EQ(topk_rank_slots(72, 6), 18);
  EXPECT_TRUE(topk_rank_slot_used(72, 6, 17));    // chunk 2 holds 8 values: 6 candidates
  EXPECT_TRUE(topk_rank_slot_used(72, 12, 31));   // chunk 2, slot 7 of 12
  EXPECT_FALSE(topk_rank_slot_used(72, 12, 32));  // chunk 2, slot 8 of 12: 8 values fill 0-7
  EXPECT_FALSE(topk_rank_slot_used(40, 32, 40));  // chunk 1 holds 8
}

}  // namespace
}  // namespace dsv4::ops
