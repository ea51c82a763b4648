// How compress_emit_kernel spreads a completed compressed row's pooling over CTAs
// (docs/design/cuda-attention.md, "compress"). Host code, tested on the CPU
// (tests/ops/compress_emit_plan_test.cpp). The choice never changes a bit: every
// feature's three chains run in candidate order on one thread whatever the chunks.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dsv4::ops {

// Candidate values a chunk stages in shared memory: [candidates][features of the chunk].
inline constexpr int64_t kCompressPoolStage = 4096;
// The fewest features a chunk (so the most CTAs a row: d / 32).
inline constexpr int64_t kCompressMinChunkFeatures = 32;

struct CompressEmitShape {
  int64_t ctas = 1;      // CTAs a token (all but a token completing a window exit at once)
  int64_t features = 0;  // a chunk's; CTA k pools chunks k, k + ctas, ...; 0: none staged
};

// d: the row's features; candidates: 2 * ratio at ratio 4 (the windows overlap),
// ratio otherwise; rows: the launch's tokens; ratio4_ctas: the most CTAs a ratio-4 row
// takes; forced > 0: a test's CTA count (capped as the launcher's).
// A row spreads over the chunks of the features the stage holds (16 at ratio 128 and
// d = 512: a CTA may pool several), a ratio-4 row over up to ratio4_ctas CTAs (the row's
// d over them), at most 1024 / rows CTAs a row in all: idle CTAs are not free (the state
// kernel's 8,192 at 256 rows cost ~0.9% a step, docs/BENCHMARKS.md, sixty-third session).
constexpr CompressEmitShape compress_emit_shape(int64_t d, int64_t candidates, bool ratio4, int64_t rows,
                                                int64_t ratio4_ctas, int64_t forced) {
  const int64_t stage_f = candidates > kCompressPoolStage ? 0 : std::min(d, kCompressPoolStage / candidates);
  if (stage_f == 0 || d <= 0) return {1, 0};
  const int64_t stage_chunks = (d + stage_f - 1) / stage_f;
  const int64_t most = std::min(std::max(stage_chunks, ratio4 ? ratio4_ctas : int64_t(1)),
                                std::max<int64_t>(1, d / kCompressMinChunkFeatures));
  const int64_t ctas =
      std::max<int64_t>(1, std::min(most, forced > 0 ? forced : std::max<int64_t>(1, 1024 / std::max<int64_t>(rows, 1))));
  // A CTA a chunk where the CTAs outnumber the stage's chunks, as few chunks as the
  // stage allows otherwise.
  return {ctas, std::min(stage_f, (d + ctas - 1) / ctas)};
}

}  // namespace dsv4::ops
