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
  const int n = int(v.size()), slots = topk_rank_slots(n, k);
  std::vector<int> cand(size_t(slots), -7), ids(size_t(k), -7);
  for (int i = 0; i < n; ++i) topk_rank_chunk_pass(v.data(), n, k, i, cand.data());
  for (int s = 0; s < slots; ++s) {
    const int i = cand[size_t(s)];
    EXPECT_NE(i, -7) << "slot " << s << " of n " << n << " k " << k << " left unwritten";
    if (i < 0) continue;
    int rank = 0;  // (a warp's 32 lanes, summed)
    for (int lane = 0; lane < 32; ++lane)
      rank += topk_rank_count_ahead(v.data(), slots, cand.data(), v[size_t(i)], i, lane, 32);
    if (rank < k) {
      EXPECT_EQ(ids[size_t(rank)], -7) << "rank " << rank << " taken twice, n " << n << " k " << k;
      ids[size_t(rank)] = i;
    }
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

TEST(TopkRank, AShortLastChunkMarksTheSlotsItLeaves) {
  EXPECT_EQ(topk_rank_chunks(72), 3);
  EXPECT_EQ(topk_rank_slots(72, 6), 18);
  const auto cands = [](int n, int k) {
    std::vector<float> v(size_t(n), 1.0f);
    std::vector<int> cand(size_t(topk_rank_slots(n, k)), -7);
    for (int i = 0; i < n; ++i) topk_rank_chunk_pass(v.data(), n, k, i, cand.data());
    return cand;
  };
  const std::vector<int> c72 = cands(72, 12);  // chunk 2 holds 8 values: slots 24-31 theirs, 32-35 marked
  for (int s = 24; s < 32; ++s) EXPECT_EQ(c72[size_t(s)], 64 + s - 24) << "slot " << s;
  for (int s = 32; s < 36; ++s) EXPECT_EQ(c72[size_t(s)], -1) << "slot " << s;
  const std::vector<int> c40 = cands(40, 32);  // chunk 1 holds 8: slots 40-63 marked
  for (int s = 40; s < 64; ++s) EXPECT_EQ(c40[size_t(s)], -1) << "slot " << s;
  const std::vector<int> c72k6 = cands(72, 6);  // 8 values fill all 6 of chunk 2's slots
  for (int s = 12; s < 18; ++s) EXPECT_EQ(c72k6[size_t(s)], 64 + s - 12) << "slot " << s;
}

}  // namespace
}  // namespace dsv4::ops
