// The CUDA backend's storage order of the e4m3 weight that the grouped linear
// multiplies as bf16 (wo_a, spec §5.6; uploads say so: ops::TensorRole::kGroupedFp8Weight).
//
// The FP8-as-bf16 GEMM (linear_kernels.cuh) reads a row 64 elements (64 bytes) a
// stage and hands the tensor core bf16 A fragments: lane t of a warp needs, of each
// 16-element chunk j of the stage, the pairs at k 2t, 2t + 1 and 8 + 2t, 9 + 2t. In
// checkpoint order that was 8 two-byte shared loads a row and stage, and the CTA's
// copies of a stage 128 runs of 64 bytes, K bytes apart. On the GPU each whole 64-byte
// block of a row is stored permuted instead (docs/design/cuda-linear.md, "wo_a's weights
// in fragment order"):
//
// - Pairs by lane. Checkpoint bytes 16j + 2t, 16j + 2t + 1, 16j + 8 + 2t, 16j + 9 + 2t
//   of a block go to word j of its 16-byte piece t, so a lane's 8 pairs of a row and
//   stage are one 16-byte load (the quarter warp reading rows g and g + 1 reads 128
//   contiguous bytes: no bank conflict, no swizzle).
// - Tile-major, in FP4's block order (fp4_layout::block_offset, the same 64-byte
//   blocks): tile i (rows 128i .. 128i + R - 1, R = min(128, N - 128i)) keeps the bytes
//   [128i K, (128i + R) K) as K/64 stages of R x 64 bytes, block (row n, stage s) at
//   128i K + (s R + n - 128i) 64. A tile's stage is one contiguous run (8 KB for a whole
//   tile), which a CTA copies at constant offsets.
//
// A bijection on the matrix: the tensor core sees the same values, so the results are
// the same bits. Only matrices whose rows are whole blocks (K % 64 == 0, which the
// fast GEMM requires) take it; others stay in checkpoint order (`applies`). The CPU
// keeps checkpoint order; the CUDA backend converts on upload and download, and the
// synthetic GPU builder writes this order directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ops/cuda/fp4_device_layout.h"

namespace dsv4::ops::fp8_bf16_layout {

constexpr int kBlockBytes = 64;  // one 64-element stage of one row (e4m3: a byte an element)
static_assert(kBlockBytes == fp4_layout::kBlockBytes, "FP4's tile-major block order, the same block size");

// Whether a matrix of K columns is stored in this order.
DSV4_HD bool applies(int64_t K) { return K > 0 && K % kBlockBytes == 0; }

// Byte of a stored block that holds element e (0..63) of the checkpoint block: chunk
// j = e / 16, c = e % 16; lane t = (c % 8) / 2; byte 2 (c / 8) + c % 2 of word j.
DSV4_HD int element_byte(int e) {
  const int j = e >> 4, c = e & 15;
  return 16 * ((c & 7) >> 1) + 4 * j + 2 * (c >> 3) + (c & 1);
}

// Offset of element k of row n in a stored [rows, K] matrix (checkpoint order where
// the order does not apply).
DSV4_HD int64_t element_offset(int64_t n, int64_t k, int64_t rows, int64_t K) {
  if (!applies(K)) return n * K + k;
  return fp4_layout::block_offset(n, k / kBlockBytes, rows, K / kBlockBytes) + element_byte(int(k % kBlockBytes));
}

// One block, checkpoint order -> stored order and back.
DSV4_HD void block_to_device(const uint8_t* in, uint8_t* out) {
  for (int e = 0; e < kBlockBytes; ++e) out[element_byte(e)] = in[e];
}
DSV4_HD void block_to_checkpoint(const uint8_t* in, uint8_t* out) {
  for (int e = 0; e < kBlockBytes; ++e) out[e] = in[element_byte(e)];
}

// Whole host matrices, out of place: `bytes` of [matrices, rows, K] (applies(K)) from
// checkpoint order (in) to stored order (out), and back.
template <bool kToDevice>
inline void convert_matrices(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t K) {
  const int64_t stages = K / kBlockBytes;
  const size_t matrix_bytes = size_t(rows * K);
  for (size_t m = 0; m + matrix_bytes <= bytes && matrix_bytes > 0; m += matrix_bytes)
    for (int64_t n = 0; n < rows; ++n)
      for (int64_t s = 0; s < stages; ++s) {
        const size_t ckpt = m + size_t(n * K + s * kBlockBytes);
        const size_t dev = m + size_t(fp4_layout::block_offset(n, s, rows, stages));
        if constexpr (kToDevice) block_to_device(in + ckpt, out + dev);
        else block_to_checkpoint(in + dev, out + ckpt);
      }
}
inline void matrices_to_device(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t K) {
  convert_matrices<true>(in, out, bytes, rows, K);
}
inline void matrices_to_checkpoint(const uint8_t* in, uint8_t* out, size_t bytes, int64_t rows, int64_t K) {
  convert_matrices<false>(in, out, bytes, rows, K);
}

}  // namespace dsv4::ops::fp8_bf16_layout
