// How many CTAs the CUDA sparse attention spreads a row's key segments over when the
// rows alone would not fill the SMs (docs/design/cuda-attention.md, "Key segments").
// Host code, tested on the CPU (tests/ops/attention_split_test.cpp). The choice never
// changes a bit: every split folds the segments in the same order.
#pragma once

#include <cstdint>

namespace dsv4::ops {

// row_ctas CTAs take one split of every row (tokens x head groups), one CTA an SM.
// Split n then costs ceil(row_ctas n / SMs) waves of ceil(segs / n) segments each,
// one after another; the cheapest n wins, the fewest CTAs among equals. Filling the
// SMs by ceil(SMs / row_ctas) instead gave 16 rows of 10 segments 9 CTAs each: 144
// CTAs, a second wave of 12 behind 132 (ncu, docs/BENCHMARKS.md, twenty-fourth session).
constexpr int64_t attention_split_cost(int64_t row_ctas, int64_t segs, int64_t num_sms, int64_t n) {
  return (row_ctas * n + num_sms - 1) / num_sms * ((segs + n - 1) / n);
}

constexpr int attention_split_ctas(int64_t row_ctas, int64_t segs, int64_t num_sms) {
  int64_t best = 1, best_cost = attention_split_cost(row_ctas, segs, num_sms, 1);
  for (int64_t n = 2; n <= segs; ++n) {
    const int64_t cost = attention_split_cost(row_ctas, segs, num_sms, n);
    if (cost < best_cost) best = n, best_cost = cost;
  }
  return int(best);
}

}  // namespace dsv4::ops
