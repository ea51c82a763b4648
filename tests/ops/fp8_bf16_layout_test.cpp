// The CUDA backend's storage order of grouped_linear's FP8 weights
// (ops/cuda/fp8_bf16_layout.h), on the CPU: the conversion loses nothing, each stored
// byte is where the GEMM's fragment reader looks for it, and a tile's stage is one run.
// (The tile-major block order itself is FP4's, tested in fp4_device_layout_test.cpp.)
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "op_test_util.h"
#include "ops/cuda/fp8_bf16_layout.h"

namespace dsv4::testing {
namespace {

namespace layout = ops::fp8_bf16_layout;

TEST(Fp8Bf16Layout, BlockOrderIsAPermutation) {
  std::vector<int> hits(layout::kBlockBytes, 0);
  for (int e = 0; e < layout::kBlockBytes; ++e) {
    const int b = layout::element_byte(e);
    ASSERT_GE(b, 0);
    ASSERT_LT(b, layout::kBlockBytes);
    ++hits[size_t(b)];
  }
  for (int b = 0; b < layout::kBlockBytes; ++b) EXPECT_EQ(hits[size_t(b)], 1) << "stored byte " << b;
}

// The reader (linear_kernels.cuh, load_a_frags_e4m3_bf16): lane t loads 16-byte piece t
// of a row's block; word j's low half is the pair at k 16j + 2t, 16j + 2t + 1 (fragment
// registers a0 / a1), its high half the pair at 16j + 8 + 2t, 16j + 9 + 2t (a2 / a3).
TEST(Fp8Bf16Layout, PairsSitWhereTheFragmentReaderLooks) {
  uint8_t ckpt[layout::kBlockBytes], stored[layout::kBlockBytes], back[layout::kBlockBytes];
  for (int e = 0; e < layout::kBlockBytes; ++e) ckpt[e] = uint8_t(e);
  layout::block_to_device(ckpt, stored);
  for (int t = 0; t < 4; ++t)
    for (int j = 0; j < 4; ++j) {
      const uint8_t* word = stored + 16 * t + 4 * j;
      EXPECT_EQ(word[0], 16 * j + 2 * t) << "lane " << t << " chunk " << j;
      EXPECT_EQ(word[1], 16 * j + 2 * t + 1) << "lane " << t << " chunk " << j;
      EXPECT_EQ(word[2], 16 * j + 8 + 2 * t) << "lane " << t << " chunk " << j;
      EXPECT_EQ(word[3], 16 * j + 9 + 2 * t) << "lane " << t << " chunk " << j;
    }
  layout::block_to_checkpoint(stored, back);
  for (int e = 0; e < layout::kBlockBytes; ++e) EXPECT_EQ(back[e], ckpt[e]) << "element " << e;
}

// Whole matrices (partial last tiles, several matrices in one buffer): element_offset
// (the simple kernel's reader and the synthetic builder's writer) agrees with the
// conversion, the GEMM's copies find a whole tile's stage as one 8 KB run, and the round
// trip is exact. Rows that are not whole blocks stay in checkpoint order.
TEST(Fp8Bf16Layout, MatricesConvertAndElementOffsetsAgree) {
  Rng rng(0x8b16);
  for (const auto& [rows, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 64}, {128, 128}, {200, 192}, {300, 512}}) {
    for (const int64_t matrices : {1, 2}) {
      const size_t matrix = size_t(rows * K), bytes = matrix * size_t(matrices);
      std::vector<uint8_t> ckpt(bytes), stored(bytes, 0), back(bytes, 0);
      for (auto& b : ckpt) b = uint8_t(rng.uniform_int(0, 255));
      layout::matrices_to_device(ckpt.data(), stored.data(), bytes, rows, K);
      for (int64_t m = 0; m < matrices; ++m)
        for (int64_t n = 0; n < rows; ++n)
          for (int64_t k = 0; k < K; ++k)
            ASSERT_EQ(stored[m * matrix + size_t(layout::element_offset(n, k, rows, K))],
                      ckpt[m * matrix + size_t(n * K + k)])
                << rows << " x " << K << " matrix " << m << " row " << n << " k " << k;
      if (rows >= 128) {  // tile 0, stage 1: rows 0..127 one after another, 64 bytes each
        for (int64_t n = 0; n < 128; ++n)
          EXPECT_EQ(layout::element_offset(n, 64, rows, K), 128 * 64 + n * 64 + layout::element_byte(0)) << "row " << n;
      }
      layout::matrices_to_checkpoint(stored.data(), back.data(), bytes, rows, K);
      EXPECT_EQ(back, ckpt) << rows << " x " << K << " round trip";
    }
  }
  EXPECT_FALSE(layout::applies(100));
  EXPECT_FALSE(layout::applies(0));
  EXPECT_TRUE(layout::applies(4096));
  EXPECT_EQ(layout::element_offset(3, 7, 5, 100), 3 * 100 + 7);
}

}  // namespace
}  // namespace dsv4::testing
