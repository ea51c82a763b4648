// The CTAs' shares of an L2Next prefetch (ops/cuda/l2_next_plan.h), on the CPU: every byte
// asked for once, in 16-byte aligned pieces of 16-byte multiples, at most one a stage.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "ops/cuda/l2_next_plan.h"
#include "test_seed.h"

namespace dsv4::ops {
namespace {

// Checks one launch: `ctas` CTAs of `stages` stages asking for `bytes`.
void check_launch(int64_t bytes, int64_t ctas, int64_t stages) {
  std::vector<int64_t> pieces;  // (from, to) pairs, in CTA and stage order
  for (int64_t cta = 0; cta < ctas; ++cta) {
    const L2NextShare s = l2_next_share(bytes, ctas, cta, stages);
    ASSERT_LE(s.begin, s.end);
    ASSERT_EQ(s.begin % 16, 0);
    ASSERT_EQ(s.piece % 16, 0);
    for (int64_t j = 0; j < stages + 2; ++j) {  // (stages past the CTA's ask for nothing)
      const int64_t n = l2_next_piece(s, j);
      if (j >= stages) {
        ASSERT_EQ(n, 0) << "stage " << j << " of " << stages;
        continue;
      }
      ASSERT_GE(n, 0);
      ASSERT_EQ(n % 16, 0) << bytes << " " << ctas << " " << stages;
      ASSERT_LE(n, s.piece);
      if (n > 0) {
        pieces.push_back(s.begin + j * s.piece);
        pieces.push_back(s.begin + j * s.piece + n);
      }
    }
  }
  // In order, touching, from 0 to bytes: every byte once.
  int64_t at = 0;
  for (size_t i = 0; i < pieces.size(); i += 2) {
    ASSERT_EQ(pieces[i], at) << "bytes " << bytes << " ctas " << ctas << " stages " << stages;
    at = pieces[i + 1];
  }
  ASSERT_EQ(at, bytes) << "ctas " << ctas << " stages " << stages;
}

TEST(L2NextPlan, WoBOverWoAsCtas) {
  // bench-1g at batch 1: wo_b's 33.5 MB over wo_a's 256 CTAs of 16 stages; at 16 rows in clusters.
  check_launch(int64_t(4096) * 8192, 256, 16);
  check_launch(int64_t(4096) * 8192, 512, 8);
  check_launch(0, 256, 16);  // nothing to ask for
  check_launch(16, 256, 16);  // less than a piece a CTA
  check_launch(int64_t(256) * 256, 2, 4);
}

TEST(L2NextPlan, RandomLaunchesCoverEveryByteOnce) {
  std::mt19937_64 rng(dsv4::testing::test_seed() ^ 0x12);
  for (int trial = 0; trial < 2000; ++trial) {
    const int64_t bytes = 16 * int64_t(rng() % (trial % 4 == 0 ? 100 : 100000));
    const int64_t ctas = 1 + int64_t(rng() % 600), stages = 1 + int64_t(rng() % 64);
    check_launch(bytes, ctas, stages);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

}  // namespace
}  // namespace dsv4::ops
