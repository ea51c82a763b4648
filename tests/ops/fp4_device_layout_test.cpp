// The CUDA backend's FP4 storage order (ops/cuda/fp4_device_layout.h), on the CPU:
// the conversion loses nothing, each stored element is where the readers look for
// it, and the GEMM's 5-operation decode gives exactly 2^-6 x every e2m1 value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <algorithm>
#include <vector>

#include "core/dtype.h"
#include "op_test_util.h"
#include "ops/cuda/fp4_device_layout.h"

namespace dsv4::testing {
namespace {

namespace layout = ops::fp4_layout;

uint8_t checkpoint_code(const std::vector<uint8_t>& row, int64_t kk) {
  const uint8_t b = row[size_t(kk / 2)];
  return (kk & 1) ? uint8_t(b >> 4) : uint8_t(b & 0xF);
}

// e4m3 byte q read as a value must be 2^-6 x the e2m1 code's value, sign of zero included.
void expect_e4m3_is_code_div64(uint8_t q, uint8_t code, const char* what) {
  const float got = core::e4m3_to_float(q), want = core::e2m1_to_float(code) / 64.0f;
  EXPECT_EQ(got, want) << what << ": e4m3 0x" << std::hex << int(q) << " for e2m1 code 0x" << int(code);
  EXPECT_EQ(std::signbit(got), std::signbit(want)) << what << ": sign of e2m1 code 0x" << std::hex << int(code);
}

// Words with every byte value in every position, the other three bytes random.
std::vector<uint32_t> every_byte_in_every_position(Rng& rng) {
  std::vector<uint32_t> words;
  for (int pos = 0; pos < 4; ++pos)
    for (int b = 0; b < 256; ++b) {
      const uint32_t w = uint32_t(rng.uniform_int(0, 0xFFFFFFFFll));
      words.push_back((w & ~(0xFFu << (8 * pos))) | (uint32_t(b) << (8 * pos)));
    }
  return words;
}

TEST(Fp4DeviceLayout, ByteAndWordConversionsAreInverse) {
  for (int b = 0; b < 256; ++b) {
    const uint8_t s = layout::spread_byte(uint8_t(b));
    EXPECT_EQ(layout::gather_byte(s), b) << "byte " << b;
    for (int pos = 0; pos < 4; ++pos) {  // the word form agrees with the byte form in every position
      const uint32_t w = uint32_t(b) << (8 * pos);
      EXPECT_EQ(layout::spread_word(w), uint32_t(s) << (8 * pos)) << "byte " << b << " at " << pos;
      EXPECT_EQ(layout::gather_word(uint32_t(s) << (8 * pos)), w) << "byte " << b << " at " << pos;
    }
  }
  Rng rng(0xF4);
  for (int i = 0; i < 10000; ++i) {
    const uint32_t w = uint32_t(rng.uniform_int(0, 0xFFFFFFFFll));
    uint32_t bytewise = 0;
    for (int pos = 0; pos < 4; ++pos) bytewise |= uint32_t(layout::spread_byte(uint8_t(w >> (8 * pos)))) << (8 * pos);
    ASSERT_EQ(layout::spread_word(w), bytewise) << std::hex << w;
    ASSERT_EQ(layout::gather_word(layout::spread_word(w)), w) << std::hex << w;
  }
}

// Every byte value in every position of a word (the other bytes random): the
// decode's even word holds elements 0, 2, 4, 6 and its odd word 1, 3, 5, 7, each
// exactly 2^-6 x its e2m1 value.
TEST(Fp4DeviceLayout, DecodeGivesTheValuesOverSixtyFour) {
  Rng rng(0xF5);
  for (const uint32_t w : every_byte_in_every_position(rng)) {
    const layout::E4m3Pair d = layout::word_to_e4m3_div64(layout::spread_word(w));
    for (int m = 0; m < 8; ++m) {
      const uint8_t code = uint8_t((w >> (4 * m)) & 0xF);
      const uint8_t q = uint8_t(((m & 1) ? d.odd : d.even) >> (8 * (m / 2)));
      expect_e4m3_is_code_div64(q, code, "decoded element");
    }
  }
}

// Matrices of several blocks a row, whole and partial 128-row tiles, one or two
// matrices a buffer: every element where element_code finds it, the round trip
// exact, and lane t's 16-byte piece of a block holding chunk j's elements 8t..8t+7 as
// word j (the GEMM's fragment rule, ops/cuda/linear_kernels.cuh: fp4_a_frag), at the
// slot the readers look in (piece_slot: t ^ ((n >> 1) & 3)).
TEST(Fp4DeviceLayout, ElementsSitWhereTheReadersLook) {
  Rng rng(0xF6);
  struct Shape {
    int64_t rows, k, matrices;
  };
  for (const Shape sh : {Shape{1, 128, 1}, Shape{5, 512, 2}, Shape{130, 256, 1}, Shape{300, 384, 2}}) {
    const int64_t row_bytes = sh.k / 2, stages = sh.k / layout::kBlockElements, matrix_bytes = sh.rows * row_bytes;
    std::vector<uint8_t> ckpt(size_t(matrix_bytes * sh.matrices));
    for (auto& b : ckpt) b = uint8_t(rng.uniform_int(0, 255));
    std::vector<uint8_t> stored(ckpt.size());
    layout::matrices_to_device(ckpt.data(), stored.data(), stored.size(), sh.rows, row_bytes);
    std::string what = std::to_string(sh.matrices);  // (appended, not a chain of +: GCC 12 warns on that)
    what += " x [" + std::to_string(sh.rows);
    what += ", " + std::to_string(row_bytes) + "]";
    for (int64_t m = 0; m < sh.matrices; ++m)
      for (int64_t n = 0; n < sh.rows; ++n) {
        const std::vector<uint8_t> row(ckpt.begin() + m * matrix_bytes + n * row_bytes,
                                       ckpt.begin() + m * matrix_bytes + (n + 1) * row_bytes);
        const uint8_t* mat = stored.data() + m * matrix_bytes;
        for (int64_t kk = 0; kk < sh.k; ++kk)
          ASSERT_EQ(layout::element_code(mat, n, kk, sh.rows, sh.k), checkpoint_code(row, kk))
              << what << " matrix " << m << " row " << n << " element " << kk;
        for (int64_t blk = 0; blk < stages; ++blk)
          for (int t = 0; t < 4; ++t)
            for (int j = 0; j < 4; ++j) {
              uint32_t w;
              std::memcpy(&w, mat + layout::block_offset(n, blk, sh.rows, stages) + 16 * layout::piece_slot(n, t) + 4 * j,
                          4);
              const layout::E4m3Pair d = layout::word_to_e4m3_div64(w);
              for (int e = 0; e < 8; ++e) {
                const int64_t kk = blk * layout::kBlockElements + 32 * j + 8 * t + e;
                const uint8_t q = uint8_t(((e & 1) ? d.odd : d.even) >> (8 * (e / 2)));
                expect_e4m3_is_code_div64(q, checkpoint_code(row, kk), "fragment element");
              }
            }
      }
    std::vector<uint8_t> back(stored.size());
    layout::matrices_to_checkpoint(stored.data(), back.data(), back.size(), sh.rows, row_bytes);
    ASSERT_EQ(back, ckpt) << what;
  }
}

// The blocks of a matrix are a permutation of its 64-byte slots, and a tile's stage is
// one run: rows 128i .. 128i + R - 1 of stage s at 128i K/2 + s R 64, 64 bytes apart (the
// GEMM's bulk copy and cp.async addresses).
TEST(Fp4DeviceLayout, TileStagesAreContiguousRuns) {
  for (const int64_t rows : {1, 127, 128, 129, 256, 300}) {
    for (const int64_t stages : {1, 3, 32}) {
      std::vector<int> hits(size_t(rows * stages), 0);
      for (int64_t n = 0; n < rows; ++n)
        for (int64_t s = 0; s < stages; ++s) {
          const int64_t off = layout::block_offset(n, s, rows, stages);
          ASSERT_EQ(off % layout::kBlockBytes, 0);
          ASSERT_GE(off, 0);
          ASSERT_LT(off, rows * stages * layout::kBlockBytes) << "row " << n << " stage " << s;
          ++hits[size_t(off / layout::kBlockBytes)];
          const int64_t first = n / 128 * 128, tile_rows = std::min<int64_t>(128, rows - first);
          EXPECT_EQ(off, (first * stages + s * tile_rows + (n - first)) * layout::kBlockBytes)
              << "rows " << rows << " stages " << stages << " row " << n << " stage " << s;
        }
      for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i], 1) << "slot " << i << " of " << rows << " x " << stages;
    }
  }
}

// The row scales: a permutation of the matrix's 4-byte stage words; a whole tile's
// group of 4 stages one 2 KB run (the GEMM's bulk copy), a row's group 16 bytes (its
// cp.async), the last group of a row shorter where K / 128 is not a multiple of 4; the
// host round trip exact, matrix by matrix.
TEST(Fp4DeviceLayout, ScaleGroupsAreContiguousRuns) {
  Rng rng(0xF8);
  for (const int64_t rows : {1, 77, 128, 130, 256, 300}) {
    for (const int64_t stages : {1, 3, 4, 7, 16, 32}) {
      std::vector<int> hits(size_t(rows * stages), 0);
      for (int64_t n = 0; n < rows; ++n)
        for (int64_t s = 0; s < stages; ++s) {
          const int64_t off = layout::scale_offset(n, s, rows, stages);
          ASSERT_EQ(off % 4, 0);
          ASSERT_GE(off, 0);
          ASSERT_LT(off, rows * stages * 4) << "row " << n << " stage " << s;
          ++hits[size_t(off / 4)];
          const int64_t first = n / 128 * 128, tile_rows = std::min<int64_t>(128, rows - first), q = s / 4;
          const int64_t group_stages = std::min<int64_t>(4, stages - 4 * q);
          EXPECT_EQ(off, first * stages * 4 + q * tile_rows * 16 + (n - first) * group_stages * 4 + (s % 4) * 4)
              << "rows " << rows << " stages " << stages << " row " << n << " stage " << s;
        }
      for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i], 1) << "word " << i << " of " << rows << " x " << stages;
    }
  }
  for (const int64_t matrices : {1, 2}) {
    const int64_t rows = 130, row_bytes = 7 * 4;
    std::vector<uint8_t> ckpt(size_t(matrices * rows * row_bytes));
    for (auto& b : ckpt) b = uint8_t(rng.uniform_int(0, 255));
    std::vector<uint8_t> stored(ckpt.size()), back(ckpt.size());
    layout::scales_to_device(ckpt.data(), stored.data(), stored.size(), rows, row_bytes);
    for (int64_t m = 0; m < matrices; ++m)
      for (int64_t n = 0; n < rows; ++n)
        for (int64_t b = 0; b < row_bytes; ++b)
          ASSERT_EQ(stored[size_t(m * rows * row_bytes + layout::scale_offset(n, b / 4, rows, row_bytes / 4) + b % 4)],
                    ckpt[size_t((m * rows + n) * row_bytes + b)])
              << "matrix " << m << " row " << n << " byte " << b;
    layout::scales_to_checkpoint(stored.data(), back.data(), back.size(), rows, row_bytes);
    ASSERT_EQ(back, ckpt);
  }
}

// Every scale byte in every position of a word (the other bytes random): the GEMM's
// bf16 form read back as a float is core::e8m0_to_float's value, bit for bit (NaN for
// 255), and the other three bytes' values are untouched by it.
TEST(Fp4DeviceLayout, ScaleBytesAsBf16PairsAreExact) {
  Rng rng(0xF7);
  for (const uint32_t w : every_byte_in_every_position(rng)) {
    const layout::Bf16Pairs p = layout::e8m0x4_to_bf16x2(w);
    const float got[4] = {layout::bf16_pair_lo(p.lo), layout::bf16_pair_hi(p.lo), layout::bf16_pair_lo(p.hi),
                          layout::bf16_pair_hi(p.hi)};
    for (int j = 0; j < 4; ++j) {
      const uint8_t b = uint8_t(w >> (8 * j));
      const float want = core::e8m0_to_float(b);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(got[j])) << "byte 0x" << std::hex << int(b);
      } else {
        EXPECT_EQ(core::float_bits(got[j]), core::float_bits(want))
            << "byte 0x" << std::hex << int(b) << " at " << j << " in word 0x" << w;
      }
    }
  }
}

}  // namespace
}  // namespace dsv4::testing
