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

// The lead fold (the wgmma kernel's split): the row's first CTA walks segments
// [0, k) as one CTA a row does, folding in registers, and leaves that state as the
// row's first partial; the other nsplit - 1 CTAs take segments k, k + 1, ... in turn,
// a partial each. attention_combine_kernel folds the partials in order from an empty
// state, and folding a state into the empty one gives it back bit for bit (weights 0
// and exp(0) = 1), so the bits are those of one CTA a row whatever k and nsplit are;
// only the partials shrink (a CSA row of 10 segments at 64 rows: 5 instead of 10).
// A CTA that leaves a partial per segment spends about a sixth of its time storing them
// (ncu, docs/BENCHMARKS.md, twenty-fourth session), so k minimizes max(5 k, 6 r) for
// the r segments of the busiest other CTA; ties go to the larger k (fewer partials).
constexpr int attention_split_lead_segs(int64_t segs, int64_t nsplit) {
  if (segs <= 0) return 0;
  if (nsplit <= 1) return int(segs);
  int64_t best = 1, best_cost = -1;
  for (int64_t k = 1; k <= segs; ++k) {
    const int64_t rest = (segs - k + nsplit - 2) / (nsplit - 1);
    const int64_t cost = 5 * k > 6 * rest ? 5 * k : 6 * rest;
    if (best_cost < 0 || cost <= best_cost) best = k, best_cost = cost;
  }
  return int(best);
}

// The partials a row of segs segments leaves under the lead fold: the lead CTA's
// state and one per later segment (0 for a row without keys).
constexpr int attention_split_lead_partials(int64_t segs, int64_t nsplit) {
  return segs <= 0 ? 0 : int(1 + segs - attention_split_lead_segs(segs, nsplit));
}

// The wgmma kernel's pair form (a row's dims over a cluster of two CTAs: a cluster a
// split of a row, each CTA half the decode, products and fold) against one CTA a split, for
// `rows` rows of `segs` segments split n_one (one CTA) or n_pair (clusters) ways: the pair
// where its busiest SM walks no more segments one after another (a pair's segment took
// 0.73-0.86x of one CTA's at 16-64 rows, bench-1g, H200; docs/design/cuda-attention.md,
// fifty-fourth session), or where it needs no split and so no partials and no combine while
// one CTA a row would split, in one wave (64 rows: a CSA layer 84 µs against 68 + 18 for
// the split and its combine). At 16 rows a CSA row's pair takes 4 clusters of 3 segments
// against 5 CTAs of 2 (31 µs against 27); at 256 rows the clusters take ~4 waves against 2.
constexpr bool attention_pair_pays(int64_t rows, int64_t segs, int64_t num_sms, int64_t n_one, int64_t n_pair) {
  const int64_t one = attention_split_cost(rows, segs, num_sms, n_one);
  const int64_t pair = attention_split_cost(2 * rows, segs, num_sms, n_pair);
  return pair <= one || (n_pair == 1 && n_one > 1 && 2 * rows <= num_sms);
}

}  // namespace dsv4::ops
