// The CUDA backend's storage order of packed FP4 (e2m1, DType::kI8) tensors.
//
// A checkpoint row stores element k in nibble k % 2 of byte k / 2 (spec §2.8). The
// FP4 GEMM reads a row 128 elements (64 bytes) a stage and feeds the tensor core
// e4m3 bytes worth 2^-6 x each value; in checkpoint order a warp spends ~7 integer
// operations per 8 values on that decode and 16 32-bit shared loads per row and
// stage on the fragments. On the GPU each whole 64-byte block of a row is stored
// permuted instead (docs/design/cuda-linear.md, "An FP4 expert weight layout"):
//
// - Words by thread. Checkpoint word (j, t) of a block (byte 16j + 4t: elements
//   8t..8t+7 of 32-element chunk j, the ones fragment lane t needs for chunk j) goes
//   to 16-byte piece t, word j, so a lane's four words are one 16-byte load.
// - Bits spread. In each byte, the even element's (sign, e1, e0, m) sit at bits
//   (7, 4, 3, 2), the odd one's at (5, 6, 1, 0): the even e4m3 byte is one mask and the
//   odd one two shifts and masks that never cross a byte (5 operations for 8 values).
//
// And the blocks are stored by 128-row tile, a tile's stages one after another
// (docs/design/cuda-linear.md, "Tile-major FP4 weights and scales"):
//
// - Tile i (rows 128i .. 128i + R - 1, R = min(128, N - 128i)) keeps the bytes
//   [128i K/2, (128i + R) K/2) of the matrix, as K/128 stages of R x 64 bytes:
//   block (row n, stage s) at 128i K/2 + (s R + n - 128i) 64. One stage of a tile is
//   one contiguous run (8 KB for a whole tile), which one bulk copy brings to shared
//   memory: in checkpoint order it was 128 runs of 64 bytes, 2 KB or more apart.
// - Piece t of row n's block sits at slot t ^ ((n >> 1) & 3) (the 64-byte swizzle), so
//   the quarter warp that reads two rows' pieces hits every bank once.
//
// The row scales ([N, K/32] UE8M0, 4 bytes a row and stage) are tile-major too, in
// groups of 4 stages (16 bytes a row): group q of tile i is R rows x 4 x (its stages)
// bytes at 128i K/32 + 16 q R. A whole tile's group is one 2 KB run (one bulk copy);
// in checkpoint order it was 128 reads of 16 bytes, K/32 bytes apart.
//
// All of it is a bijection on a matrix, so every value survives and the tensor core
// sees the same bytes as before: the same results, bit for bit. The CPU keeps
// checkpoint order; the CUDA backend converts on upload and download, matrix by
// matrix (the tensor's last dimension is K/2, or K/32 for the scales, the one before
// it N; its rows must be whole blocks: K % 128 == 0, which every linear op requires
// anyway). Nothing in a scale tensor's dtype or shape says it belongs to an FP4
// weight, so its uploads say so (ops::TensorRole::kFp4Scales).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/dtype.h"

namespace dsv4::ops::fp4_layout {

constexpr int kBlockBytes = 64;     // one 128-element stage of one row
constexpr int kBlockElements = 128;

// Each checkpoint byte of a word (low nibble = even element) in the spread order,
// and back. No shift moves a bit across a byte, so a lone byte converts alone.
DSV4_HD uint32_t spread_word(uint32_t w) {
  return ((w & 0x07070707u) << 2) | ((w & 0x08080808u) << 4) | ((w & 0x80808080u) >> 2) | (w & 0x40404040u) |
         ((w >> 4) & 0x03030303u);
}
DSV4_HD uint32_t gather_word(uint32_t s) {
  return ((s >> 2) & 0x07070707u) | ((s >> 4) & 0x08080808u) | ((s << 2) & 0x80808080u) | (s & 0x40404040u) |
         ((s & 0x03030303u) << 4);
}
DSV4_HD uint8_t spread_byte(uint8_t b) { return uint8_t(spread_word(b)); }
DSV4_HD uint8_t gather_byte(uint8_t s) { return uint8_t(gather_word(s)); }

constexpr int kTileRows = 128;      // rows of a tile (the GEMM's weight rows per CTA)

// Byte of the block (in piece order, before the swizzle) that holds element e
// (0..127) of the block, with its neighbour e ^ 1: chunk j = e / 32, lane t =
// (e % 32) / 8, byte (e % 8) / 2 of word (j, t).
DSV4_HD int element_byte(int e) { return 16 * ((e & 31) >> 3) + 4 * (e >> 5) + ((e & 7) >> 1); }

// The slot of piece t (0..3) in row n's blocks.
DSV4_HD int piece_slot(int64_t n, int t) { return t ^ int((n >> 1) & 3); }

// The tile of row n in a matrix of `rows` rows: its first row and its row count.
struct TileOf {
  int64_t first, rows;
};
DSV4_HD TileOf tile_of(int64_t n, int64_t rows) {
  const int64_t first = n & ~int64_t(kTileRows - 1);
  return TileOf{first, rows - first < kTileRows ? rows - first : kTileRows};
}

// Offset of block (row n, stage s) in a stored matrix of `rows` rows and `stages`
// 128-element stages a row.
DSV4_HD int64_t block_offset(int64_t n, int64_t s, int64_t rows, int64_t stages) {
  const TileOf tile = tile_of(n, rows);
  return (tile.first * stages + s * tile.rows + (n - tile.first)) * kBlockBytes;
}

// Offset of the byte that holds element kk (with kk ^ 1) of row n.
DSV4_HD int64_t element_offset(int64_t n, int64_t kk, int64_t rows, int64_t stages) {
  const int b = element_byte(int(kk % kBlockElements));
  return block_offset(n, kk / kBlockElements, rows, stages) + 16 * piece_slot(n, b >> 4) + (b & 15);
}

// Offset of the 4 scale bytes of row n and stage s in stored [rows, 4 stages] scales.
constexpr int kScaleGroupStages = 4;  // stages a row's scale group covers (16 bytes)
DSV4_HD int64_t scale_offset(int64_t n, int64_t s, int64_t rows, int64_t stages) {
  const TileOf tile = tile_of(n, rows);
  const int64_t q = s / kScaleGroupStages, left = stages - q * kScaleGroupStages;
  const int64_t group_stages = left < kScaleGroupStages ? left : kScaleGroupStages;
  return tile.first * stages * 4 + q * tile.rows * 4 * kScaleGroupStages + (n - tile.first) * group_stages * 4 +
         (s % kScaleGroupStages) * 4;
}

// The e2m1 code (checkpoint nibble) of element kk of row n of a stored [rows, K/2] matrix.
DSV4_HD uint8_t element_code(const uint8_t* matrix, int64_t n, int64_t kk, int64_t rows, int64_t K) {
  const uint8_t b = gather_byte(matrix[element_offset(n, kk, rows, K / kBlockElements)]);
  return (kk & 1) ? uint8_t(b >> 4) : uint8_t(b & 0xF);
}

// 8 e2m1 values of one stored word -> 8 e4m3 bytes worth 2^-6 x the values, exactly
// (bits e1 e0 m at e4m3 bits 4..2 read as exponent e, bias 7, and mantissa m00:
// 2^(e-7)(1 + m/2) = 2^-6 * 2^(e-1)(1 + m/2); e = 0 gives the e4m3 subnormal m/2 * 2^-6;
// the sign at bit 7). .x: elements 0, 2, 4, 6 of the word; .y: 1, 3, 5, 7.
struct E4m3Pair {
  uint32_t even, odd;
};
DSV4_HD E4m3Pair word_to_e4m3_div64(uint32_t w) {
  return E4m3Pair{w & 0x9C9C9C9Cu, ((w << 2) & 0x8C8C8C8Cu) | ((w >> 2) & 0x10101010u)};
}

// A block of row n in checkpoint order -> stored order (to_device), and back
// (to_checkpoint), as 16 words: checkpoint word (j, t) is word 4j + t, stored word
// 4 piece_slot(n, t) + j.
DSV4_HD void block_to_device(const uint32_t (&in)[16], uint32_t (&out)[16], int64_t n) {
  for (int j = 0; j < 4; ++j)
    for (int t = 0; t < 4; ++t) out[4 * piece_slot(n, t) + j] = spread_word(in[4 * j + t]);
}
DSV4_HD void block_to_checkpoint(const uint32_t (&in)[16], uint32_t (&out)[16], int64_t n) {
  for (int j = 0; j < 4; ++j)
    for (int t = 0; t < 4; ++t) out[4 * j + t] = gather_word(in[4 * piece_slot(n, t) + j]);
}

// ---- the FP4 GEMM's row scales in shared memory ----------------------------------
// The GEMM needs each UE8M0 scale (2^(b-127)) as a float, 16 a lane per stage. A
// shift and a mask from the byte, plus a test for the bytes 0 and 255 that a shift
// gets wrong, cost ~50 instructions a stage (ncu, eighteenth session); so the thread
// that copies a row's scales rewrites them in place, once, as bf16 (the float's top
// half: b << 7, exactly), and each reader takes a float in one operation.
//
// PRMT on the device; the same byte selection on the host.
DSV4_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, selector);
#else
  const uint64_t bytes = uint64_t(a) | (uint64_t(b) << 32);
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((bytes >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
#endif
}

// Scale bytes 0..3 of w as bf16 pairs: lo = {byte 0, byte 1}, hi = {byte 2, byte 3},
// the lower byte in the low half. Exact: b << 7 for b = 1..254, 0x0040 (2^-127, a bf16
// subnormal) for 0, 0x7FC0 (NaN) for 255. Branch-free, 8 operations a word.
struct Bf16Pairs {
  uint32_t lo, hi;
};
DSV4_HD Bf16Pairs e8m0x4_to_bf16x2(uint32_t w) {
  const uint32_t d = (w ^ (w >> 1)) & 0x7F7F7F7Fu;          // a byte is 0 iff b's bits are all equal: 0 or 255
  const uint32_t z = ~((d + 0x7F7F7F7Fu) | d) & 0x80808080u;  // bit 7 of each such byte (no carry crosses a byte)
  // {b, z} as a 16-bit (b << 8 | z), shifted right once: b << 7, and bit 6 for 0 and 255.
  return Bf16Pairs{byte_perm(w, z, 0x1504u) >> 1, byte_perm(w, z, 0x3726u) >> 1};
}
// A bf16 pair's two values as floats.
DSV4_HD float bf16_pair_lo(uint32_t pair) { return core::bits_float(pair << 16); }
DSV4_HD float bf16_pair_hi(uint32_t pair) { return core::bits_float(pair & 0xFFFF0000u); }

// Whole host matrices, out of place: `bytes` of [matrices, rows, row_bytes] (row_bytes
// % kBlockBytes == 0) from checkpoint order (in) to stored order (out), and back.
template <bool kToDevice>
inline void convert_matrices(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t row_bytes) {
  const int64_t stages = row_bytes / kBlockBytes;
  const size_t matrix_bytes = size_t(rows * row_bytes);
  uint32_t a[16], b[16];
  for (size_t m = 0; m + matrix_bytes <= bytes && matrix_bytes > 0; m += matrix_bytes)
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t s = 0; s < stages; ++s) {
        const size_t ckpt = m + size_t(n * row_bytes + s * kBlockBytes), dev = m + size_t(block_offset(n, s, rows, stages));
        memcpy(a, in + (kToDevice ? ckpt : dev), kBlockBytes);
        if constexpr (kToDevice) block_to_device(a, b, n);
        else block_to_checkpoint(a, b, n);
        memcpy(out + (kToDevice ? dev : ckpt), b, kBlockBytes);
      }
}
inline void matrices_to_device(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t row_bytes) {
  convert_matrices<true>(in, out, bytes, rows, row_bytes);
}
inline void matrices_to_checkpoint(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t row_bytes) {
  convert_matrices<false>(in, out, bytes, rows, row_bytes);
}

// The same for whole host scale matrices [matrices, rows, row_bytes] (row_bytes = K/32,
// a multiple of 4): each row's 4 bytes of a stage move to scale_offset.
template <bool kToDevice>
inline void convert_scales(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t row_bytes) {
  const int64_t stages = row_bytes / 4;
  const size_t matrix_bytes = size_t(rows * row_bytes);
  for (size_t m = 0; m + matrix_bytes <= bytes && matrix_bytes > 0; m += matrix_bytes)
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t s = 0; s < stages; ++s) {
        const size_t ckpt = m + size_t(n * row_bytes + 4 * s), dev = m + size_t(scale_offset(n, s, rows, stages));
        memcpy(out + (kToDevice ? dev : ckpt), in + (kToDevice ? ckpt : dev), 4);
      }
}
inline void scales_to_device(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t row_bytes) {
  convert_scales<true>(in, out, bytes, rows, row_bytes);
}
inline void scales_to_checkpoint(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t row_bytes) {
  convert_scales<false>(in, out, bytes, rows, row_bytes);
}

}  // namespace dsv4::ops::fp4_layout
