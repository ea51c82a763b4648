// The router's top k by rank (router_select_row's router_topk_by_rank), as two passes
// whose items a block's threads share out with a barrier between them. Host and device
// code: tests/ops/topk_rank_test.cpp runs the passes on the CPU against the reference's
// partial_sort (ties, infinities, signed zeros, short chunks, k up to 32).
//
// The order is the CPU reference's (ops/cpu/cpu_moe.cpp): value descending, then index
// ascending, a total order where no value is NaN. Pass one ranks each value among the 32
// of its chunk (values 32c .. 32c + 31); those of rank < k are the chunk's candidates,
// kept in slot c * k + rank. Pass two ranks each candidate among all candidates (a warp a
// candidate, its lanes sharing the slots: topk_rank_count_ahead): where
// that rank is below k it is the value's rank among all values (everything ahead of a
// top-k value is a candidate too: its rank in its chunk is at most its overall rank), and
// otherwise the value is not in the top k (the top k are all candidates and all ahead of
// it). So a thread makes at most 32 comparisons in pass one and a lane (chunks * k) / 32 a
// candidate in pass two, instead of a sequential selection's k dependent rounds over all
// values.
#pragma once

#include "core/dtype.h"

namespace dsv4::ops {

// Whether value j is ahead of value i in the order (no NaN).
DSV4_HD bool topk_rank_ahead(float vj, int j, float vi, int i) { return vj > vi || (vj == vi && j < i); }

// Chunks of 32 values and candidate slots (chunks * k) for n values.
DSV4_HD int topk_rank_chunks(int n) { return (n + 31) / 32; }
DSV4_HD int topk_rank_slots(int n, int k) { return topk_rank_chunks(n) * k; }

// Pass one, value i: its rank in its chunk; a candidate goes to cand[chunk * k + rank]. A
// short last chunk (fewer than k values) leaves slots no value takes: its last value marks
// them -1, so pass two needs no count of a chunk's values.
DSV4_HD void topk_rank_chunk_pass(const float* v, int n, int k, int i, int* cand) {
  const float vi = v[i];
  const int c0 = i / 32 * 32, c1 = n < c0 + 32 ? n : c0 + 32;
  int rank = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll 8
#endif
  for (int j = c0; j < c1; ++j) rank += topk_rank_ahead(v[j], j, vi, i);
  if (rank < k) cand[(i / 32) * k + rank] = i;
  if (i == c1 - 1)
    for (int r = c1 - c0; r < k; ++r) cand[(i / 32) * k + r] = -1;
}

// Pass two's share of one lane (of `lanes`): how many candidates among slots lane,
// lane + lanes, ... are ahead of candidate i (value vi). A candidate's rank among all
// candidates is the sum over the lanes; where it is below k, it is the value's rank among all
// values (see above). Slots marked -1 count nothing.
DSV4_HD int topk_rank_count_ahead(const float* v, int slots, const int* cand, float vi, int i, int lane, int lanes) {
  int ahead = 0;
  for (int t = lane; t < slots; t += lanes) {
    const int j = cand[t];
    ahead += j >= 0 && topk_rank_ahead(v[j], j, vi, i);
  }
  return ahead;
}

}  // namespace dsv4::ops
