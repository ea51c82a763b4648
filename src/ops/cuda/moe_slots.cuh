// The routed sum's order and arithmetic (spec §6.2), for every kernel that forms
// routed = moe_reduce(slot_out, ids): moe_reduce_kernel, the mHC mix's slot sums and the
// fused expert kernel's column sums. One copy, so all of them add in the same order and
// give the same bits.
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace dsv4::ops {

// A row's k slot ids (ids[0 .. k), any memory) sorted into order[0 .. n) by ascending
// expert id, equal ids in slot order, ids < 0 skipped (insertion sort, one thread);
// returns n.
__device__ __forceinline__ int moe_slot_order(const int32_t* ids, int k, int* order) {
  int n = 0;
  for (int s = 0; s < k; ++s) {
    const int32_t id = ids[s];
    if (id < 0) continue;
    int pos = n++;
    while (pos > 0 && ids[order[pos - 1]] > id) {  // strictly greater: equal ids keep slot order
      order[pos] = order[pos - 1];
      --pos;
    }
    order[pos] = s;
  }
  return n;
}

// VEC (1 or 8; 8: 16-byte aligned) columns of row t's routed sum from slot_out [T, k, D]
// (row: slot (t, 0)'s column block): an fp32 sum from 0 over the n ordered slots.
// kFromL2: the slots are read through L2 (ld.global.cg), for values other CTAs of the
// same launch wrote.
template <int VEC, bool kFromL2 = false>
__device__ __forceinline__ void moe_slot_sum(const uint16_t* row, int64_t D, const int* order, int n,
                                             float (&acc)[VEC]) {
  static_assert(VEC == 1 || VEC == 8, "moe_slot_sum: 1 or 8 columns");
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
#pragma unroll 8
  for (int s = 0; s < n; ++s) {
    const uint16_t* p = row + int64_t(order[s]) * D;
    uint16_t v[VEC];
    if constexpr (VEC == 8) {
      const uint4 u = kFromL2 ? __ldcg(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = uint16_t(w[i] & 0xffffu);
        v[2 * i + 1] = uint16_t(w[i] >> 16);
      }
    } else {
      v[0] = kFromL2 ? __ldcg(p) : p[0];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], core::bf16_to_float(v[i]));
  }
}

}  // namespace dsv4::ops
