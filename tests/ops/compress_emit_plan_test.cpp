// The compressors' emission spread over CTAs (ops/cuda/compress_emit_plan.h), on the
// CPU: the shapes bench-1g runs, and over a grid of shapes that a row's features are
// pooled once each, by chunks that fit the stage, on at most the CTAs allowed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "ops/cuda/compress_emit_plan.h"

namespace dsv4::ops {
namespace {

TEST(CompressEmitPlan, Bench1gShapes) {
  struct Case {
    int64_t d, candidates;
    bool ratio4;
    int64_t rows, ctas, features;
  };
  const Case cases[] = {
      {512, 128, false, 1, 16, 32},    // HCA: a chunk of 32 features a CTA
      {512, 128, false, 64, 16, 32},   // 1024 / 64 = 16
      {512, 128, false, 256, 4, 32},   // 4 CTAs, 4 chunks each
      {512, 128, false, 2048, 1, 32},  // one CTA pools the 16 chunks
      {512, 8, true, 1, 4, 128},       // CSA main: the row's 512 over 4 CTAs
      {512, 8, true, 256, 4, 128},
      {512, 8, true, 512, 2, 256},
      {512, 8, true, 2048, 1, 512},    // one CTA, one chunk (the stage holds 8 x 512)
      {128, 8, true, 16, 4, 32},       // CSA indexer
  };
  for (const Case& c : cases) {
    const CompressEmitShape s = compress_emit_shape(c.d, c.candidates, c.ratio4, c.rows, 4, 0);
    EXPECT_EQ(s.ctas, c.ctas) << "d " << c.d << " candidates " << c.candidates << " rows " << c.rows;
    EXPECT_EQ(s.features, c.features) << "d " << c.d << " candidates " << c.candidates << " rows " << c.rows;
  }
  // DSV4_CUDA_COMPRESS_RATIO4_CTAS=1: a CSA row on one CTA, as before the sixty-fourth session.
  EXPECT_EQ(compress_emit_shape(512, 8, true, 16, 1, 0).ctas, 1);
  EXPECT_EQ(compress_emit_shape(512, 8, true, 16, 1, 0).features, 512);
  // A test's forced count, capped at one CTA a 32-feature chunk.
  EXPECT_EQ(compress_emit_shape(512, 8, true, 16, 4, 3).ctas, 3);
  EXPECT_EQ(compress_emit_shape(512, 8, true, 16, 4, 3).features, 171);
  EXPECT_EQ(compress_emit_shape(128, 8, true, 16, 4, 16).ctas, 4);
  // More candidates than the stage holds: one CTA from global memory.
  EXPECT_EQ(compress_emit_shape(512, 8192, false, 1, 4, 0).features, 0);
  EXPECT_EQ(compress_emit_shape(512, 8192, false, 1, 4, 0).ctas, 1);
}

// Every feature pooled by exactly one CTA (CTA k takes chunks k, k + ctas, ...), every
// chunk within the stage, no more CTAs than 1024 / rows (or one), nor than d / 32.
TEST(CompressEmitPlan, EveryFeatureOnceWithinTheStage) {
  for (int64_t d : {32, 96, 128, 200, 512})
    for (int64_t candidates : {4, 8, 16, 128, 256})
      for (bool ratio4 : {false, true})
        for (int64_t rows : {1, 3, 16, 64, 100, 256, 1000, 4096})
          for (int64_t ratio4_ctas : {1, 2, 4, 16})
            for (int64_t forced : {0, 1, 3, 7, 100}) {
              const CompressEmitShape s = compress_emit_shape(d, candidates, ratio4, rows, ratio4_ctas, forced);
              const std::string at = "d " + std::to_string(d) + " candidates " + std::to_string(candidates) +
                                     " rows " + std::to_string(rows) + " forced " + std::to_string(forced);
              ASSERT_GE(s.ctas, 1) << at;
              ASSERT_LE(s.ctas, d / kCompressMinChunkFeatures) << at;
              if (forced == 0) {
                ASSERT_LE(s.ctas, std::max<int64_t>(1, 1024 / rows)) << at;
              }
              ASSERT_GE(s.features, 1) << at;
              ASSERT_LE(s.features * candidates, kCompressPoolStage) << at;
              std::vector<int> seen(size_t(d), 0);
              for (int64_t k = 0; k < s.ctas; ++k)
                for (int64_t f0 = k * s.features; f0 < d; f0 += s.ctas * s.features)
                  for (int64_t f = f0; f < std::min(d, f0 + s.features); ++f) ++seen[size_t(f)];
              for (int64_t f = 0; f < d; ++f) ASSERT_EQ(seen[size_t(f)], 1) << at << " feature " << f;
            }
}

}  // namespace
}  // namespace dsv4::ops
