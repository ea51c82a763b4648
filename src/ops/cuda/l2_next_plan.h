// Which bytes of an L2Next (linear_kernels.cuh: `wo_a`'s CTAs asking `wo_b`'s weights into
// the L2, DSV4_CUDA_WO_B_PREFETCH) a CTA asks for, and with which of its weight stages.
// Host and device code, tested on the CPU (tests/ops/l2_next_plan_test.cpp).
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace dsv4::ops {

// CTA `cta` of `ctas` takes [begin, end): an equal share of `bytes` (a multiple of 16),
// rounded up to 16 bytes, so every share starts 16-byte aligned and the last CTAs may take
// less or nothing; with its weight stage j (0 .. stages - 1) it asks for piece j,
// [begin + j piece, begin + (j + 1) piece) cut at end (l2_next_piece), piece a multiple of
// 16 large enough that `stages` pieces cover the share.
struct L2NextShare {
  int64_t begin = 0, end = 0, piece = 0;
};

DSV4_HD L2NextShare l2_next_share(int64_t bytes, int64_t ctas, int64_t cta, int64_t stages) {
  const int64_t share = ((bytes + ctas - 1) / ctas + 15) & ~int64_t(15);
  L2NextShare s;
  s.begin = cta * share < bytes ? cta * share : bytes;
  s.end = s.begin + share < bytes ? s.begin + share : bytes;
  s.piece = ((s.end - s.begin + stages - 1) / (stages > 0 ? stages : 1) + 15) & ~int64_t(15);
  return s;
}

// The bytes stage j asks for, from s.begin + j * s.piece (0: none).
DSV4_HD int64_t l2_next_piece(const L2NextShare& s, int64_t j) {
  const int64_t from = s.begin + j * s.piece;
  return from >= s.end ? 0 : s.end - from < s.piece ? s.end - from : s.piece;
}

}  // namespace dsv4::ops
