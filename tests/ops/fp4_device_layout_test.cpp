// The CUDA backend's FP4 storage order (ops/cuda/fp4_device_layout.h), on the CPU:
// the conversion loses nothing, each stored element is where the readers look for
// it, and the GEMM's 5-operation decode gives exactly 2^-6 x every e2m1 value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
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

// Rows of several blocks: every element where element_code finds it, the round trip
// exact, and lane t's 16-byte piece of a block holding chunk j's elements 8t..8t+7 as
// word j (the GEMM's fragment rule, ops/cuda/linear_kernels.cuh: fp4_a_frag).
TEST(Fp4DeviceLayout, ElementsSitWhereTheReadersLook) {
  Rng rng(0xF6);
  constexpr int64_t K = 512, kRowBytes = K / 2;
  for (int rep = 0; rep < 50; ++rep) {
    std::vector<uint8_t> row(kRowBytes);
    for (auto& b : row) b = uint8_t(rng.uniform_int(0, 255));
    std::vector<uint8_t> stored = row;
    layout::buffer_to_device(stored.data(), stored.size());
    for (int64_t kk = 0; kk < K; ++kk)
      ASSERT_EQ(layout::element_code(stored.data(), kk), checkpoint_code(row, kk)) << "element " << kk;
    for (int64_t blk = 0; blk < K / layout::kBlockElements; ++blk)
      for (int t = 0; t < 4; ++t)
        for (int j = 0; j < 4; ++j) {
          uint32_t w;
          std::memcpy(&w, stored.data() + blk * layout::kBlockBytes + 16 * t + 4 * j, 4);
          const layout::E4m3Pair d = layout::word_to_e4m3_div64(w);
          for (int m = 0; m < 8; ++m) {
            const int64_t kk = blk * layout::kBlockElements + 32 * j + 8 * t + m;
            const uint8_t q = uint8_t(((m & 1) ? d.odd : d.even) >> (8 * (m / 2)));
            expect_e4m3_is_code_div64(q, checkpoint_code(row, kk), "fragment element");
          }
        }
    std::vector<uint8_t> back = stored;
    layout::buffer_to_checkpoint(back.data(), back.size());
    ASSERT_EQ(back, row);
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
