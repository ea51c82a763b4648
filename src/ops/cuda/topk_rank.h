// The router's top k by rank (router_select_row's router_topk_by_rank), as two passes
// whose items a block's threads share out with a barrier between them. Host and device
// code: tests/ops/topk_rank_test.cpp runs the passes on the CPU against the reference's
// partial_sort (ties, infinities, signed zeros, short chunks, k up to 32).
//
// The order is the CPU reference's (ops/cpu/cpu_moe.cpp): value descending, then index
// ascending, a total order where no value is NaN. Pass one ranks each value among the 32
// of its chunk (values 32c .. 32c + 31); those of rank < k are the chunk's candidates,
// kept in slot c * k + rank. Pass two ranks each candidate among all candidates: where
// that rank is below k it is the value's rank among all values (everything ahead of a
// top-k value is a candidate too: its rank in its chunk is at most its overall rank), and
// otherwise the value is not in the top k (the top k are all candidates and all ahead of
// it). So a thread makes at most 32 + chunks * k comparisons instead of a sequential
// selection's k dependent rounds over all values.
#pragma once

#include "core/dtype.h"

namespace dsv4::ops {

// Whether value j is ahead of value i in the order (no NaN).
DSV4_HD bool topk_rank_ahead(float vj, int j, float vi, int i) { return vj > vi || (vj == vi && j < i); }

// Chunks of 32 values and candidate slots (chunks * k) for n values.
DSV4_HD int topk_rank_chunks(int n) { return (n + 31) / 32; }
DSV4_HD int topk_rank_slots(int n, int k) { return topk_rank_chunks(n) * k; }
// Whether candidate slot `slot` is filled: a short last chunk fills fewer than k.
DSV4_HD bool topk_rank_slot_used(int n, int k, int slot) {
  const int left = n - 32 * (slot / k);
  return slot % k < (left < 32 ? left : 32);
}

// Pass one, value i: its rank in its chunk; a candidate goes to cand[chunk * k + rank].
DSV4_HD void topk_rank_chunk_pass(const float* v, int n, int k, int i, int* cand) {
  const float vi = v[i];
  const int c0 = i / 32 * 32, c1 = n < c0 + 32 ? n : c0 + 32;
  int rank = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll 8
#endif
  for (int j = c0; j < c1; ++j) rank += topk_rank_ahead(v[j], j, vi, i);
  if (rank < k) cand[(i / 32) * k + rank] = i;
}

// Pass two, candidate slot `slot` (after every pass-one item): ids[rank] = its value's index
// where its rank among the candidates is below k.
DSV4_HD void topk_rank_candidate_pass(const float* v, int n, int k, int slot, const int* cand, int* ids) {
  if (!topk_rank_slot_used(n, k, slot)) return;
  const int i = cand[slot];
  const float vi = v[i];
  int rank = 0;
  const int slots = topk_rank_slots(n, k);
  for (int t = 0; t < slots; ++t)
    if (topk_rank_slot_used(n, k, t)) rank += topk_rank_ahead(v[cand[t]], cand[t], vi, i);
  if (rank < k) ids[rank] = i;
}

}  // namespace dsv4::ops
