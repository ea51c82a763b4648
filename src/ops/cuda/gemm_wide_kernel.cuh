// The wide-tile GEMM for many activation rows (FP8 linears and bf16 GEMMs from 128
// rows): a CTA of two warpgroups computes 128 weight rows x 128 activation rows, each
// warpgroup one m64n128 wgmma per 32-byte K chunk. Same accumulation sequence per
// output element as gemm_tile (linear_kernels.cuh, header comment), so a row's output
// is the same bits whichever kernel computes it; only the tile shape changes.
//
// Why (docs/design/cuda-linear.md, "Wide tiles from 128 rows"): at 256 rows gemm_tile's 32-row
// tiles issue m64n32 wgmmas, whose shared-memory operand reads (2 KB of weights and
// 1 KB of activations per 131 kFLOP) take longer than the product, and each weight
// tile is loaded once per 32 rows. An m64n128 wgmma reads 6 KB per 524 kFLOP, and the
// fold of one warpgroup (64 FFMA a thread per chunk) runs while the other's product
// does.
#pragma once

#include "ops/cuda/linear_kernels.cuh"

namespace dsv4::ops::linear_kernels {

constexpr int kWideThreads = 256;  // two warpgroups, 64 weight rows each
// cp.async pipeline depth (24 or 32 KB a stage). 5-6 stages, as many as shared memory
// holds at one CTA an SM, measured no faster at batch 128 and 256 (e100797's run).
constexpr int kWideStages = 4;
static_assert(kTileN == 128, "the wide tile splits 128 weight rows over two m64 warpgroups");

// Bytes between weight rows in a stage buffer: 128 (FP8, bf16: 128-byte swizzle, read
// by wgmma) or FP8-as-bf16's 64 e4m3 bytes (read as A fragments, 16 bytes a row).
template <WFmt F>
__host__ __device__ constexpr int wide_weight_row_bytes() {
  return F == WFmt::kFp8Bf16 ? FmtTraits<F>::kWStride : 128;
}

// Dynamic shared memory of gemm_wide_kernel<F, R, kTwoSets> (R activation rows a
// tile): the weight and activation stage buffers (128 and R rows; activations 128
// bytes a row with the 128-byte swizzle; the output tile is staged in them at the
// end), the running totals over K slices (kTwoSets), FP8 activation scales and the
// tile's block-scale row (FP8, FP8-as-bf16).
template <WFmt F, int R, bool kTwoSets>
__host__ __device__ constexpr int gemm_wide_smem_bytes() {
  constexpr bool kQuant = F == WFmt::kFp8;
  constexpr int S = kWideStages;
  return 1024 /* alignment slack */ + S * (kTileN * wide_weight_row_bytes<F>() + R * 128) +
         (kTwoSets ? kWideThreads * (R / 2) * 4 : 0) + (kQuant ? S * R * 4 : 0) +
         (FmtTraits<F>::kBlockScale ? kMaxScaleBlocks : 0);
}

// d = A * B + (scale_d ? d : 0), both from shared memory: A 64 weight rows x 32 bytes,
// B 32 bytes x 128 activation rows (e4m3: k32; bf16: k16). d[4q + e]: row 16 * warp +
// g + 8 * (e / 2) of the warpgroup's 64, column 8q + 2t + e % 2.
#define DSV4_WIDE_NAMES                                                                                           \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "   \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "    \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define DSV4_WIDE_D8(b)                                                                                            \
  "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]), "+f"(d[b + 5]), "+f"(d[b + 6]), \
      "+f"(d[b + 7])
#define DSV4_WIDE_D                                                                                            \
  DSV4_WIDE_D8(0), DSV4_WIDE_D8(8), DSV4_WIDE_D8(16), DSV4_WIDE_D8(24), DSV4_WIDE_D8(32), DSV4_WIDE_D8(40), \
      DSV4_WIDE_D8(48), DSV4_WIDE_D8(56)
template <WFmt F>
__device__ __forceinline__ void wgmma_wide(float (&d)[64], uint64_t da, uint64_t db, int scale_d);
template <>
__device__ __forceinline__ void wgmma_wide<WFmt::kFp8>(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {" DSV4_WIDE_NAMES "}, %64, %65, p, 1, 1;\n}\n"
               : DSV4_WIDE_D
               : "l"(da), "l"(db), "r"(scale_d));
}
template <>
__device__ __forceinline__ void wgmma_wide<WFmt::kBf16>(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" DSV4_WIDE_NAMES
               "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
               : DSV4_WIDE_D
               : "l"(da), "l"(db), "r"(scale_d));
}
// m64n256k16, bf16, both from shared memory: the 256-row tiles (128 accumulators a thread).
#define DSV4_WIDE_NAMES_HI \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
__device__ __forceinline__ void wgmma_wide256_bf16(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" DSV4_WIDE_NAMES ", " DSV4_WIDE_NAMES_HI
               "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
               : DSV4_WIDE_D8(0), DSV4_WIDE_D8(8), DSV4_WIDE_D8(16), DSV4_WIDE_D8(24), DSV4_WIDE_D8(32),
                 DSV4_WIDE_D8(40), DSV4_WIDE_D8(48), DSV4_WIDE_D8(56), DSV4_WIDE_D8(64), DSV4_WIDE_D8(72),
                 DSV4_WIDE_D8(80), DSV4_WIDE_D8(88), DSV4_WIDE_D8(96), DSV4_WIDE_D8(104), DSV4_WIDE_D8(112),
                 DSV4_WIDE_D8(120)
               : "l"(da), "l"(db), "r"(scale_d));
}
#undef DSV4_WIDE_NAMES_HI
// The same with A (64 weight rows x k16, bf16) in registers, in the m16n8k16 A layout per warp.
__device__ __forceinline__ void wgmma_wide_bf16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t db,
                                                   int scale_d) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" DSV4_WIDE_NAMES
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
               : DSV4_WIDE_D
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
#undef DSV4_WIDE_NAMES
#undef DSV4_WIDE_D8
#undef DSV4_WIDE_D
// The m64nRk32 (e4m3) / m64nRk16 (bf16) product of a warpgroup, R = 64 or 128.
template <WFmt F, int R>
__device__ __forceinline__ void wide_mma(float (&d)[R / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (R == 128) wgmma_wide<F>(d, da, db, scale_d);
  else wgmma_ss<F, 8>(d, da, db, scale_d);
}
// The m64nRk16 bf16 product with A from registers, R = 64 or 128.
template <int R>
__device__ __forceinline__ void wide_mma_rs(float (&d)[R / 2], const uint32_t (&a)[4], uint64_t db, int scale_d) {
  if constexpr (R == 128) wgmma_wide_bf16_rs(d, a, db, scale_d);
  else wgmma_bf16_rs<8>(d, a, db, scale_d);
}

// The FP8 fold of one stage's chain d into p_s (cur), a thread's R / 2 values: p =
// fmaf(d, 2^w * 2^x, p), wsc = 2^w the stage's block scale, as the stage's activation
// scales 2^x (one per tile row, shared memory); t = lane % 4. Both wide kernels fold
// with it, so their bits are one sequence.
template <int R>
__device__ __forceinline__ void fold_fp8_wide_stage(float (&cur)[R / 2], const float (&d)[R / 2], float wsc,
                                                    const float* as, int t) {
#pragma unroll
  for (int q = 0; q < R / 8; ++q) {
    const float2 a2 = *reinterpret_cast<const float2*>(as + 8 * q + 2 * t);
    const float c0 = wsc * a2.x, c1 = wsc * a2.y;
#pragma unroll
    for (int e = 0; e < 4; ++e) cur[4 * q + e] = fmaf(d[4 * q + e], e & 1 ? c1 : c0, cur[4 * q + e]);
  }
}

// A thread's R / 2 results of a wide tile into the output staging tile (tile
// activation row c at c * stride bytes; f32 or bf16): its p_s, or with kTwoSets the
// running totals (s_tot[i * tot_cols + tot_col]). row0 = the thread's first weight row
// in the tile (64 * warpgroup + 16 * warp); g = lane / 4, t = lane % 4. Both wide
// kernels write their results with it.
template <int R, bool kTwoSets>
__device__ __forceinline__ void stage_wide_results(uint8_t* out, int stride, bool f32, const float (&cur)[R / 2],
                                                   const float* s_tot, int tot_col, int tot_cols, int row0, int g,
                                                   int t) {
#pragma unroll
  for (int q = 0; q < R / 8; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + g + 8 * (e >> 1), c = 8 * q + 2 * t + (e & 1);
      const float v = kTwoSets ? s_tot[(4 * q + e) * tot_cols + tot_col] : 0.0f + cur[4 * q + e];
      if (f32) *reinterpret_cast<float*>(out + c * stride + 4 * r) = v;
      else *reinterpret_cast<uint16_t*>(out + c * stride + 2 * r) = core::float_to_bf16(v);
    }
}

// Where a wide tile's results go: y from column col0, or, for a stacked pair's second weight
// with its own output (linear_pair), y1 from column col0 - n_split. store() writes v
// (f32, or rounded to bf16) for tile activation row c (output row out_rows[row_base + c],
// or row_base + c) and tile weight row r.
struct TileOutput {
  void* y;
  int64_t ld, col;
  __device__ __forceinline__ void store(const GemmParams& p, int row_base, int c, int r, float v) const {
    const int64_t orow = p.out_rows ? p.out_rows[row_base + c] : row_base + c;
    const int64_t idx = orow * ld + col + r;
    if (p.y_f32) static_cast<float*>(y)[idx] = v;
    else static_cast<uint16_t*>(y)[idx] = core::float_to_bf16(v);
  }
};
__device__ __forceinline__ TileOutput tile_output(const GemmParams& p, bool second, int64_t col0) {
  const bool to_y1 = second && p.y1 != nullptr;
  return TileOutput{to_y1 ? p.y1 : p.y, to_y1 ? p.ldy1 : p.ldy, to_y1 ? col0 - p.n_split : col0};
}

// Bytes a row of gemm_wide_kernel's staged output tile of esize-byte values (padded by
// 16: the scattered stores hit distinct banks).
__device__ __forceinline__ int wide_out_stride(int esize) { return kTileN * esize + 16; }

// A staged output tile (tile activation row c at staged + c * stride, esize-byte
// values) to its output rows (out_rows[row_base + c], or row_base + c; columns
// col_out.. of y_out) in 16-byte pieces, 8 a row (f32) or 16 (bf16), whole where the
// row and the piece allow; threads tid, tid + kThreads, ... Both wide kernels store
// with it.
template <int kThreads>
__device__ __forceinline__ void store_wide_tile(const int* out_rows, void* y_out, int64_t ld_out, int64_t col_out,
                                                int esize, const uint8_t* staged, int stride, int row_base, int rows,
                                                int valid_n, int tid) {
  const int pieces = kTileN * esize / 16, per = 16 / esize;
  const bool vec = (ld_out * esize) % 16 == 0 && (col_out * esize) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(y_out) % 16 == 0;
  for (int i = tid; i < rows * pieces; i += kThreads) {
    const int c = i / pieces, piece = i % pieces, r0 = piece * per;
    if (r0 >= valid_n) continue;
    const int64_t orow = out_rows ? out_rows[row_base + c] : row_base + c;
    uint8_t* dst = static_cast<uint8_t*>(y_out) + (orow * ld_out + col_out + r0) * esize;
    const uint8_t* src = staged + c * stride + r0 * esize;
    if (vec && r0 + per <= valid_n) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int k = 0; k < per && r0 + k < valid_n; ++k)
        for (int b = 0; b < esize; ++b) dst[k * esize + b] = src[k * esize + b];
    }
  }
}

// Plain or grouped GEMM (FP8, bf16, FP8-as-bf16) in tiles of 128 weight rows x R
// activation rows (R = 128, or 64 where 128-row tiles would leave SMs idle, or 256 for
// bf16 of one K slice from 129 rows: the weights cross from L2 once for 256 rows): grid
// (groups x tiles over n, ceil(m / R)), the row tile fastest in launch order (as
// gemm_kernel). Every CTA walks all K slices (no split): per slice p_s from zero,
// tot += p_s at its end.
//   FP8:  p_s = fmaf(d_st, 2^w * 2^x, p_s) per 128-wide stage st, d_st the tensor
//         core's chain of its 4 k32 chunks from zero; two sets of accumulators, so a
//         stage's chain is issued before the one before it is folded (ptxas
//         serializes these wgmmas, C7514; waiting for the chain first, as gemm_tile
//         does, measured the same step time: thirtieth session);
//   bf16: p_s = the tensor core's running sum over the slice's k16 chunks;
//   FP8-as-bf16 (wo_a, grouped): the e4m3 weights decoded to bf16 A fragments, a
//         stage's 4 k16 chunks summed by the tensor core from zero, then
//         p_s = fmaf(d_stage, 2^w, p_s): gemm_tile's sequence.
// All 256 threads issue the copies (4 weight and R / 32 activation pieces each a stage;
// FP8-as-bf16: 2 weight pieces). One CTA an SM (registers: up to 246 a thread for FP8
// at R = 128).
template <WFmt F, int R, bool kTwoSets>
__global__ void __launch_bounds__(kWideThreads, 1) gemm_wide_kernel(const GemmParams p) {
  constexpr int S = kWideStages;
  static_assert(R == 64 || R == 128 || (R == 256 && F == WFmt::kBf16 && !kTwoSets),
                "wide tiles: 64 or 128 activation rows (256: bf16 of one K slice)");
  static_assert(gemm_wide_smem_bytes<F, R, kTwoSets>() <= 227 * 1024, "wide tiles: shared memory");
  constexpr int NA = R / 2, kAPieces = R / 32;  // accumulators, act copies
  // R = 256 (bf16, one K slice): one m64n256 product a chunk into 128 accumulators, which
  // are the result: no p_s copy (registers), and the output tile is staged from them in
  // the last stage, right after its wait (read after the loop, ptxas serialized the chain).
  constexpr bool kStageInLoop = R == 256;
  static_assert(F == WFmt::kFp8 || F == WFmt::kBf16 || F == WFmt::kFp8Bf16, "wide tiles: FP8, bf16, FP8-as-bf16");
  using T = FmtTraits<F>;
  constexpr bool kQuant = F == WFmt::kFp8;
  constexpr bool kRegA = F == WFmt::kFp8Bf16;  // weights decoded into A fragments (wgmma RS)
  constexpr int kWRow = wide_weight_row_bytes<F>();
  constexpr int kStageBytes = kTileN * kWRow;  // weights (a multiple of 1024)
  static_assert(kStageBytes % 1024 == 0, "the activation stages stay 1024-aligned");
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023;
  uint8_t* smem = smem_raw + ((1024 - misalign) & 1023);
  uint8_t* s_w = smem;                                                       // [stages][128 rows][kWRow B]
  uint8_t* s_a = s_w + S * kStageBytes;                                      // [S][R rows][128 B]
  float* s_tot = reinterpret_cast<float*>(s_a + S * R * 128);                // kTwoSets: [NA][256] totals
  float* s_as = s_tot + (kTwoSets ? NA * kWideThreads : 0);                  // FP8: [S][R]
  uint8_t* s_bs = reinterpret_cast<uint8_t*>(s_as + (kQuant ? S * R : 0));   // block-scale row

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int linear = int(blockIdx.y * gridDim.x + blockIdx.x);
  const int m_tile = linear % int(gridDim.y), n_tile = linear / int(gridDim.y);
  // Groups (wo_a) only on the FP8-as-bf16 path; the others keep their one group's arithmetic.
  const int group = kRegA ? n_tile / p.tiles_per_group : 0, tile_n = kRegA ? n_tile % p.tiles_per_group : n_tile;
  const int row_base = m_tile * R, rows = min(R, p.m - row_base);
  const int n0 = tile_n * kTileN, valid_n = min(kTileN, p.n - n0);
  const bool second = n0 >= p.n_split;  // a stacked pair: this tile reads w1 (host keeps n_split % 128 == 0)
  const uint8_t* w = second ? p.w1 : p.w0;
  const uint8_t* sc = second ? p.s1 : p.s0;
  const int64_t wrow0 = kRegA ? int64_t(group) * p.n + n0 : n0 - (second ? p.n_split : 0);  // (no pair when grouped)
  const int64_t col0 = kRegA ? int64_t(group) * p.n + n0 : n0;
  const int stages_total = p.k / T::kStageK, per_slice = stages_total / p.slices;

  // Copies: piece c_part of rows c_row + 32 i, for weights (i < 4) and activations (i < R / 32);
  // FP8-as-bf16 weights (tile-major, fp8_bf16_layout.h: a stage is valid_n rows of 64 bytes):
  // piece tid % 4 of rows tid / 4 and tid / 4 + 64.
  const int c_row = tid >> 3, c_part = tid & 7;
  const int w_r0 = kRegA ? tid >> 2 : c_row, w_part = kRegA ? tid & 3 : c_part;
  const uint8_t* const w_src = kRegA ? w + wrow0 * p.w_row_bytes + 16 * tid
                                     : w + (wrow0 + w_r0) * p.w_row_bytes + w_part * 16;
  const int64_t w_step = kRegA ? 64 * T::kWBytes : 32 * p.w_row_bytes;
  const int64_t w_stage = kRegA ? int64_t(valid_n) * T::kWBytes : T::kWBytes;
  auto load_weights = [&](int st, int buf) {
    uint8_t* dw = s_w + buf * kStageBytes;
    const uint8_t* src = w_src + int64_t(st) * w_stage;
#pragma unroll
    for (int i = 0; i < (kRegA ? 2 : 4); ++i, src += w_step) {
      const int r = w_r0 + (kRegA ? 64 : 32) * i;
      const bool ok = r < valid_n;
      cp_async16_l2_128(dw + (kRegA ? r * kWRow + w_part * 16 : sw128_offset(r, w_part)), ok ? src : w, ok ? 16 : 0);
    }
  };
  // The weights nobody writes (and their block-scale row) stream in before the wait for
  // the activations' producer.
#pragma unroll
  for (int s = 0; s < S - 1; ++s)
    if (s < stages_total) load_weights(s, s);
  // The tile's 128 rows lie in one 128-row scale block (wrow0 % 128 == 0).
  const uint8_t* const scale_row = T::kBlockScale ? sc + (wrow0 / 128) * p.s_row_stride : nullptr;
  bool scale_row_copied = false;
  if constexpr (T::kBlockScale)
    scale_row_copied = copy_scale_row_async(s_bs, scale_row, p.s_row_stride, tid, kWideThreads);
  wait_for_predecessor();
  // Source row of tile row r (-1 past the rows: zero-filled); no shared copy, so the
  // prologue has no barrier: the loop's first one orders the block-scale stores below.
  auto source_row = [&](int r) { return r < rows ? (p.in_rows ? p.in_rows[row_base + r] : row_base + r) : -1; };
  if constexpr (T::kBlockScale) {
    if (!scale_row_copied)
      for (int i = tid; i < p.s_row_stride; i += kWideThreads) s_bs[i] = scale_row[i];
  }
  const uint8_t* a_src[kAPieces];
#pragma unroll
  for (int i = 0; i < kAPieces; ++i) {
    const int src_row = source_row(c_row + 32 * i);
    a_src[i] = src_row >= 0 ? p.a + int64_t(src_row) * p.a_row_bytes + (kRegA ? group * p.a_group_bytes : 0) +
                                  c_part * 16
                            : nullptr;
  }
  const float* as_src = nullptr;  // FP8: activation scales of tile row tid
  if (kQuant && tid < R) {
    const int src_row = source_row(tid);
    if (src_row >= 0) as_src = p.a_scale + int64_t(src_row) * p.a_scale_stride;
  }
  auto load_acts = [&](int st, int buf) {
    uint8_t* da = s_a + buf * R * 128;
#pragma unroll
    for (int i = 0; i < kAPieces; ++i)
      cp_async16(da + sw128_offset(c_row + 32 * i, c_part), a_src[i] ? a_src[i] + int64_t(st) * 128 : p.a,
                 a_src[i] ? 16 : 0);
    if constexpr (kQuant) {
      if (tid < R) cp_async4(s_as + buf * R + tid, as_src ? as_src + st : p.a_scale, as_src ? 4 : 0);
    }
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < stages_total) load_acts(s, s);
    cp_async_commit();
  }

  // p_s and the wgmma results in registers; the running total over slices (kTwoSets)
  // in shared memory, each thread's own column.
  constexpr int kSets = kQuant ? 2 : 1;
  constexpr int NCur = kStageInLoop ? 1 : NA;
  float cur[NCur], d[kSets][NA];
#pragma unroll
  for (int i = 0; i < NA; ++i) {
    if (i < NCur) cur[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < kSets; ++j) d[j][i] = 0.0f;
  }
  if constexpr (kTwoSets) {
#pragma unroll
    for (int i = 0; i < NA; ++i) s_tot[i * kWideThreads + tid] = 0.0f;
  }
  auto end_slice = [&] {  // slice boundary: fold p_s into the running total
    if constexpr (kTwoSets) {
#pragma unroll
      for (int i = 0; i < NA; ++i) {
        s_tot[i * kWideThreads + tid] += cur[i];
        cur[i] = 0.0f;
      }
    }
  };
  // FP8: stage st's chain (set st % 2) folded with its scale 2^w * 2^x, one per
  // column pair of the thread: p = fmaf(d, 2^w * 2^x, p); then the slice's end if
  // st ends it. Its activation scales are still in the stage's buffer (the next
  // copies into it go out after the fold).
  auto fold_stage = [&](unsigned st, bool last_of_slice) {
    if constexpr (kQuant) {
      const float wsc = core::e8m0_to_float(s_bs[st]);
      const float* as = s_as + (st % S) * R;
      if (st & 1) fold_fp8_wide_stage<R>(cur, d[1], wsc, as, t);  // (constant indices: the sets stay in registers)
      else fold_fp8_wide_stage<R>(cur, d[0], wsc, as, t);
      if constexpr (kTwoSets) {
        if (last_of_slice) end_slice();
      }
    }
  };
  bool prev_last = false;  // stage it-1 ends its slice
  int slice_pos = 0;  // position of stage `it` in its slice
  for (int it = 0; it < stages_total; ++it) {
    const bool slice_first = slice_pos == 0, slice_last = slice_pos == per_slice - 1;
    slice_pos = slice_last ? 0 : slice_pos + 1;
    cp_async_wait<S - 2>();  // stage `it` has landed (for this thread) ...
    fence_proxy_async();
    __syncthreads();  // ... for every thread; FP8: every warpgroup is done with stage it-1's buffer
    const unsigned uit = unsigned(it);  // (unsigned stage indices: no signed division)
    auto load_next = [&] {  // into the buffer of stage it-1
      const unsigned nxt = uit + S - 1;
      if (int(nxt) < stages_total) {
        load_weights(int(nxt), int(nxt % S));
        load_acts(int(nxt), int(nxt % S));
      }
      cp_async_commit();
    };
    if constexpr (kRegA) load_next();
    const int buf = int(uit % S);
    // The stage's descriptors: low words at the stage, chunk j 32j bytes on (wgmma_desc_at).
    const uint32_t a_lo = wgmma_desc_lo(smem_u32(s_w + buf * kStageBytes + wg * 64 * kWRow));
    const uint32_t b_lo = wgmma_desc_lo(smem_u32(s_a + buf * R * 128));
    if constexpr (kRegA) {
      // The warpgroup's 64 weight rows of the stage as bf16 A fragments (4 k16 chunks),
      // the chunks summed by the tensor core from zero, then one fold with the block scale.
      // Decoding stage it+1 under stage it's products (two fragment sets, as gemm_tile
      // does) measured +1.6% a step at 256 rows in 64-row tiles (a launch 95 against 69
      // µs) and +0.1% (within the noise) in 128-row ones (forty-second session). It waits
      // for stage it+1's copies a stage earlier, so one stage fewer is in flight (why it
      // loses: a guess, not profiled). The stage stays serial here.
      const float wsc = core::e8m0_to_float(s_bs[uit / 2]);
      const uint8_t* lo = s_w + buf * kStageBytes + (64 * wg + 16 * warp + g) * kWRow;
      uint32_t a[4][4];
      load_a_frags_e4m3_bf16(lo, lo + 8 * kWRow, t, [&](int j) -> uint32_t(&)[4] { return a[j]; });
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) wide_mma_rs<R>(d[0], a[j], wgmma_desc_at(b_lo, 32 * j), j == 0 ? 0 : 1);
      wgmma_commit();
      wgmma_wait_all();
#pragma unroll
      for (int i = 0; i < NA; ++i) cur[i] = fmaf(d[0][i], wsc, cur[i]);
    } else if constexpr (kQuant) {
      // FP8: the stage's 4 chunks chained in the tensor core from zero into set it % 2;
      // once wait_1 says stage it-1's chain is done, it is folded and its buffer takes
      // the next copies (after the barrier: every warpgroup is past it).
      auto issue = [&](float(&dd)[NA]) {
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j)
          wide_mma<F, R>(dd, wgmma_desc_at(a_lo, 32 * j), wgmma_desc_at(b_lo, 32 * j), j == 0 ? 0 : 1);
        wgmma_commit();
      };
      if (uit & 1) issue(d[1]);  // (constant indices: the sets stay in registers)
      else issue(d[0]);
      if (it > 0) {
        wgmma_wait_1();
        fold_stage(uit - 1, prev_last);
      }
      __syncthreads();
      load_next();
    } else {
      // bf16: the slice sum stays in the tensor core's accumulators, so one stage's
      // products stay in flight across the next stage's wait and barrier; the copies
      // then go into stage it-1's buffer once every warpgroup's products on it are done.
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (R == 256)
          wgmma_wide256_bf16(d[0], wgmma_desc_at(a_lo, 32 * j), wgmma_desc_at(b_lo, 32 * j),
                             slice_first && j == 0 ? 0 : 1);
        else
          wide_mma<F, R>(d[0], wgmma_desc_at(a_lo, 32 * j), wgmma_desc_at(b_lo, 32 * j), slice_first && j == 0 ? 0 : 1);
      }
      wgmma_commit();
      if (slice_last) {
        wgmma_wait_all();
        if constexpr (kStageInLoop) {  // (the last stage: no copies are in flight into the buffers)
          __syncthreads();
          stage_wide_results<R, false>(smem, wide_out_stride(p.y_f32 ? 4 : 2), p.y_f32 != 0, d[0], s_tot, tid,
                                       kWideThreads, 64 * wg + 16 * warp, g, t);
        } else {
#pragma unroll
          for (int i = 0; i < NA; ++i) cur[i] = d[0][i];
        }
      } else {
        wgmma_wait_1();
      }
      __syncthreads();
      load_next();
    }
    if constexpr (kTwoSets && !kQuant) {  // (FP8: in fold_stage, a stage later)
      if (slice_last) end_slice();
    }
    prev_last = slice_last;
  }
  cp_async_wait<0>();
  if constexpr (kQuant) {  // the last stage's chain
    wgmma_wait_all();
    if (stages_total > 0) fold_stage(unsigned(stages_total - 1), true);
  }
  if constexpr (!kQuant && !kRegA) wgmma_wait_all();  // (a no-op: the last stage ends a slice)
  allow_dependents_to_launch();  // only the epilogue is left

  const TileOutput out = tile_output(p, second, col0);
  // The output tile goes through shared memory (the stage buffers, free once every
  // warpgroup is past its last products): each thread's R / 2 values scattered over
  // R / 4 rows become whole 16-byte pieces of output rows. Row stride padded by 16 bytes:
  // the scattered stores hit distinct banks. (R = 256: staged in its last stage.)
  const int esize = p.y_f32 ? 4 : 2, stride = wide_out_stride(esize);
  if constexpr (!kStageInLoop) {
    __syncthreads();
    stage_wide_results<R, kTwoSets>(smem, stride, p.y_f32 != 0, cur, s_tot, tid, kWideThreads, 64 * wg + 16 * warp, g,
                                    t);
  }
  __syncthreads();
  store_wide_tile<kWideThreads>(p.out_rows, out.y, out.ld, out.col, esize, smem, stride, row_base, rows, valid_n, tid);
}

}  // namespace dsv4::ops::linear_kernels
