// The grid of the warp-specialised wide GEMM when its CTAs walk tiles
// (gemm_wide_ws_kernel, DSV4_CUDA_WIDE_WS's mode 2). Host code, tested on the CPU
// (tests/ops/wide_ws_grid_test.cpp). The grid never changes a bit: every tile is
// computed whole by one CTA, whichever CTA that is.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dsv4::ops {

// At most `most` CTAs (one an SM) walk `tiles` tiles in ceil(tiles / most) rounds.
// The fewest CTAs that still need only that many rounds take them: the GEMM's span is
// the same (its busiest CTA walks as many tiles), and the SMs left over are free from
// the start for the kernels of other stage lanes. At 256 rows wq_b's 512 tiles (640
// with the indexer's q beside it) go to 128 CTAs, not 132. `even` false: `most` CTAs.
constexpr int64_t wide_ws_walk_ctas(int64_t tiles, int64_t most, bool even = true) {
  if (tiles <= 0) return 1;
  const int64_t ctas = std::min(tiles, std::max<int64_t>(most, 1));
  if (!even) return ctas;
  const int64_t rounds = (tiles + ctas - 1) / ctas;
  return (tiles + rounds - 1) / rounds;
}

}  // namespace dsv4::ops
