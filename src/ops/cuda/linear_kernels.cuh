// Device code of the linear family; cuda_linear.cu launches it (spec §2.4, §2.7,
// §2.8, §5.6, §6). Design and roofline numbers: docs/design/cuda-linear.md.
//
//   act_quant_kernel      bf16 rows -> e4m3 codes + per-128 power-of-two scales (spec §2.4)
//   gemm_kernel           the tensor-core GEMM behind linear, linear_bf16, grouped_linear, experts
//   expert_gemm_kernel    the same GEMM over a device-built list of (expert, rows) tiles
//   split_fold_kernel     the slice fold of a split GEMM with many rows
//   swiglu_quant_kernel   clamp + SwiGLU + routing weight, bf16, then quantization for w2 (spec §6.2)
//   moe_prep_kernel       routed experts' preparation: counting sort of the (row, slot) pairs
//                         by local expert and the tile list (block 0); up to 32 rows also x
//                         quantized and the rows of pairs routed to no local expert zeroed
//   zero_nonlocal_kernel  that zeroing alone (beyond 32 rows, and the simple path)
//   router_select_kernel  score function, top-k or hash ids, weights (spec §6.1)
//   router_gemm_select_kernel  the router's logits GEMM and router_select_kernel's select in one launch
//   simple_*              one warp per output element, fp32 FMA: the DSV4_CUDA_KERNELS=simple path
//
// Accumulation order of the GEMM (the two-batch-overlap bit-identity rule): an
// output element of an FP8 GEMM is computed as
//     d_st  = the tensor core's chain of stage st's four k32 (e4m3) steps from zero
//     p_s   = sum over the 128-wide stages st of slice s, in order, of fmaf(d_st, scale_st, p_s)
//     out   = ((0 + p_0) + p_1) + ... + p_{S-1}
// where scale_st is the exact power-of-two product of the weight block scale and the
// activation scale of that stage, and S the number of K slices, a function of (N, K)
// only (ops/gemm_order.h: gemm_k_slices). The e4m3 step is Hopper's (the products and
// the accumulator aligned to the largest and truncated 13 bits below it, the sum
// truncated to 14 bits: ref::hopper_e4m3_step, the CPU reference's
// QuantDotModel::kHopperWgmma; the tests check FP8 and FP4 GEMMs against it bit for
// bit). A stage's fold is DeepSeek's promotion interval (128); until the twenty-fifth
// session each k32 chunk started from zero and was folded on its own, before the step
// onto an accumulator had a model. Against that, per GB moved (the routing, and so
// the expert bytes, moves with the bits): ~0 at batch 16, -0.9% at 64, -0.8% at 256
// (bench-1g, H200; docs/BENCHMARKS.md). bf16 has no scales: p_s is the tensor core's own
// running sum over the slice's k16 chunks (wgmma with scale-d = 1 after the first).
// FP8-as-bf16 (wo_a) has one scale per 64-wide stage: the tensor core sums the
// stage's 4 k16 chunks, then p_s = fmaf(d_stage, 2^(w block), p_s). Tile sizes, the
// split of slices over CTAs (partials folded in slice order by the last CTA of a
// tile or by split_fold_kernel) or their sequential walk inside one CTA (a second
// accumulator set) never change this sequence, so a row's output does not depend
// on M or on the row's position.
// FP4 weights (a scale per row and 32 values, activations one per 128) start each
// k32 chunk from zero (their scales differ within a stage) and group the chunks of
// one 128-wide stage first: q = sum over its 4 chunks, in order, of
// fmaf(mma_c, 2^(weight scale_c), q) (mma_c: ref::hopper_e4m3_dot32), then
// p_s = fmaf(q, 2^(activation scale), p_s);
// the same rule holds. The kernel decodes FP4 weights as 2^-6 x their value (a
// cheaper decode) and multiplies the activation scale by 2^6: every mma_c and q is
// then exactly 2^-6 x the above and p_s the same number, unless a partial sum falls
// into fp32's subnormal range (weight scales below ~2^-100).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"
#include "core/scalar_math.h"
#include "ops/cuda/act_quant.cuh"
#include "ops/cuda/cluster.cuh"
#include "ops/cuda/cta_probe.cuh"
#include "ops/cuda/e4m3_cast.cuh"
#include "ops/cuda/mbarrier.cuh"
#include "ops/cuda/fp4_device_layout.h"
#include "ops/cuda/fp8_bf16_layout.h"
#include "ops/cuda/grid_dependency.cuh"
#include "ops/cuda/topk_rank.h"
#include "ops/cuda/wgmma.cuh"

namespace dsv4::ops::linear_kernels {

// ---- weight formats ---------------------------------------------------------------
enum class WFmt : int {
  kFp8 = 0,      // e4m3 [N, K], UE8M0 [ceil(N/128), ceil(K/128)]; activations e4m3 + per-128 scales
  kFp4 = 1,      // e2m1 packed [N, K/2] (fp4_device_layout.h's order), UE8M0 [N, K/32]; activations as kFp8
  kBf16 = 2,     // bf16 [N, K]; bf16 activations, no scales
  kFp8Bf16 = 3,  // e4m3 weight used dequantized (exact in bf16) with bf16 activations (wo_a, spec §5.6)
};

// How a format's tile products run (sm_90a): every format runs on wgmma (Hopper has
// no e4m3 mma.sync: the compiler emulates it with 12 conversions and 2 f16 HMMAs per
// m16n8k32), with both operands in shared memory where the weight bytes are the MMA
// bytes (FP8, bf16), with A in registers where they need a decode (FP4 nibbles,
// FP8-as-bf16's e4m3 -> bf16).
enum class Mma : int { kWgmmaRegA, kWgmmaSmemA };

// One pipeline stage covers 128 bytes of an MMA-format row (128 e4m3 or 64 bf16
// values) = 4 chunks of 32 bytes, one MMA each. kWStride: bytes per weight row in
// a stage buffer (no padding: FP4's and FP8-as-bf16's fragment reads are 16 bytes a
// row, two rows a quarter warp, and the wgmma shared-memory layout needs none; the
// 4-byte reads of FP8-as-bf16 in checkpoint order took rows of 80).
// kStages: cp.async pipeline depth (FP4's stages hold half the bytes, so it keeps
// one more in flight at the same 4 CTAs per SM).
template <WFmt F>
struct FmtTraits;
template <>
struct FmtTraits<WFmt::kFp8> {
  static constexpr bool kQuantAct = true, kBlockScale = true, kRowScale = false;
  static constexpr int kStageK = 128, kWBytes = 128, kWStride = 128, kStages = 3;
  static constexpr Mma kMma = Mma::kWgmmaSmemA;
};
template <>
struct FmtTraits<WFmt::kFp4> {
  static constexpr bool kQuantAct = true, kBlockScale = false, kRowScale = true;
  static constexpr int kStageK = 128, kWBytes = 64, kWStride = 64, kStages = 4;  // (16-byte fragment reads)
  static constexpr Mma kMma = Mma::kWgmmaRegA;
};
template <>
struct FmtTraits<WFmt::kBf16> {
  static constexpr bool kQuantAct = false, kBlockScale = false, kRowScale = false;
  static constexpr int kStageK = 64, kWBytes = 128, kWStride = 128, kStages = 3;
  static constexpr Mma kMma = Mma::kWgmmaSmemA;
};
template <>
struct FmtTraits<WFmt::kFp8Bf16> {
  static constexpr bool kQuantAct = false, kBlockScale = true, kRowScale = false;
  static constexpr int kStageK = 64, kWBytes = 64, kWStride = 64, kStages = 4;  // (4: gemm_tile's decode ahead)
  static constexpr Mma kMma = Mma::kWgmmaRegA;
};

constexpr int kThreads = 128;          // 4 warps, 32 weight rows each
constexpr int kTileN = 128;            // weight rows (output columns) per CTA
static_assert(kTileN == fp4_layout::kTileRows, "a CTA's FP4 weight rows are a stored tile");
constexpr int kMaxScaleBlocks = 256;   // FP8 block-scale row kept in smem: K <= 32768
constexpr int kMaxSlices = 32;
constexpr int kMaxTableExperts = 384;  // experts per launch (pointer table passed by value)
// FP4 row scales (4 bytes a row per stage, 8 once rewritten as bf16) come kScaleStages
// stages at a time, 16 bytes a row, into one of two buffers (see gemm_tile).
constexpr int kScaleStages = 4, kScaleRowBytes = 8 * kScaleStages;
static_assert(kScaleStages == fp4_layout::kScaleGroupStages, "a copied scale group is a stored one");

// Activation bytes of one stage buffer: 8*NT rows of 128 bytes (128-byte swizzle).
template <int NT>
__host__ __device__ constexpr int gemm_a_stage_bytes() {
  return 8 * NT * 128;
}

// Dynamic shared memory of gemm_kernel<F, NT, *> (kTmaW: expert_gemm_kernel with TMA
// weight stages, whose rows are dense, and a raw scale group); the layout is carved in
// gemm_tile.
template <WFmt F, int NT, bool kTmaW = false>
__host__ __device__ constexpr int gemm_smem_bytes() {
  using T = FmtTraits<F>;
  constexpr int S = T::kStages;
  return 1024 /* alignment slack */ + S * kTileN * (kTmaW ? T::kWBytes : T::kWStride) + S * gemm_a_stage_bytes<NT>() +
         (T::kRowScale ? 2 * kTileN * kScaleRowBytes : 0) + (T::kQuantAct ? S * 8 * NT * 4 : 0) +
         (T::kBlockScale ? kMaxScaleBlocks : 0) + 8 * NT * 4 + 16 + (T::kRowScale ? 8 * S + 8 : 0) +
         (kTmaW && T::kRowScale ? 16 + kTileN * 4 * kScaleStages : 0);
}

// Per-local-expert weight pointers: {w1.weight, w1.scale, w3.weight, w3.scale}
// for gate/up, {w2.weight, w2.scale, -, -} for the down projection.
struct ExpertTable {
  const uint8_t* p[kMaxTableExperts][4];
};

struct GemmParams {
  // Weights: `groups` blocks of n rows of k values; for the gate/up pair, rows
  // >= n_split come from (w1, s1) at row - n_split (n_split = n otherwise).
  const uint8_t* w0;
  const uint8_t* s0;
  const uint8_t* w1;
  const uint8_t* s1;
  int64_t w_row_bytes;   // bytes of one weight row
  int64_t s_row_stride;  // FP8: scale bytes per 128-row block (ceil(k/128)); FP4: k/32
  int n;                 // weight rows per group = output columns per group
  int n_split;
  int k;                 // reduction length per group
  int groups;
  int tiles_per_group;   // ceil(n / kTileN)
  // Activations: row r of group g starts at a + r * a_row_bytes + g * a_group_bytes.
  const uint8_t* a;
  int64_t a_row_bytes;
  int64_t a_group_bytes;
  const float* a_scale;  // quantized activations: [rows, a_scale_stride] powers of two
  int64_t a_scale_stride;
  const int* in_rows;    // optional gather: tile row i reads activation row in_rows[row_base + i]
  int m;                 // activation rows (plain launches)
  // Output: element (row, col) at y[out_row * ldy + col], col = g * n + weight row;
  // with y1 set (one group), columns >= n_split go to y1[out_row * ldy1 + col - n_split]
  // instead (two linears of one input, linear_pair).
  void* y;
  int64_t ldy;
  void* y1;
  int64_t ldy1;
  int y_f32;
  const int* out_rows;   // optional scatter: out_row = out_rows[row_base + i]
  // K slices (see the header comment): slices = S; split = S (one slice per CTA,
  // blockIdx.z) or 1 (each CTA walks all slices).
  int slices;
  int split;
  // When split > 1: [split, partial_rows, partial_cols]; tile-major, [tiles, split,
  // BM, kTileN], where a plain GEMM's 16-32-row tiles fold themselves (counters set).
  float* partial;
  int64_t partial_rows;
  int64_t partial_cols;
  int* counters;         // per tile arrival counters, zero between launches; null: split_fold_kernel folds
  // Expert launches: tile list {local expert, first compact row, rows, -}.
  const int4* tiles;
  const int* num_tiles;
  int chunk_begin;       // local experts [chunk_begin, chunk_end) are in this launch's table
  int chunk_end;
  int n_tile_offset;     // expert launches: weight tile of blockIdx.x 0 (DSV4_CUDA_EXPERT_LAUNCHES, a diagnostic)
  // Expert launches whose tile list is older than their predecessor (host: the down GEMM,
  // launched after SwiGLU, whose wait for the gate/up GEMM came after the gate/up GEMM's
  // wait for moe_prep, which wrote the list): the list (through L2) and the first weight
  // stages are read before the dependency wait, as the plain GEMMs read their weights.
  int weights_before_wait;
  // FP4 launches that split their K slices over CTAs: a slice of whole row-scale groups
  // copies a group at a time, as a walked one does (gemm_tile), not 4 bytes a stage.
  int split_scale_groups;
  // Plain GEMMs: the dependent kernel may launch at this one's entry, before its wait,
  // instead of after its main loop (the rule: release_at_entry() in cuda_linear.cu).
  int release_at_entry;
  // Optional, where a split plain GEMM's fold forms whole rows of 128-column blocks (its
  // last CTAs or split_fold_kernel; run_gemm sets it only there): y's e4m3 codes
  // [m][ldq] in element order and UE8M0 scales [m][ldq / 128] as well, act_quant's bits
  // for y's bf16 values, so that the linear reading y needs no quantization launch.
  uint8_t* yq;
  float* ys;
  int64_t ldq;
  // Plain GEMMs' batched last-CTA fold (fold_tile_slices): a 16-row tile of at most 8 rows
  // folds slabs of 8 outputs and twice the slices (run_gemm: DSV4_CUDA_FOLD_HALF_ROWS, on by default).
  int fold_half_rows;
};

// ---- small helpers ------------------------------------------------------------------
constexpr int kMaxClusterFold = 8;  // slices a cluster folds (the portable cluster size)
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One 128-wide activation block quantized by a warp, lane l holding its values 4l ..
// 4l + 3: the lane's four e4m3 codes, and the block's exponent in e (its scale is 2^e).
// act_quant_item, swiglu_quant_item and the GEMM folds that quantize (GemmParams::yq)
// share it, so their codes and scales are one arithmetic. Every lane calls it (the
// shuffles take all 32).
__device__ __forceinline__ uint32_t quant4_warp_block(const float (&v)[4], int& e) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
  e = act_exponent(warp_max(amax));
  return quant4_e4m3(v, core::pow2_float(-e));
}

// The same, codes to block[4l ..] in element order and the scale (lane 0) to *scale.
__device__ __forceinline__ void quant_block_warp(const float (&v)[4], uint8_t* block, float* scale, int lane) {
  int e;
  *reinterpret_cast<uint32_t*>(block + 4 * lane) = quant4_warp_block(v, e);
  if (lane == 0) *scale = core::pow2_float(e);
}

// act_exponent, quant4_e4m3: act_quant.cuh (shared with the norms that quantize).

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}

// The same for weight bytes, with the L2 prefetch hint: the L2 fetches the aligned
// 128 bytes around the piece from DRAM in one request, i.e. the row's bytes of the
// next stage too (FP4 stages are 64 bytes per row). Measured on bench-1g (H200):
// expert stage -9% / -6% at batch 16 / 64, the rest unchanged; 256 bytes was no
// better for FP4 and slower at batch 1 for the others.
__device__ __forceinline__ void cp_async16_l2_128(void* dst, const void* src, int src_bytes) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// mbarrier + bulk tensor copy (sm_90). The stage's weight bytes arrive through the
// TMA: one thread posts the expected byte count and issues the copy; every thread
// waits for the barrier's phase to flip.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The tile's block-scale row (FP8 weights: a UE8M0 byte per 128-wide K block) copied
// into shared memory by cp.async, in 16- or 4-byte pieces, where the row and the
// buffer allow it (the same answer in every thread). A weight, so the copy can go out
// before the dependency wait; it lands with the copy group committed next, i.e. with
// the first stage. Returns false where the caller must copy the row itself. (Copied
// after the wait with byte loads, it cost every launch a memory round trip before the
// first activation copies: ncu put the prologue at a large part of a batch-1 GEMM.)
__device__ __forceinline__ bool copy_scale_row_async(uint8_t* s_bs, const uint8_t* srow, int bytes, int tid,
                                                     int threads) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(srow) | smem_u32(s_bs);
  const int piece = bytes % 16 == 0 && a % 16 == 0 ? 16 : bytes % 4 == 0 && a % 4 == 0 ? 4 : 0;
  if (piece == 0) return false;
  for (int i = piece * tid; i < bytes; i += piece * threads) {
    if (piece == 16) cp_async16(s_bs + i, srow + i, 16);
    else cp_async4(s_bs + i, srow + i, 4);
  }
  return true;
}
// prmt.b32 in its default mode: byte n of the result is byte (sel nibble n & 7) of
// {b, a}, or, when the nibble's bit 3 is set, that byte's sign bit replicated.
// (__byte_perm documents only the 3-bit selection, hence the asm.)
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// ---- wgmma (sm_90a): descriptors, fences and the register-A wrappers in ops/cuda/wgmma.cuh ----
using namespace tensor_core;

// d = A * B + (scale_d ? d : 0), both operands from shared memory: A 64 weight rows
// x 32 bytes, B 32 bytes x 8*NT activation rows (e4m3: k32; bf16: k16, not
// transposed); ops/cuda/wgmma.cuh's wrappers per format.
template <WFmt F, int NT>
__device__ __forceinline__ void wgmma_ss(float (&d)[4 * NT], uint64_t da, uint64_t db, int scale_d) {
  static_assert(F == WFmt::kFp8 || F == WFmt::kBf16, "shared-memory A: FP8 or bf16 weights");
  if constexpr (F == WFmt::kFp8) wgmma_e4m3_ss<NT>(d, da, db, scale_d);
  else wgmma_bf16_ss<NT>(d, da, db, scale_d);
}

// ---- fragment loads (A in registers) ---------------------------------------------------
// Lane (g = lane/4, t = lane%4) fills the A registers of rows g and g + 8 of its warp's
// 16 rows: {a0, a2} for row g, {a1, a3} for row g + 8 (lo_row / hi_row: their
// stage-buffer rows). B comes from shared memory in the activations' own order, so
// the registers must hold the k the hardware assigns to them.
//
// FP4 (k32 e4m3): a0 holds logical k 4t..4t+3, a2 k 16+4t..16+4t+3. Lane t's word
// of chunk j (fp4_device_layout.h: elements 8t..8t+7 of the chunk) gives its even
// elements to a0 and the odd ones to a2, so the activations store each 32-byte chunk
// as its 16 even elements, then its 16 odd ones (split_pairs, store_quant4). A row's
// words of all 4 chunks are lane t's 16-byte piece of the row's stage (at piece t, or
// t ^ ((row >> 1) & 3) in a TMA stage with the 64-byte swizzle): lo / hi, the words
// of rows g and g + 8.
__device__ __forceinline__ void fp4_a_frag(uint32_t lo, uint32_t hi, uint32_t (&a)[4]) {
  const fp4_layout::E4m3Pair l = fp4_layout::word_to_e4m3_div64(lo), h = fp4_layout::word_to_e4m3_div64(hi);
  a[0] = l.even;
  a[1] = h.even;
  a[2] = l.odd;
  a[3] = h.odd;
}

// FP8-as-bf16 (k16 bf16): a0 holds k 2t, 2t+1 and a2 k 8+2t, 9+2t of chunk j, each
// pair converted exactly to two bf16. The weights are stored in device order
// (fp8_bf16_layout.h): lane t's 16-byte piece t of a row's 64-byte stage holds, as
// word j, chunk j's bytes 2t, 2t+1, 8+2t, 9+2t, so one 16-byte load a row gives the
// lane its 8 pairs of the stage (in checkpoint order it took 8 two-byte loads).
//
// The decode is e4m3x2_times_bf16x2 (e4m3_cast.cuh) by 2^120. Against cvt to f16,
// then f32, then bf16: -0.3% a step at batch 1 and -0.6% at 64 rows, +0.2% at 16 (A/B,
// 2 rounds, apart; docs/BENCHMARKS.md, forty-seventh session). The stage on f16 operands
// instead (the tensor core's f16 step is its bf16 step on the same values, so the bits
// hold): +2.6 / +3.1% a step at batch 1 with the weights by cvt / by integer steps
// (cuda-linear.md, "An f16 stage for wo_a"; fifty-ninth session). The two NaN codes (0x7f,
// 0xff) read as +-480 here, where the CPU gives NaN; quantized checkpoints hold none.
// sel 0x9180: bytes 0, 1 of w (the pair k 2t, 2t+1); 0xB3A2: bytes 2, 3 (k 8+2t, 9+2t).
template <uint32_t kSel>
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t w) {
  return e4m3x2_times_bf16x2<kSel>(w, 0x7b807b80u);  // 2^120 in both halves
}

// The 4 chunks' A fragments of rows lo_row and hi_row (g and g + 8 of a warp's 16) of
// a stage buffer, lane t: frag(j) names chunk j's 4 registers.
template <typename Frag>
__device__ __forceinline__ void load_a_frags_e4m3_bf16(const uint8_t* lo_row, const uint8_t* hi_row, int t,
                                                       Frag&& frag) {
  const uint4 lo = *reinterpret_cast<const uint4*>(lo_row + 16 * t);
  const uint4 hi = *reinterpret_cast<const uint4*>(hi_row + 16 * t);
  const uint32_t lw[4] = {lo.x, lo.y, lo.z, lo.w}, hw[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t(&a)[4] = frag(j);
    a[0] = e4m3x2_to_bf16x2<0x9180>(lw[j]);
    a[1] = e4m3x2_to_bf16x2<0x9180>(hw[j]);
    a[2] = e4m3x2_to_bf16x2<0xB3A2>(lw[j]);
    a[3] = e4m3x2_to_bf16x2<0xB3A2>(hw[j]);
  }
}

// ---- the GEMM ---------------------------------------------------------------------
// fn(i, q, e) for each of a thread's 2 x NT x 4 accumulator elements, unrolled:
// weight row tile_row(i, e / 2), activation column 8q + 2t + e % 2.
template <int NT, typename Fn>
__device__ __forceinline__ void for_each_acc(Fn&& fn) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int q = 0; q < NT; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) fn(i, q, e);
}
// The fold of a split tile by its last CTA, for one weight row: output c of the
// row (c < rows <= BM) is ((0 + p_0) + p_1) + ... + p_{S-1}, the order of
// split_fold_kernel and of the sequential mode. A slab of slices' loads, of the first
// RB outputs of the row (kFoldLoads in all), goes out before their adds (one L2 round
// trip a slab): the loop it replaced, one output's loads at a time, took ~16 round trips
// at 16 rows (16% of wo_a's stall samples at batch 16, ncu, twenty-third session).
// With RB < BM (the caller: rows <= RB) a slab covers the first RB outputs and
// kFoldLoads / RB slices, so a tile of few rows takes fewer round trips: at 2 rows a
// 16-row tile's 32 slices took 8 slabs, 5-15 µs by the CTA probe (ninety-eighth session).
// src: slice 0's value of output 0 in the tile-major layout (GemmParams::partial), slices
// BM x kTileN and outputs kTileN floats apart, so every load of a slab is one
// address plus a constant; store(c, v) writes output c.
constexpr int kFoldLoads = 64;
// Whether a plain GEMM's split tiles of 8 x nt rows take this batched fold.
constexpr bool batched_fold_tiles(int nt) { return nt == 2 || nt == 4; }
template <int BM, int RB, typename Store>
__device__ __forceinline__ void fold_tile_slices(const float* src, int split, int rows, Store&& store) {
  static_assert(RB <= BM, "a slab's outputs are the tile's first RB");
  constexpr int kSlab = RB >= kFoldLoads ? 1 : kFoldLoads / RB;
  constexpr int kSliceStride = BM * kTileN;
  float v[RB];
#pragma unroll
  for (int c = 0; c < RB; ++c) v[c] = 0.0f;
#pragma unroll 1
  for (int s0 = 0; s0 < split; s0 += kSlab) {
    const float* slab = src + int64_t(s0) * kSliceStride;
    float part[kSlab][RB];
#pragma unroll
    for (int j = 0; j < kSlab; ++j)
#pragma unroll
      for (int c = 0; c < RB; ++c)
        part[j][c] = s0 + j < split && c < rows ? __ldcg(slab + j * kSliceStride + c * kTileN) : 0.0f;
#pragma unroll
    for (int j = 0; j < kSlab; ++j)
#pragma unroll
      for (int c = 0; c < RB; ++c)
        if (s0 + j < split) v[c] += part[j][c];
  }
#pragma unroll
  for (int c = 0; c < RB; ++c) {
    if (c >= rows) break;
    store(c, v[c]);
  }
}

// The last CTA's fold of a split GEMM whose partials are row-major ([slice][partial_rows]
// [partial_cols]): each of the tile's outputs, its S partials added in slice order,
// ((0 + p_0) + p_1) + ..., as split_fold_kernel does, by `threads` threads, handed to
// store(c, r, v) (c: tile activation row, r: tile weight row): gemm_tile's tiles other
// than the batched ones (fold_tile_slices).
// (Its slices' loads in groups of 8 ahead of their adds, the same order, measured -0.3% a
// step at 8 rows but +0.2% at 1 and 16 (sixtieth session, 2 rounds): not kept. A form
// with a test before each load serialized the loads: +1.5% / +4.7% at 1 / 8 rows.)
template <int BM, typename Store>
__device__ __forceinline__ void fold_row_major_slices(const GemmParams& p, int64_t row_base, int64_t col0, int rows,
                                                      int valid_n, int tid, int threads, Store&& store) {
  for (int e = tid; e < kTileN * BM; e += threads) {
    const int r = e % kTileN, c = e / kTileN;
    if (r >= valid_n || c >= rows) continue;
    float v = 0.0f;
    for (int s = 0; s < p.split; ++s)
      v += __ldcg(p.partial + (int64_t(s) * p.partial_rows + row_base + c) * p.partial_cols + col0 + r);
    store(c, r, v);
  }
}

// One CTA: kTileN = 128 weight rows x BM = 8*NT activation rows, over the stages of
// its K range, 3-stage cp.async pipeline, one tensor-core product per 32-byte chunk
// (two m64 wgmma halves of the tile, warp w owning rows 16w..16w+15 of each), fp32
// partial sums per (row, column) in registers. FP4 weights are tile-major
// (fp4_device_layout.h): a stage of the tile is one run of valid_n x 64 bytes, its
// rows' pieces swizzled. kTmaW (FP4 experts, whole tiles): each stage comes by one
// TMA bulk copy; otherwise by cp.async, 16 bytes a thread.
// kExpertLaunch (expert_gemm_kernel's small-row forms): GemmParams::weights_before_wait
// decides the early weights at run time, and split slices may copy whole scale groups
// (GemmParams::split_scale_groups). The other callers (the fused expert kernel among them)
// keep their code as before either choice existed: the fused kernel's short-circuited
// scale-group test had kept a 16-bit flag that its stage loop re-tested, and 16 rows read
// 0.4% slower at the fifty-seventh session's end than at its start (fifty-eighth session,
// 3 rounds apart).
// Wait (the early-weights path's wait, after the first weight stages): the grid
// dependency wait by default; the split fused expert step's down items wait for their
// list tile's ready flag instead (ReadyFlagWait).
template <WFmt F, int NT, bool kTwoSets, bool kEarlyWeights, bool kTmaW = false, bool kClusterFold = false,
          bool kExpertLaunch = false, typename Wait = PredecessorWait>
__device__ __forceinline__ void gemm_tile(const GemmParams& p, const uint8_t* w0, const uint8_t* s0,
                                          const uint8_t* w1, const uint8_t* s1, int tile_n, int group, int row_base,
                                          int rows, int tile_id, const Wait& wait = Wait{}) {
  using T = FmtTraits<F>;
  static_assert(!kTmaW || (F == WFmt::kFp4 && !kEarlyWeights), "TMA weight stages: FP4 expert GEMMs only");
  // (marks of gemm_kernel's tiles; the expert kernels stamp their own)
  constexpr CtaProbeSite kProbeSite = kEarlyWeights ? CtaProbeSite::kGemmTile : CtaProbeSite::kNone;
  // Bytes between weight rows in a stage buffer: TMA stages are dense, the cp.async
  // ones kWStride apart (gemm_smem_bytes sizes both; for FP4 they are the same).
  constexpr int kWRow = kTmaW ? T::kWBytes : T::kWStride;
  constexpr int kWStage = kTileN * kWRow;  // a multiple of 1024
  constexpr int BM = 8 * NT;  // NT 8-row column groups of accumulators, one wgmma for all of them
  extern __shared__ __align__(16) uint8_t smem_raw[];
  // 1024-aligned (the swizzle atoms; gemm_smem_bytes reserves the slack), and every
  // stage buffer below is a multiple of 1024 bytes.
  constexpr bool kSmemA = T::kMma == Mma::kWgmmaSmemA;
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023;
  uint8_t* smem = smem_raw + ((1024 - misalign) & 1023);
  constexpr int kStages = T::kStages, kAStage = gemm_a_stage_bytes<NT>();  // activation bytes per stage
  uint8_t* s_w = smem;                                  // [kStages][kTileN][kWStride], swizzled for kWgmmaSmemA
  uint8_t* s_a = s_w + kStages * kWStage;  // [kStages][kAStage]
  uint8_t* s_ws = s_a + kStages * kAStage;  // FP4: [2][kTileN][kScaleRowBytes] scale bytes
  float* s_as = reinterpret_cast<float*>(s_ws + (T::kRowScale ? 2 * kTileN * kScaleRowBytes : 0));  // [kStages][BM]
  uint8_t* s_bs = reinterpret_cast<uint8_t*>(s_as + (T::kQuantAct ? kStages * BM : 0));      // block-scale row
  int* s_rows = reinterpret_cast<int*>(s_bs + (T::kBlockScale ? kMaxScaleBlocks : 0));       // [BM] source rows
  int* s_flag = s_rows + BM;
  // FP4 TMA stages: one 8-byte mbarrier per stage buffer, by shared address; then the
  // raw bytes of one scale group (kTileN x 16, 16-byte aligned for the bulk copy).
  const uint32_t s_mbar = (smem_u32(s_flag + 1) + 7) & ~7u;
  const uint32_t s_ws_raw = (s_mbar + 8 * kStages + 15) & ~15u;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // Tile weight row of fragment half i (0, 1), element row h (0: g, 1: g + 8).
  auto tile_row = [&](int i, int h) { return 64 * i + 16 * warp + g + 8 * h; };
  const int n0 = tile_n * kTileN;  // first weight row of the tile inside its group
  const int valid_n = min(kTileN, p.n - n0);
  const bool second = n0 >= p.n_split;  // gate/up pair: this tile reads w3 (host keeps n_split % 128 == 0)
  const uint8_t* w = second ? w1 : w0;
  const uint8_t* sc = second ? s1 : s0;
  const int64_t wrow0 = int64_t(group) * p.n + n0 - (second ? p.n_split : 0);
  const int64_t col0 = int64_t(group) * p.n + n0;
  // FP4: the tile's stages, one after another (tile-major; wrow0 % 128 == 0).
  const uint8_t* const w_tile = w + wrow0 * p.w_row_bytes;

  const int stages_total = p.k / T::kStageK;
  const int per_slice = stages_total / p.slices;
  const int slice = p.split > 1 ? int(blockIdx.z) : 0;
  const int st_begin = slice * per_slice;
  const int iters = p.split > 1 ? per_slice : stages_total;

  // Per-thread source pointers of a stage's copies, at stage 0 (null: zero-fill),
  // computed once: the stage loop only adds st * bytes per stage.
  constexpr int kChunksPerRow = T::kWBytes / 16;
  constexpr int kWChunks = kTileN * kChunksPerRow / kThreads;  // weight copies per thread
  constexpr int kRowStep = kThreads / kChunksPerRow;            // rows between them
  constexpr int kAChunks = (BM * 8 + kThreads - 1) / kThreads;  // activation copies per thread
  const int w_r0 = tid / kChunksPerRow, w_part = tid % kChunksPerRow;
  // FP4 and FP8-as-bf16 rows are kWBytes apart in a stage run of valid_n rows (copied
  // as stored: the readers undo FP4's swizzle; fp4_device_layout.h, fp8_bf16_layout.h);
  // other formats' rows w_row_bytes apart. A thread's pieces of a tile-major stage are
  // then 16 tid + kThreads * 16 i: constant offsets from one pointer.
  constexpr bool kTileMajor = F == WFmt::kFp4 || F == WFmt::kFp8Bf16;
  const uint8_t* const w_src = kTileMajor ? w_tile + w_r0 * T::kWBytes + w_part * 16
                                          : w + (wrow0 + w_r0) * p.w_row_bytes + w_part * 16;
  const int64_t w_step = int64_t(kRowStep) * (kTileMajor ? T::kWBytes : p.w_row_bytes);
  const int64_t w_stage = kTileMajor ? int64_t(valid_n) * T::kWBytes : T::kWBytes;
  // FP4 row scales, tile-major (fp4_device_layout.h: scale_offset): group q of the
  // tile's stages (kScaleStages, fewer in the last) is valid_n rows of 4 x (its stages)
  // bytes at q * valid_n * 16. Stage st's 4 scales of row r are read as 4 bf16 at byte
  // (st % kScaleStages) * 8 of row r in buffer (st / kScaleStages) % 2
  // (fp4_layout::e8m0x4_to_bf16x2; thread r rewrites its row's raw bytes so, once, at
  // the top of the stage). Where the CTA walks whole groups (all its stages, from stage
  // 0, a whole number of groups; or, with GemmParams::split_scale_groups, a K slice of
  // whole groups), the stage that starts a group copies the group: one
  // bulk copy of its kTileN x 16 bytes to s_ws_raw in the TMA path (converted after the
  // stage's barrier wait), or 16 bytes a row to bytes 16..31 of the row (converted in
  // place before the barrier); otherwise each stage copies its own 4 bytes a row to
  // byte (st % kScaleStages) * 8 + 4 (4-byte copies measured 0.6% faster at batch 1,
  // where the expert CTAs split their slices). A group's buffer is written again
  // kScaleStages stages later, by the load of a stage kStages - 1 ahead, after the
  // group's last stage is done; s_ws_raw, one group ahead, after the group's
  // conversion. The bf16 form against each reader converting the raw bytes (~50
  // instructions a stage): -1.5 / -1.5 / -2.2% a step at batch 16 / 64 / 256, +0.7% at
  // batch 1 (eighteenth session).
  const uint8_t* const ws_tile = T::kRowScale ? sc + wrow0 * p.s_row_stride : nullptr;
  const bool ws_row = T::kRowScale && tid < valid_n;
  bool ws_sectors;  // (two expressions: one with kExpertLaunch folded into it changed the other callers' PTX)
  if constexpr (kExpertLaunch)
    ws_sectors = T::kRowScale && stages_total % kScaleStages == 0 && reinterpret_cast<uintptr_t>(sc) % 16 == 0 &&
                 (p.split == 1 || (p.split_scale_groups != 0 && per_slice % kScaleStages == 0));
  else
    ws_sectors = T::kRowScale && p.split == 1 && stages_total % kScaleStages == 0 &&
                 reinterpret_cast<uintptr_t>(sc) % 16 == 0;
  auto load_weights = [&](int st, int buf) {
    uint8_t* dw = s_w + buf * kWStage;
    if constexpr (kTmaW) {
      if (tid == 0) {  // the host sends only whole 128-row tiles this way
        const bool group = ws_sectors && unsigned(st) % kScaleStages == 0;  // ... and the scale group it starts
        constexpr int kGroupBytes = kTileN * 4 * kScaleStages;
        mbar_expect_tx(s_mbar + 8 * buf, kWStage + (group ? kGroupBytes : 0));
        tma_bulk_load(smem_u32(dw), w_tile + int64_t(st) * kWStage, kWStage, s_mbar + 8 * buf);
        if (group)
          tma_bulk_load(s_ws_raw, ws_tile + int64_t(unsigned(st) / kScaleStages) * kGroupBytes, kGroupBytes,
                        s_mbar + 8 * buf);
      }
    } else if (F == WFmt::kFp8Bf16 && valid_n == kTileN) {
      // A whole FP8-as-bf16 tile (wo_a's are): no row test, no zero-fill select; the
      // stage's source and destination offsets are constants (its shared rows are dense).
      static_assert(F != WFmt::kFp8Bf16 || T::kWStride == T::kWBytes, "a stage buffer is the stage's run as stored");
      const uint8_t* src = w_src + int64_t(st) * (kTileN * T::kWBytes);
#pragma unroll
      for (int i = 0; i < kWChunks; ++i) cp_async16_l2_128(dw + 16 * tid + i * 16 * kThreads, src + i * w_step, 16);
    } else {
      const uint8_t* src = w_src + int64_t(st) * w_stage;
#pragma unroll
      for (int i = 0; i < kWChunks; ++i, src += w_step) {
        const int r = w_r0 + i * kRowStep;
        const bool ok = r < valid_n;
        const int off = kSmemA ? sw128_offset(r, w_part) : r * T::kWStride + w_part * 16;
        cp_async16_l2_128(dw + off, ok ? src : w, ok ? 16 : 0);
      }
    }
    if constexpr (T::kRowScale) {  // FP4: the 4 group scales of each row for this 128-wide stage
      static_assert(kThreads == kTileN, "one thread per weight row copies its scales");
      static_assert(kScaleStages >= kStages, "a scale buffer is rewritten only after its stages are done");
      const unsigned ust = unsigned(st);  // (unsigned: a shift and a mask, not a signed division)
      uint8_t* dst = s_ws + (((ust / kScaleStages) & 1) * kTileN + tid) * kScaleRowBytes;
      const unsigned q = ust / kScaleStages;
      const uint8_t* group = ws_tile + int64_t(q) * valid_n * (4 * kScaleStages);
      if (!ws_sectors) {
        const int group_bytes = 4 * min(kScaleStages, stages_total - int(q) * kScaleStages);
        const uint8_t* src = group + tid * group_bytes + (ust % kScaleStages) * 4;
        cp_async4(dst + (ust % kScaleStages) * 8 + 4, ws_row ? src : sc, ws_row ? 4 : 0);
      } else if (!kTmaW && ust % kScaleStages == 0) {
        cp_async16(dst + 16, ws_row ? group + tid * 16 : sc, ws_row ? 16 : 0);
      }
    }
  };

  // Plain GEMMs read weights nobody writes: their first stages stream in before the
  // wait for the kernel that produces the activations (programmatic dependent launch:
  // the wait returns once that kernel has finished). Expert GEMMs wait at entry where
  // their tile list is the predecessor's output, and here otherwise
  // (GemmParams::weights_before_wait); TMA stages need their barriers first.
  const bool early_weights = kEarlyWeights || (kExpertLaunch && p.weights_before_wait != 0);
  // The tile's 128 rows lie in one 128-row scale block (host: wrow0 % 128 == 0).
  const uint8_t* const scale_row = T::kBlockScale ? sc + (wrow0 / 128) * p.s_row_stride : nullptr;
  bool scale_row_copied = false;
  auto init_stage_barriers = [&] {
    if (tid == 0) {
      for (int s = 0; s < kStages; ++s) mbar_init(s_mbar + 8 * s, 1);
      mbar_init_fence();
    }
  };
  if (kEarlyWeights && p.release_at_entry) allow_dependents_to_launch();
  if (early_weights) {
    if constexpr (kTmaW) init_stage_barriers();  // (thread 0 inits, then issues the copies)
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s)
      if (s < iters) load_weights(st_begin + s, s);
    if constexpr (T::kBlockScale)
      scale_row_copied = copy_scale_row_async(s_bs, scale_row, p.s_row_stride, tid, kThreads);
    wait();
  }
  if (tid < BM) s_rows[tid] = tid < rows ? (p.in_rows ? p.in_rows[row_base + tid] : row_base + tid) : -1;
  if constexpr (T::kBlockScale) {
    if (!scale_row_copied)
      for (int i = tid; i < p.s_row_stride; i += kThreads) s_bs[i] = scale_row[i];
  }
  if constexpr (kTmaW) {
    if (!early_weights) init_stage_barriers();
  }
  __syncthreads();
  DSV4_CTA_PROBE(kProbeSite, 1, w0);  // waited
  auto a_source = [&](int i) -> const uint8_t* {
    const int c = tid + i * kThreads;
    const int src_row = c < BM * 8 ? s_rows[c >> 3] : -1;
    return src_row >= 0 ? p.a + int64_t(src_row) * p.a_row_bytes + group * p.a_group_bytes + (c & 7) * 16 : nullptr;
  };
  // Up to 2 activation pointers stay in registers; NT = 8 (4 per thread) recomputes
  // them per stage from s_rows, where registers are short.
  constexpr bool kKeepA = kAChunks <= 2;
  const uint8_t* a_src[kKeepA ? kAChunks : 1] = {};
  if constexpr (kKeepA) {
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) a_src[i] = a_source(i);
  }
  const float* as_src = nullptr;  // activation scales of tile row tid
  if (T::kQuantAct && tid < BM && s_rows[tid] >= 0) as_src = p.a_scale + int64_t(s_rows[tid]) * p.a_scale_stride;

  // 16-byte pieces of a stage: BM rows of 8 (threads past them, at BM * 8 < 128, copy nothing).
  constexpr int a_pieces = BM * 8;
  auto load_acts = [&](int st, int buf) {
    uint8_t* da = s_a + buf * kAStage;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int c = tid + i * kThreads;
      if (c >= a_pieces) break;
      const uint8_t* base = kKeepA ? a_src[i] : a_source(i);
      cp_async16(da + sw128_offset(c >> 3, c & 7), base ? base + int64_t(st) * 128 : p.a, base ? 16 : 0);
    }
    if constexpr (T::kQuantAct) {
      if (tid < BM) cp_async4(s_as + buf * BM + tid, as_src ? as_src + st : p.a_scale, as_src ? 4 : 0);
    }
  };

  float cur[2][NT][4] = {};  // (zeroed here, before the lambdas below capture them)
  float tot[2][NT][4] = {};
  // FP4's chunks of a stage go out in groups of kBatch (one wait per group), each chunk
  // into its own accumulators (their weight scales differ): kBatch x 2 x 4NT registers,
  // with 8 more per chunk for A in registers, hence the smaller groups at more rows.
  // The others sum in the tensor core (one set): bf16 its slice sum p_s (kTcSum, no
  // scales), FP8 and FP8-as-bf16 each 128- / 64-wide stage (one scale per stage).
  constexpr bool kTcSum = F == WFmt::kBf16;
  // bf16 keeps one stage's tensor-core products in flight across the loop's wait and
  // sync (its running sum needs no registers between stages): the next copies go out
  // after the stage's products are issued, into the buffer of stage it-1, once those
  // are done. The sum is the same sequence of wgmmas, so the bits do not change.
  // FP8 waits for its stage's chain and folds it. Keeping the chain in flight while the
  // stage before was folded (two accumulator sets) made ptxas serialize every wgmma
  // (C7514: a DEPBAR after each), and waiting measured -1.0 to -1.2% a step at batch 1
  // and -0.3 to -0.5% at 256 (thirtieth session; cuda-linear.md, "ptxas serializes").
  constexpr bool kLoadAfter = kTcSum;
  // FP8-as-bf16 decodes the next stage under this one's products (the loop below).
  constexpr bool kPipelinedRegA = F == WFmt::kFp8Bf16 && NT <= 4;  // (NT 8 with walked slices spilled 236 bytes)
  constexpr int kBatch = F != WFmt::kFp4 ? 1 : NT == 1 ? 4 : NT == 2 ? 2 : 1;
  float wg_d[kBatch][2][4 * NT] = {};
  // FP8-as-bf16: stage buffer buf's weights as bf16 A fragments a[j][i] (chunk j, m64
  // half i), and their products with the activation stage at db0 into wg_d[0], from
  // zero. (Generic lambdas: only FP8-as-bf16 instantiates them.)
  auto decode_bf16_frags = [&](auto& a, int buf) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint8_t* row = s_w + buf * kWStage + tile_row(i, 0) * kWRow;
      load_a_frags_e4m3_bf16(row, row + 8 * kWRow, t, [&](int j) -> uint32_t(&)[4] { return a[j][i]; });
    }
  };
  // A slice boundary (kTwoSets): p_s into the running total, p_s from zero again.
  auto end_slice = [&] {
    for_each_acc<NT>([&](int i, int q, int e) {
      tot[i][q][e] += cur[i][q][e];
      cur[i][q][e] = 0.0f;
    });
  };
  auto issue_bf16_frags = [&](const auto& a, uint32_t db0) {
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t db = wgmma_desc_at(db0, j * 32);
#pragma unroll
      for (int i = 0; i < 2; ++i) wgmma_bf16_rs<NT>(wg_d[0][i], a[j][i], db, j == 0 ? 0 : 1);
    }
    wgmma_commit();
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iters) {
      if (!early_weights) load_weights(st_begin + s, s);
      load_acts(st_begin + s, s);
    }
    cp_async_commit();
  }

  // Position of stage `it` in its slice (a counter: `it % per_slice` cost an integer
  // division per stage).
  int slice_pos = 0;
  if constexpr (kPipelinedRegA) {
    // FP8-as-bf16 (wo_a): stage it+1's weights are decoded into the other set of A
    // fragments while stage it's products run (RS wgmmas read their A registers until
    // they are done, so the sets alternate: two stages an iteration, constant indices).
    // The products and the fold are the same, in the same order: the same bits. Four
    // stage buffers keep two stages' copies in flight. Against the serial stage (decode,
    // products, wait, fold): -0.6% a step at batch 1, +0.2% at 16 rows (bench-1g, H200;
    // docs/BENCHMARKS.md, forty-second session; gemm_wide_kernel keeps the serial one).
    static_assert(kStages >= 4, "the decode of stage it+1 waits for its copies while stage it+2's are in flight");
    uint32_t a0[4][2][4], a1[4][2][4];
    if (iters > 0) {
      cp_async_wait<kStages - 2>();  // stage 0 has landed (for this thread) ...
      fence_proxy_async();
      __syncthreads();  // ... for every thread
      decode_bf16_frags(a0, 0);
      DSV4_CTA_PROBE(kProbeSite, 5, w0);  // first_stage (landed and decoded)
    }
    // Stage it: its products from `a`; under them the wait for stage it+1's copies, the
    // next copies into stage it-1's buffer (free: every thread waited for its products
    // before this barrier) and stage it+1's decode into `next`; then the wait for the
    // products and the fold p = fmaf(d_stage, 2^(w block), p).
    auto run_stage = [&](int it, const uint32_t(&a)[4][2][4], uint32_t(&next)[4][2][4]) {
      const bool slice_last = slice_pos == per_slice - 1;
      slice_pos = slice_last ? 0 : slice_pos + 1;
      const unsigned uit = unsigned(it);
      issue_bf16_frags(a, wgmma_desc_lo(smem_u32(s_a + (uit % kStages) * kAStage)));
      cp_async_wait<kStages - 3>();  // stage it+1 has landed (for this thread) ...
      fence_proxy_async();
      __syncthreads();  // ... for every thread, and every thread is past stage it-1's products
      const unsigned nxt = uit + kStages - 1;
      if (int(nxt) < iters) {
        load_weights(st_begin + int(nxt), int(nxt % kStages));
        load_acts(st_begin + int(nxt), int(nxt % kStages));
      }
      cp_async_commit();  // (empty groups too: the wait above counts one group a stage)
      if (it + 1 < iters) decode_bf16_frags(next, int((uit + 1) % kStages));
      wgmma_wait_all();
      const float wsc = core::e8m0_to_float(s_bs[unsigned(st_begin + it) / 2]);
      for_each_acc<NT>([&](int i, int q, int e) { cur[i][q][e] = fmaf(wg_d[0][i][4 * q + e], wsc, cur[i][q][e]); });
      if constexpr (kTwoSets) {
        if (slice_last) end_slice();
      }
    };
    for (int it = 0; it < iters; it += 2) {
      run_stage(it, a0, a1);
      if (it + 1 < iters) run_stage(it + 1, a1, a0);
    }
  } else {
    for (int it = 0; it < iters; ++it) {
      const bool slice_first = slice_pos == 0, slice_last = slice_pos == per_slice - 1;
      slice_pos = slice_last ? 0 : slice_pos + 1;
      cp_async_wait<kStages - 2>();  // stage `it` has landed (for this thread) ...
      const unsigned uit = unsigned(it);  // (stage indices are unsigned: shifts and masks)
      const int buf = int(uit % kStages), st = st_begin + it;
      const unsigned ust = unsigned(st);
      // FP4: this thread's row scales as bf16 (a group's 16 raw bytes -> its 32 bf16 bytes).
      uint8_t* const ws_row_buf = s_ws + (((ust / kScaleStages) & 1) * kTileN + tid) * kScaleRowBytes;
      auto scale_group_to_bf16 = [&](const uint4 raw) {
        static_assert(kScaleStages == 4, "a group's raw scales are one 16-byte piece");
        const fp4_layout::Bf16Pairs v0 = fp4_layout::e8m0x4_to_bf16x2(raw.x), v1 = fp4_layout::e8m0x4_to_bf16x2(raw.y),
                                    v2 = fp4_layout::e8m0x4_to_bf16x2(raw.z), v3 = fp4_layout::e8m0x4_to_bf16x2(raw.w);
        *reinterpret_cast<uint4*>(ws_row_buf) = make_uint4(v0.lo, v0.hi, v1.lo, v1.hi);
        *reinterpret_cast<uint4*>(ws_row_buf + 16) = make_uint4(v2.lo, v2.hi, v3.lo, v3.hi);
      };
      if constexpr (T::kRowScale) {  // (cp.async copies: before the barrier)
        if (!ws_sectors) {
          uint8_t* slot = ws_row_buf + (ust % kScaleStages) * 8;
          const fp4_layout::Bf16Pairs v = fp4_layout::e8m0x4_to_bf16x2(*reinterpret_cast<const uint32_t*>(slot + 4));
          *reinterpret_cast<uint2*>(slot) = make_uint2(v.lo, v.hi);
        } else if (!kTmaW && ust % kScaleStages == 0) {
          scale_group_to_bf16(*reinterpret_cast<const uint4*>(ws_row_buf + 16));
        }
      }
      if constexpr (kTmaW) {
        mbar_wait(s_mbar + 8 * (uit % kStages), (uit / kStages) & 1);
        if (ws_sectors && ust % kScaleStages == 0)  // (the group's bulk copy came with this stage)
          scale_group_to_bf16(*reinterpret_cast<const uint4*>(smem_raw + (s_ws_raw - smem_u32(smem_raw)) + 16 * tid));
      }
      fence_proxy_async();
      __syncthreads();               // ... for every thread, and stage it-1's buffer is free
      if (it == 0) DSV4_CTA_PROBE(kProbeSite, 5, w0);  // first_stage (landed)
      // (bf16: free once its tensor-core products are done, see kLoadAfter)
      auto load_next = [&] {
        const unsigned nxt = uit + kStages - 1;
        if (int(nxt) < iters) {
          load_weights(st_begin + int(nxt), int(nxt % kStages));
          load_acts(st_begin + int(nxt), int(nxt % kStages));
        }
        cp_async_commit();
      };
      if constexpr (!kLoadAfter) load_next();
      const uint8_t* ab = s_a + buf * kAStage;
      float as[NT][2];
#pragma unroll
      for (int q = 0; q < NT; ++q) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          as[q][e] = T::kQuantAct ? s_as[buf * BM + 8 * q + 2 * t + e] : 1.0f;
          if constexpr (F == WFmt::kFp4) as[q][e] *= 64.0f;  // the decoded weights are 2^-6 x e2m1
        }
      }
      // FP4: q = sum over the 4 chunks j, in order, of fmaf(mma_j, 2^(w row scale j), q),
      // then p = fmaf(q, 2^(x block), p): the activation scale is one per stage.
      float wsf[2][2][4];
      float q_acc[2][NT][4];
      if constexpr (F == WFmt::kFp4) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint8_t* slot =
                s_ws + (((ust / kScaleStages) & 1) * kTileN + tile_row(i, h)) * kScaleRowBytes + (ust % kScaleStages) * 8;
            const uint2 v = *reinterpret_cast<const uint2*>(slot);
            wsf[i][h][0] = fp4_layout::bf16_pair_lo(v.x);
            wsf[i][h][1] = fp4_layout::bf16_pair_hi(v.x);
            wsf[i][h][2] = fp4_layout::bf16_pair_lo(v.y);
            wsf[i][h][3] = fp4_layout::bf16_pair_hi(v.y);
          }
      }
      float wsc = 1.0f;
      if constexpr (T::kBlockScale) wsc = core::e8m0_to_float(s_bs[F == WFmt::kFp8 ? ust : ust / 2]);
      // Both operands from shared memory (bf16, FP8): the stage's 4 chunks, each both m64
      // halves of the tile, into wg_d[0]; chunk 0 starts from zero where zero_first.
      // (Generic: only the formats that call it instantiate wgmma_ss.)
      auto issue_smem_stage = [&](auto zero_first) {
        const uint32_t da0 = wgmma_desc_lo(static_cast<uint32_t>(__cvta_generic_to_shared(s_w + buf * kWStage)));
        const uint32_t db0 = wgmma_desc_lo(static_cast<uint32_t>(__cvta_generic_to_shared(ab)));
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint64_t db = wgmma_desc_at(db0, j * 32);
#pragma unroll
          for (int i = 0; i < 2; ++i)
            wgmma_ss<F, NT>(wg_d[0][i], wgmma_desc_at(da0, i * 64 * 128 + j * 32), db, zero_first && j == 0 ? 0 : 1);
        }
        wgmma_commit();
      };
      if constexpr (kTcSum) {
        // p_s = the tensor core's running sum over the slice's chunks, in order (scale-d
        // 0 on the slice's first chunk); copied out at the slice's end.
        issue_smem_stage(slice_first);
        if (slice_last) {
          wgmma_wait_all();
          for_each_acc<NT>([&](int i, int q, int e) { cur[i][q][e] = wg_d[0][i][4 * q + e]; });
        } else {
          wgmma_wait_1();  // this stage's products run on while stage it-1's are done ...
        }
        __syncthreads();   // ... in every warp: its buffer takes the next copies
        load_next();
      } else if constexpr (kSmemA) {
        // FP8: the stage's 4 chunks chained in the tensor core from zero (scale-d 1
        // after the first; one block scale and one activation exponent cover them),
        // then p = fmaf(d_stage, 2^w * 2^x, p).
        issue_smem_stage(true);
        wgmma_wait_all();
        for_each_acc<NT>(
            [&](int i, int q, int e) { cur[i][q][e] = fmaf(wg_d[0][i][4 * q + e], wsc * as[q][e & 1], cur[i][q][e]); });
      } else if constexpr (F == WFmt::kFp4) {
        // kBatch chunks: decode their fragments, issue both halves of each, one wait,
        // then fold the results in chunk order (the accumulation rule is unchanged).
        // Fragment element e of wg_d[c][i][4q + e]: weight row tile_row(i, e / 2),
        // activation column 8q + 2t + e % 2.
        const uint32_t db0 = wgmma_desc_lo(static_cast<uint32_t>(__cvta_generic_to_shared(ab)));
        const int piece = fp4_layout::piece_slot(g, t);  // (tile_row >> 1) & 3 = (g >> 1) & 3
        // words[i][h][j]: chunk j's word of row tile_row(i, h), one 16-byte load a row
        // (a quarter warp reads two whole rows: no bank conflict). Groups of 2 chunks
        // load their 8 bytes a group instead: the 16-row expert tiles (NT 2, <= 128
        // registers) spilled holding the second group's words across the first's
        // wgmma. The 8-byte reads conflict 2-way, yet the step at batch 256 was 0.6%
        // faster than with 16-byte ones (eighteenth session).
        uint32_t words[2][2][4];
        if constexpr (kBatch != 2) {
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint4 v =
                  *reinterpret_cast<const uint4*>(s_w + buf * kWStage + tile_row(i, h) * kWRow + 16 * piece);
              words[i][h][0] = v.x, words[i][h][1] = v.y, words[i][h][2] = v.z, words[i][h][3] = v.w;
            }
        }
#pragma unroll
        for (int j0 = 0; j0 < 4; j0 += kBatch) {
          if constexpr (kBatch == 2) {
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const uint2 v = *reinterpret_cast<const uint2*>(s_w + buf * kWStage + tile_row(i, h) * kWRow +
                                                                16 * piece + 4 * j0);
                words[i][h][j0] = v.x, words[i][h][j0 + 1] = v.y;
              }
          }
          uint32_t a[kBatch][2][4];
#pragma unroll
          for (int c = 0; c < kBatch; ++c)
#pragma unroll
            for (int i = 0; i < 2; ++i) fp4_a_frag(words[i][0][j0 + c], words[i][1][j0 + c], a[c][i]);
          wgmma_fence();
#pragma unroll
          for (int c = 0; c < kBatch; ++c) {
            const uint64_t desc = wgmma_desc_at(db0, (j0 + c) * 32);
            wgmma_e4m3<NT>(wg_d[c][0], a[c][0], desc);
            wgmma_e4m3<NT>(wg_d[c][1], a[c][1], desc);
          }
          wgmma_commit();
          wgmma_wait_all();
#pragma unroll
          for (int c = 0; c < kBatch; ++c)
            for_each_acc<NT>([&](int i, int q, int e) {
              const int jj = j0 + c;
              const float d = wg_d[c][i][4 * q + e];
              q_acc[i][q][e] = jj == 0 ? d * wsf[i][e >> 1][0] : fmaf(d, wsf[i][e >> 1][jj], q_acc[i][q][e]);
            });
          if (j0 + kBatch == 4)  // the stage's chunks are in: p = fmaf(q, 2^(x block), p)
            for_each_acc<NT>(
                [&](int i, int q, int e) { cur[i][q][e] = fmaf(q_acc[i][q][e], as[q][e & 1], cur[i][q][e]); });
        }
      } else {
        // FP8-as-bf16: the 4 chunks' e4m3 weights converted to bf16 fragments, the stage
        // summed by the tensor core, then p = fmaf(d_stage, 2^(w block), p).
        static_assert(F == WFmt::kFp8Bf16, "FP8-as-bf16 is the last format");
        const uint32_t db0 = wgmma_desc_lo(static_cast<uint32_t>(__cvta_generic_to_shared(ab)));
        uint32_t a[4][2][4];
        decode_bf16_frags(a, buf);
        issue_bf16_frags(a, db0);
        wgmma_wait_all();
        for_each_acc<NT>([&](int i, int q, int e) { cur[i][q][e] = fmaf(wg_d[0][i][4 * q + e], wsc, cur[i][q][e]); });
      }
      if constexpr (kTwoSets) {
        if (slice_last) end_slice();  // slice boundary: fold p_s into the running total
      }
    }
  }
  cp_async_wait<0>();
  if constexpr (kLoadAfter) wgmma_wait_all();  // (bf16: a no-op, the last stage ends a slice; ptxas cannot know)
  allow_dependents_to_launch();  // only the epilogue is left
  DSV4_CTA_PROBE(kProbeSite, 2, w0);  // stages_done

  const bool to_y1 = second && p.y1 != nullptr;  // linear_pair: the second weight's own output
  void* const y_out = to_y1 ? p.y1 : p.y;
  const int64_t ld_out = to_y1 ? p.ldy1 : p.ldy, col_out = to_y1 ? col0 - p.n_split : col0;
  auto store = [&](int c, int r, float v) {  // c: tile activation row, r: tile weight row
    const int64_t orow = p.out_rows ? p.out_rows[row_base + c] : row_base + c;
    const int64_t idx = orow * ld_out + col_out + r;
    if (p.y_f32) static_cast<float*>(y_out)[idx] = v;
    else static_cast<uint16_t*>(y_out)[idx] = core::float_to_bf16(v);
  };

  // Plain GEMMs of 16-32-row tiles fold a slab of slices of all their outputs at a
  // time (batch 16: -1.1% a step). The others keep one output's loads at a time: the
  // batched fold measured +0.5% a step at batch 1 (8-row tiles, 68 -> 91 registers),
  // and the FP4 expert kernel of 4 CTAs an SM spilled with it at its 128-register bound.
  constexpr bool kBatchedFold = kEarlyWeights && batched_fold_tiles(NT);
  if constexpr (kClusterFold) {  // its own instantiation: the other launches' code is unchanged
    // The cluster fold (split > 1, the tile's CTAs one cluster, host: split <= 8): each CTA
    // leaves its slice's p_s (tile row c, weight row r) in its stage buffers, free after
    // the loop; after a cluster barrier CTA j folds the tile rows c = j, j + S, ...:
    // thread r adds the S CTAs' p_s for (c, r) in slice order from 0, split_fold_kernel's
    // sequence (slice s is cluster rank s: blockIdx.z, cluster dims 1 x 1 x S). Rows
    // padded to 132 floats: the scattered accumulator stores hit distinct banks (bank
    // 4c + r mod 32, c = 8q + 2t + e).
    static_assert(!kTwoSets, "the cluster fold: split GEMMs (plain, or the routed experts' 8-row tiles)");
    constexpr int kPartStride = kTileN + 4;
    static_assert(BM * kPartStride * 4 <= kStages * (kWStage + kAStage), "cluster fold: partial in the stages");
    float* const s_part = reinterpret_cast<float*>(smem);
    __syncthreads();  // every warp is past its last reads of the stage buffers
    for_each_acc<NT>([&](int i, int q, int e) {
      const int r = tile_row(i, e >> 1), c = 8 * q + 2 * t + (e & 1);
      s_part[c * kPartStride + r] = cur[i][q][e];
    });
    cluster_sync_all();  // every slice's partial is in place
    const int split = p.split < kMaxClusterFold ? p.split : kMaxClusterFold;
    if (tid < valid_n) {
      // Four of the CTA's rows at a time, every slice's load of them in flight before the
      // adds (a remote load is a round trip through the cluster's network).
      constexpr int kRowsAtOnce = 4;
      for (int c0 = int(cluster_cta_rank()); c0 < rows; c0 += kRowsAtOnce * split) {
        float part[kRowsAtOnce][kMaxClusterFold];
#pragma unroll
        for (int j = 0; j < kRowsAtOnce; ++j) {
          const int c = c0 + j * split;
          const uint32_t at = smem_u32(s_part + (c < rows ? c : 0) * kPartStride + tid);
#pragma unroll
          for (int s = 0; s < kMaxClusterFold; ++s)
            part[j][s] = c < rows && s < split ? ld_cluster_f32(at, uint32_t(s)) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < kRowsAtOnce; ++j) {
          const int c = c0 + j * split;
          if (c >= rows) break;
          float v = 0.0f;
#pragma unroll
          for (int s = 0; s < kMaxClusterFold; ++s)
            if (s < split) v += part[j][s];
          store(c, tid, v);
        }
      }
    }
    cluster_sync_all();  // no CTA exits while another still reads its shared memory
    return;
  }
  if (!kTwoSets && p.split > 1) {  // (launches of two sets walk their slices: split == 1)
    // The batched fold's partials are tile-major (GemmParams::partial): [tile][slice][BM][kTileN].
    const bool tile_major = kBatchedFold && p.counters != nullptr;
    float* part = tile_major ? p.partial + (int64_t(tile_id) * p.split + slice) * (BM * kTileN)
                             : p.partial + int64_t(slice) * p.partial_rows * p.partial_cols + row_base * p.partial_cols + col0;
    const int64_t ld_part = tile_major ? kTileN : p.partial_cols;
    for_each_acc<NT>([&](int i, int q, int e) {
      const int r = tile_row(i, e >> 1), c = 8 * q + 2 * t + (e & 1);
      if (r < valid_n && c < rows) part[c * ld_part + r] = cur[i][q][e];
    });
    DSV4_CTA_PROBE(kProbeSite, 3, w0);  // partial_stored
    if (p.counters == nullptr) return;  // split_fold_kernel folds them (large row counts)
    // The last CTA of the tile folds the slices in order. Its arrival: after a CTA barrier
    // (every thread's partial stores issued), thread 0's acquire-release add, whose
    // release half publishes them (PTX release is cumulative through the barrier) and
    // whose acquire half, then a barrier, lets the last CTA's threads read the others'
    // (by ld.global.cg, through L2), as the fused expert step's arrivals do. It was a
    // fence.sc by every thread, a relaxed add and a second fence: -0.7% a step at batch 1,
    // -0.2 to -0.3% at 8-16 rows (bench-1g, H200, sixtieth session, two grants).
    __syncthreads();
    if (tid == 0) *s_flag = atom_add_acq_rel_gpu(p.counters + tile_id, 1) == p.split - 1;
    __syncthreads();
    if (!*s_flag) return;
    DSV4_CTA_PROBE(kProbeSite, 4, w0);  // last_cta
    static_assert(kThreads == kTileN, "thread r folds weight row r");
    // With GemmParams::yq (host: whole 128-column tiles, no row scatter; wo_a's FP8-as-bf16
    // instantiations only, so the others' code is unchanged), each output's bf16 value also
    // goes to the stage buffers (free since the loop), then a warp a row quantizes the
    // tile's 128 columns: the codes act_quant would form from y.
    static_assert(BM * kTileN * 4 <= kStages * (kWStage + kAStage), "fold quantization: rows in the stages");
    float* const s_y = reinterpret_cast<float*>(smem);
    const bool quant = F == WFmt::kFp8Bf16 && p.yq != nullptr;
    auto fold_store = [&](int c, int r, float v) {
      store(c, r, v);
      if (quant) s_y[c * kTileN + r] = core::round_bf16(v);
    };
    if constexpr (!kBatchedFold) {
      fold_row_major_slices<BM>(p, row_base, col0, rows, valid_n, tid, kThreads, fold_store);
    } else if (tid < valid_n) {
      const float* src = p.partial + int64_t(tile_id) * p.split * (BM * kTileN) + tid;
      auto store_row = [&](int c, float v) { fold_store(c, tid, v); };
      // Half-width slabs in 16-row tiles only: a 32-row tile holds at most 16 rows only as
      // the last tile of more than 32 rows, where the bound S x rows <= 64 leaves no split to fold.
      if constexpr (BM == 16) {
        if (p.fold_half_rows && rows <= BM / 2) {
          fold_tile_slices<BM, BM / 2>(src, p.split, rows, store_row);
        } else {
          fold_tile_slices<BM, BM>(src, p.split, rows, store_row);
        }
      } else {
        fold_tile_slices<BM, BM>(src, p.split, rows, store_row);
      }
    }
    if (quant) {
      __syncthreads();  // the tile's rows are in s_y
      for (int c = warp; c < rows; c += kThreads / 32) {
        const float4 x = *reinterpret_cast<const float4*>(s_y + c * kTileN + 4 * lane);
        const float v[4] = {x.x, x.y, x.z, x.w};
        const int64_t row = row_base + c;
        quant_block_warp(v, p.yq + row * p.ldq + col0, p.ys + row * (p.ldq / 128) + col0 / 128, lane);
      }
    }
    if (tid == 0) p.counters[tile_id] = 0;  // ready for the next launch
  } else {
    for_each_acc<NT>([&](int i, int q, int e) {
      const int r = tile_row(i, e >> 1), c = 8 * q + 2 * t + (e & 1);
      if (r < valid_n && c < rows) store(c, r, kTwoSets ? tot[i][q][e] : 0.0f + cur[i][q][e]);
    });
  }
}

// Plain / grouped GEMM: grid (groups * tiles_per_group, ceil(m / BM), split), run
// with the row tile varying fastest in launch order, so that the row tiles of one
// weight tile are resident together and read its bytes from DRAM once (the LM head
// at M = 256 is 1 GB, four times L2 and more). Roofline: N*K weight bytes once,
// 2*M*N*K FLOPs; wq_b (33.6 MB FP8) is 8 µs at 4.2 TB/s. kClusterFold (split > 1):
// launched in clusters of a tile's split CTAs (cluster dims 1 x 1 x split, split <= 8),
// which fold the slices over distributed shared memory: no partials in global memory,
// no counters, no fold launch.
template <WFmt F, int NT, bool kTwoSets, bool kClusterFold = false>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmParams p) {
  constexpr int BM = 8 * NT;  // gemm_tile waits for the predecessor after its first weight copies
  const int linear = int(blockIdx.y * gridDim.x + blockIdx.x);
  const int m_tile = linear % int(gridDim.y), n_tile = linear / int(gridDim.y);
  const int group = n_tile / p.tiles_per_group, tile_n = n_tile % p.tiles_per_group;
  const int row_base = m_tile * BM;
  const int rows = min(BM, p.m - row_base);
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kGemmTile, p.w0);
  gemm_tile<F, NT, kTwoSets, true, false, kClusterFold>(p, p.w0, p.s0, p.w1, p.s1, tile_n, group, row_base, rows,
                                                       linear);
}

// The slice fold of a split plain GEMM as its own launch: y[r, c] = ((0 + p_0) + p_1)
// + ... + p_{S-1}, the order the tile's last CTA (and the sequential mode) uses. The
// last CTA of a tile would read S x BM x 128 partials alone (1 MB at M = 64, S = 32:
// ~100 µs); here a thread folds V consecutive columns of one row (V = 4: 16-byte
// loads), eight slices' loads in flight before their adds. Grid (column blocks, rows):
// no index division (a 64-bit division per output and one output per thread made the
// launch issue-bound, ~6 µs each at M = 64 by ncu). Columns >= n_split go to y1 when
// it is set (GemmParams::y1); a V-column group never straddles it (n_split % V == 0).
constexpr int kFoldThreads = 128;
template <int V>
__global__ void __launch_bounds__(kFoldThreads) split_fold_kernel(const float* __restrict__ partial, int split,
                                                                  int64_t rows, int64_t cols, void* y, int64_t ldy,
                                                                  void* y1, int64_t ldy1, int64_t n_split, int y_f32,
                                                                  uint8_t* yq, float* ys, int64_t ldq) {
  wait_then_release_dependents();
  const int64_t col = (int64_t(blockIdx.x) * kFoldThreads + threadIdx.x) * V;
  if (col >= cols) return;  // (with yq: cols % 128 == 0, so whole warps leave)
  const bool second = y1 != nullptr && col >= n_split;
  void* const out = second ? y1 : y;
  const int64_t ld = second ? ldy1 : ldy, c0 = second ? col - n_split : col;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const float* src = partial + row * cols + col;
    float v[V];
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = 0.0f;
    // Eight slices' loads in flight at a time (all 32 at once took 144 registers; all
    // of them, 32 at V = 1 and 16 at V = 4, measured no faster: thirty-ninth session).
    for (int s0 = 0; s0 < split; s0 += 8) {
      float part[8][V];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (s0 + j >= split) break;
        const float* q = src + int64_t(s0 + j) * rows * cols;
        if constexpr (V == 4) {
          const float4 x = __ldcg(reinterpret_cast<const float4*>(q));
          part[j][0] = x.x, part[j][1] = x.y, part[j][2] = x.z, part[j][3] = x.w;
        } else {
          part[j][0] = __ldcg(q);
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (s0 + j >= split) break;
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] += part[j][e];
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t idx = row * ld + c0 + e;
      if (y_f32) static_cast<float*>(out)[idx] = v[e];
      else static_cast<uint16_t*>(out)[idx] = core::float_to_bf16(v[e]);
    }
    if constexpr (V == 4) {
      // GemmParams::yq (host: bf16 y, no y1, cols % 128 == 0): a warp's 128 columns are
      // one activation block of the row.
      if (yq != nullptr) {
        const float b[4] = {core::round_bf16(v[0]), core::round_bf16(v[1]), core::round_bf16(v[2]),
                            core::round_bf16(v[3])};
        const int64_t block = col / 128;
        quant_block_warp(b, yq + row * ldq + block * 128, ys + row * (ldq / 128) + block, int(threadIdx.x & 31));
      }
    }
  }
}

// Weight tile tile_n of list tile `tile` ({local expert, first compact row, rows, -})
// of expert e's weights (e[0..3]: w0, s0, w1, s1).
template <WFmt F, int NT, bool kTwoSets, bool kTma, bool kSixteenRowTiles, bool kClusterFold = false,
          bool kExpertLaunch = false, typename Wait = PredecessorWait>
__device__ __forceinline__ void expert_tile(const GemmParams& p, const uint8_t* const* e, int tile_n, int4 tile,
                                            int tile_id, const Wait& wait = Wait{}) {
  static_assert(!kSixteenRowTiles || (F == WFmt::kFp4 && NT == 1), "16-row tiles: FP4 experts, from 8-row tiles");
  static_assert(!kClusterFold || !kSixteenRowTiles, "the cluster fold: 8-row expert tiles");
  if constexpr (kSixteenRowTiles) {
    if (tile.z > 8 * NT) {  // (8-row tiles run fewer instructions a stage)
      gemm_tile<F, 2 * NT, kTwoSets, false, kTma, false, kExpertLaunch>(p, e[0], e[1], e[2], e[3], tile_n, 0,
                                                                       tile.y, tile.z, tile_id);
      return;
    }
  }
  gemm_tile<F, NT, kTwoSets, false, kTma, kClusterFold, kExpertLaunch, Wait>(p, e[0], e[1], e[2], e[3], tile_n, 0,
                                                                             tile.y, tile.z, tile_id, wait);
}

// Expert GEMM: grid (tiles over n, max tiles of the list, split). blockIdx.y picks
// a tile of the device-built list; CTAs past its end (or of experts outside this
// launch's table) exit at once. Roofline: each busy expert's weights (13.37 MB FP4
// on Flash) read once per BM-row tile; memory-bound at every batch (<= ~6 rows per
// expert at M = 256).
// kTma (FP4, whole 128-row tiles): each weight stage by one TMA bulk copy.
// kSixteenRowTiles (FP4, NT = 1): the list's tiles hold up to 16 rows; those of more
// than 8 run as one 16-row tile (gemm_tile NT = 2: n16 wgmmas, two chunks a wait), so
// an expert of 9-16 rows loads and decodes its weights once; the others as 8-row
// tiles. The bits are the same. The kernel keeps 4 CTAs an SM (<= 128 registers)
// either way: its throughput comes from the CTAs in flight.
// kClusterFold (split launches, 8-row tiles): launched in clusters of a tile's split
// CTAs (cluster dims 1 x 1 x split), which fold their slices over distributed shared
// memory (gemm_tile's cluster fold; the same order as the last-CTA fold): no partials
// in global memory, no fence, no counter. The cluster's CTAs share blockIdx.y, so they
// leave at the list's end together and never wait on one that left.
// kSmallRows (8-row tiles, one row group; the launches that split their slices or read
// their weights early, 1-2 rows at bench-1g): GemmParams::weights_before_wait and
// split_scale_groups are read at run time (gemm_tile's kExpertLaunch). The other
// instances keep their code as it was before those forms: compiled into every instance,
// they had cost 0.4% a step at 64 and 256 rows (fifty-eighth session, 3 rounds).
template <WFmt F, int NT, bool kTwoSets, bool kTma, bool kSixteenRowTiles = false, bool kClusterFold = false,
          bool kSmallRows = false>
__global__ void __launch_bounds__(kThreads, NT == 1 ? 4 : 1) expert_gemm_kernel(const GemmParams p,
                                                                const __grid_constant__ ExpertTable table) {
  static_assert(!kSmallRows || (NT == 1 && !kSixteenRowTiles), "the small-row forms: 8-row tiles");
  static_assert(!kClusterFold || kSmallRows, "the cluster fold: a small-row form");
  // (gemm_tile then waits after its first weight stages)
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kExpertGemm, table.p[0][0]);
  const bool early = kSmallRows && p.weights_before_wait != 0;
  if (!early) wait_for_predecessor();
  if (int(blockIdx.y) >= (early ? __ldcg(p.num_tiles) : *p.num_tiles)) return;
  const int4 tile = early ? __ldcg(p.tiles + blockIdx.y) : p.tiles[blockIdx.y];
  if (tile.x < p.chunk_begin || tile.x >= p.chunk_end) return;
  DSV4_CTA_PROBE(CtaProbeSite::kExpertGemm, 1, table.p[0][0]);  // tile_known
  const int tile_id = int(blockIdx.y * gridDim.x + blockIdx.x);  // (split launches: n_tile_offset is 0)
  expert_tile<F, NT, kTwoSets, kTma, kSixteenRowTiles, kClusterFold, kSmallRows>(
      p, table.p[tile.x - p.chunk_begin], int(blockIdx.x) + p.n_tile_offset, tile, tile_id);
}

// A warp's 128-block of codes, 4 per lane (elements 4 lane..4 lane+3), stored at
// block: in element order, or with split_pairs (the FP4 GEMM's layout, see
// load_a_frag) each 32-byte chunk as its 16 even elements, then its 16 odd ones.
// Lanes 2m and 2m+1 hold elements 8m..8m+7 of a chunk: they swap words, and the
// even lane stores the even elements at 4m, the odd lane the odd ones at 16 + 4m.
__device__ __forceinline__ void store_quant4(uint8_t* block, int lane, uint32_t codes, int split_pairs) {
  if (!split_pairs) {
    *reinterpret_cast<uint32_t*>(block + 4 * lane) = codes;
    return;
  }
  const uint32_t other = __shfl_xor_sync(0xffffffffu, codes, 1);
  const int l = lane & 7;
  const uint32_t word = (l & 1) ? prmt(other, codes, 0x7531u) : prmt(codes, other, 0x6420u);
  *reinterpret_cast<uint32_t*>(block + 32 * (lane >> 3) + 16 * (l & 1) + 4 * (l >> 1)) = word;
}

// ---- activation quantization (spec §2.4) ----------------------------------------------
// One warp per (row, 128-block), 4 values per lane; q [rows, k] codes, scale
// [rows, k/128] = 2^e. Roofline: reads 2 B and writes 1 B per element, < 1 µs at decode.
// Work item `wid` (< rows * k/128) of a warp: one (row, 128-block).
__device__ __forceinline__ void act_quant_item(const uint16_t* __restrict__ x, int64_t ldx, int64_t k,
                                               uint8_t* __restrict__ q, float* __restrict__ scale, int split_pairs,
                                               int64_t wid, int lane) {
  const int64_t blocks = k / 128;
  const int64_t r = wid / blocks, b = wid % blocks;
  const uint16_t* src = x + r * ldx + b * 128 + lane * 4;
  float v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = core::bf16_to_float(src[i]);
  int e;
  store_quant4(q + r * k + b * 128, lane, quant4_warp_block(v, e), split_pairs);
  if (lane == 0) scale[r * blocks + b] = core::pow2_float(e);
}

__global__ void act_quant_kernel(const uint16_t* __restrict__ x, int64_t ldx, int64_t rows, int64_t k,
                                 uint8_t* __restrict__ q, float* __restrict__ scale, int split_pairs) {
  wait_then_release_dependents();
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (wid >= rows * (k / 128)) return;
  act_quant_item(x, ldx, k, q, scale, split_pairs, wid, threadIdx.x & 31);
}

// The same codes and scales a half warp a (row, 128-block), 8 values a lane (one 16-byte
// load), so a warp takes two items. Why: at 256 rows the one-warp form's 4 scalar bf16
// loads a lane (and its 4x the warps) made a launch ~4.4 µs for ~3 MB in the graph trace
// (thirty-ninth session). Lane l of half h holds elements 8(l & 15) .. +7 of item 2w + h;
// the block's amax is a max over the half's 16 lanes (exact in any order), the codes are
// elementwise, so the bits are act_quant_item's. split_pairs: a lane's 8 elements are
// 8m .. 8m+7 of a 32-byte chunk (m = l & 3), whose even elements go to 4m of the chunk
// and odd ones to 16 + 4m (store_quant4's layout, without its shuffle).
__device__ __forceinline__ void store_quant8(uint8_t* block, int l16, uint32_t lo, uint32_t hi, int split_pairs) {
  if (!split_pairs) {
    *reinterpret_cast<uint2*>(block + 8 * l16) = make_uint2(lo, hi);
    return;
  }
  uint8_t* chunk = block + 32 * (l16 >> 2);
  const int m = l16 & 3;
  *reinterpret_cast<uint32_t*>(chunk + 4 * m) = prmt(lo, hi, 0x6420u);
  *reinterpret_cast<uint32_t*>(chunk + 16 + 4 * m) = prmt(lo, hi, 0x7531u);
}

// Max over the 16 lanes of a half warp (every lane of the warp calls it).
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Quantizes a half warp's 8 values a lane into block / *scale (live: the half's item
// exists; every lane takes part in the shuffles either way).
__device__ __forceinline__ void quant8_store(const float (&v)[8], bool live, int l16, uint8_t* block, float* scale,
                                             int split_pairs) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = half_warp_max(amax);
  if (!live) return;
  const int e = act_exponent(amax);
  const float inv = core::pow2_float(-e);
  const float lo[4] = {v[0], v[1], v[2], v[3]}, hi[4] = {v[4], v[5], v[6], v[7]};
  store_quant8(block, l16, quant4_e4m3(lo, inv), quant4_e4m3(hi, inv), split_pairs);
  if (l16 == 0) *scale = core::pow2_float(e);
}

// x rows 16-byte aligned (x and ldx a multiple of 8 values).
__global__ void act_quant8_kernel(const uint16_t* __restrict__ x, int64_t ldx, int64_t rows, int64_t k,
                                  uint8_t* __restrict__ q, float* __restrict__ scale, int split_pairs) {
  wait_then_release_dependents();
  const int lane = threadIdx.x & 31, l16 = lane & 15;
  const int64_t blocks = k / 128, items = rows * blocks;
  const int64_t item = ((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5) * 2 + (lane >> 4);
  if (item - (lane >> 4) >= items) return;  // the warp's first item: both halves leave together
  const bool live = item < items;
  const int64_t r = live ? item / blocks : 0, b = live ? item % blocks : 0;
  const uint4 raw = *reinterpret_cast<const uint4*>(x + r * ldx + b * 128 + 8 * l16);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  float v[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = core::bf16_to_float(uint16_t(w[i] & 0xffffu));
    v[2 * i + 1] = core::bf16_to_float(uint16_t(w[i] >> 16));
  }
  quant8_store(v, live, l16, q + r * k + b * 128, scale + r * blocks + b, split_pairs);
}

// ---- SwiGLU + quantization (spec §6.2) ----------------------------------------------
// gu [rows, 2I] bf16 = (gate | up); h = bf16(w * silu(min(gate, L)) * clamp(up, +-L)),
// quantized per 128 for w2. Row weight rw[rw_index[c]] (routed) or rw[c] or none.
// Rows c >= *num_rows (when given) are skipped. One warp per (row, 128-block).
// Roofline: reads 4 B, writes ~1 B per h element: 6 x 2048 elements at decode, negligible.
// Row c, 128-block b of one warp. kFromL2: gu is read through L2 (ld.global.cg), for
// values other CTAs of the same launch wrote (expert_ffn_fused_kernel).
template <bool kFromL2>
__device__ __forceinline__ void swiglu_quant_item(const uint16_t* __restrict__ gu, int64_t inter, int64_t c, int64_t b,
                                                  int lane, const float* rw, const int* rw_index, float limit,
                                                  uint8_t* __restrict__ hq, float* __restrict__ hs, int split_pairs) {
  const int64_t blocks = inter / 128;
  const uint16_t* gr = gu + c * 2 * inter + b * 128 + lane * 4;
  const uint16_t* ur = gr + inter;
  const float weight = rw ? rw[rw_index ? rw_index[c] : c] : 1.0f;
  float h[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float gate = core::bf16_to_float(kFromL2 ? __ldcg(gr + i) : gr[i]);
    float up = core::bf16_to_float(kFromL2 ? __ldcg(ur + i) : ur[i]);
    if (limit > 0.0f) {  // up clamped both ways, gate only from above
      up = core::clamp_f32(up, -limit, limit);
      gate = limit < gate ? limit : gate;
    }
    float act = core::silu_f32(gate) * up;
    if (rw) act = weight * act;
    h[i] = core::round_bf16(act);
  }
  int e;
  store_quant4(hq + c * inter + b * 128, lane, quant4_warp_block(h, e), split_pairs);
  if (lane == 0) hs[c * blocks + b] = core::pow2_float(e);
}

__global__ void swiglu_quant_kernel(const uint16_t* __restrict__ gu, int64_t rows, int64_t inter,
                                    const int* num_rows, const float* rw, const int* rw_index, float limit,
                                    uint8_t* __restrict__ hq, float* __restrict__ hs, int split_pairs) {
  wait_then_release_dependents();
  const int64_t blocks = inter / 128;
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (wid >= rows * blocks) return;
  const int64_t c = wid / blocks, b = wid % blocks;
  if (num_rows && c >= *num_rows) return;
  swiglu_quant_item<false>(gu, inter, c, b, lane, rw, rw_index, limit, hq, hs, split_pairs);
}

// swiglu_quant_kernel a half warp a (row, 128-block), 8 values a lane (16-byte loads of
// gate and up; act_quant8_kernel's layout and reasons): the same bits. gu 16-byte aligned.
__global__ void swiglu_quant8_kernel(const uint16_t* __restrict__ gu, int64_t rows, int64_t inter,
                                     const int* num_rows, const float* rw, const int* rw_index, float limit,
                                     uint8_t* __restrict__ hq, float* __restrict__ hs, int split_pairs) {
  wait_then_release_dependents();
  const int lane = threadIdx.x & 31, l16 = lane & 15;
  const int64_t blocks = inter / 128;
  const int64_t live_rows = num_rows ? (*num_rows < rows ? int64_t(*num_rows) : rows) : rows;
  const int64_t items = live_rows * blocks;
  const int64_t item = ((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5) * 2 + (lane >> 4);
  if (item - (lane >> 4) >= items) return;  // the warp's first item: both halves leave together
  const bool live = item < items;
  const int64_t c = live ? item / blocks : 0, b = live ? item % blocks : 0;
  const uint16_t* gr = gu + c * 2 * inter + b * 128 + 8 * l16;
  const uint4 g4 = *reinterpret_cast<const uint4*>(gr), u4 = *reinterpret_cast<const uint4*>(gr + inter);
  const float weight = rw ? rw[rw_index ? rw_index[c] : c] : 1.0f;
  const uint32_t gw[4] = {g4.x, g4.y, g4.z, g4.w}, uw[4] = {u4.x, u4.y, u4.z, u4.w};
  float h[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float gate = core::bf16_to_float(uint16_t(i & 1 ? gw[i / 2] >> 16 : gw[i / 2] & 0xffffu));
    float up = core::bf16_to_float(uint16_t(i & 1 ? uw[i / 2] >> 16 : uw[i / 2] & 0xffffu));
    if (limit > 0.0f) {  // up clamped both ways, gate only from above (swiglu_quant_item)
      up = core::clamp_f32(up, -limit, limit);
      gate = limit < gate ? limit : gate;
    }
    float act = core::silu_f32(gate) * up;
    if (rw) act = weight * act;
    h[i] = core::round_bf16(act);
  }
  quant8_store(h, live, l16, hq + c * inter + b * 128, hs + c * blocks + b, split_pairs);
}

// ---- the routed experts' GEMMs in one launch (docs/design/fused-expert-step.md) --------
struct FusedExpertArgs {
  GemmParams gate_up, down;  // the two launches' parameters: walked slices, one table chunk, the same tile list
  int gate_up_tiles, down_tiles;  // weight tiles of each GEMM
  int max_tiles;                  // list tiles the grid was sized for
  // [1 + 2 * max_tiles] ints, zeroed by moe_prep each step: the work ticket, then each
  // list tile's gate/up arrivals, then its ready flag (the accessors below).
  int* sync;
  __device__ __forceinline__ int* arrivals(int tile) const { return sync + 1 + tile; }
  __device__ __forceinline__ int* ready(int tile) const { return sync + 1 + max_tiles + tile; }
  // The SwiGLU and quantization of a list tile's rows (swiglu_quant_kernel's arguments).
  int64_t inter;
  const float* rw;
  const int* rw_index;
  float limit;
  uint8_t* hq;
  float* hs;
  int split_pairs;
};

// A down item's wait in the fused steps: thread 0 polls its list tile's ready flag
// (acquire), then a CTA barrier makes the tile's h rows visible to every thread. The
// trap turns a broken invariant into a launch failure (~9 s) instead of a hang.
struct ReadyFlagWait {
  const int* flag;
  __device__ __forceinline__ void operator()() const {
    if (threadIdx.x == 0) {
      unsigned polls = 0;
      while (ld_acquire_gpu(flag) == 0) {
        __nanosleep(64);
        if (++polls == (1u << 27)) __trap();
      }
    }
    __syncthreads();
  }
};

// Grid: (gate_up_tiles + down_tiles) * max_tiles CTAs of kThreads, one work item each,
// by ticket (atomicAdd after the dependency wait), so that every gate/up item is handed
// out before the first down item whatever order the hardware starts the CTAs in. Item i
// < gate_up_tiles * T (T: the list's tiles): gate/up weight tile i % gate_up_tiles of
// list tile i / gate_up_tiles (the separate launch's order); the last of a list tile's
// gate/up items runs the SwiGLU and quantization of its rows and sets its ready flag.
// The next down_tiles * T items: down weight tiles, each after its list tile is ready.
// Every tile is the separate launches' gemm_tile on the same inputs: the same bits.
// 8-row tiles only: with the 16-row ones too (four inlined tile bodies) ptxas spilled.
__global__ void __launch_bounds__(kThreads, 4) expert_ffn_fused_kernel(const FusedExpertArgs f,
                                                                        const __grid_constant__ ExpertTable gate_up,
                                                                        const __grid_constant__ ExpertTable down) {
  __shared__ int s_item, s_last;
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kExpertFused, gate_up.p[0][0]);
  wait_for_predecessor();
  if (threadIdx.x == 0) s_item = atomicAdd(f.sync, 1);
  __syncthreads();
  DSV4_CTA_PROBE(CtaProbeSite::kExpertFused, 1, gate_up.p[0][0]);  // item_taken
  const int item = s_item, tiles = *f.gate_up.num_tiles;
  const int gate_up_items = f.gate_up_tiles * tiles;
  if (item < gate_up_items) {
    const int j = item / f.gate_up_tiles;
    const int4 tile = f.gate_up.tiles[j];
    expert_tile<WFmt::kFp4, 1, true, true, false>(f.gate_up, gate_up.p[tile.x], item % f.gate_up_tiles, tile, item);
    __syncthreads();  // every thread's output stores issued
    if (threadIdx.x == 0) s_last = atom_add_acq_rel_gpu(f.arrivals(j), 1) == f.gate_up_tiles - 1;
    __syncthreads();  // (thread 0's acquire, then this barrier: the other CTAs' outputs visible to all)
    if (!s_last) return;
    const int64_t blocks = f.inter / 128, warp_items = int64_t(tile.z) * blocks;
    for (int64_t w = threadIdx.x >> 5; w < warp_items; w += kThreads / 32)
      swiglu_quant_item<true>(static_cast<const uint16_t*>(f.gate_up.y), f.inter, tile.y + w / blocks, w % blocks,
                              int(threadIdx.x & 31), f.rw, f.rw_index, f.limit, f.hq, f.hs, f.split_pairs);
    __syncthreads();
    if (threadIdx.x == 0) st_release_gpu(f.ready(j), 1);
    return;
  }
  const int d = item - gate_up_items;
  if (d >= f.down_tiles * tiles) return;
  const int j = d / f.down_tiles;
  const int4 tile = f.down.tiles[j];
  // Every gate/up item is held by a running CTA, none of which waits: the flag comes. A bug
  // that breaks that fails the launch in the wait (~9 s; an illegal-instruction error)
  // instead of hanging the process. (No printf: a call in the kernel made ptxas serialize
  // the tiles' wgmmas, C7510.)
  ReadyFlagWait{f.ready(j)}();
  DSV4_CTA_PROBE(CtaProbeSite::kExpertFused, 2, gate_up.p[0][0]);  // tile_ready
  expert_tile<WFmt::kFp4, 1, true, true, false>(f.down, down.p[tile.x], d % f.down_tiles, tile, item);
}

// The end of a gate/up cluster's item in the split fused step and in the ready-flag
// gate/up launch, after expert_tile's last cluster barrier (every CTA's output stores are
// behind it; rank 0's release below is cumulative through it): rank 0 counts the cluster
// on list tile j (acquire-release) and tells its CTAs whether it was the last; the last
// cluster runs the tile's SwiGLU and quantization, its warp items spread over the
// cluster's CTAs (gate/up read through L2), and rank 0 then sets the tile's ready flag
// (release). s_last: a shared int of each CTA.
__device__ __forceinline__ void cluster_tile_ready(const FusedExpertArgs& f, int j, int4 tile, uint32_t rank,
                                                   uint32_t split, int* s_last) {
  if (rank == 0 && threadIdx.x == 0) {
    const int last = atom_add_acq_rel_gpu(f.arrivals(j), 1) == f.gate_up_tiles - 1;
    for (uint32_t r = 0; r < split; ++r) st_cluster_u32(cluster_map(shared_address(s_last), r), uint32_t(last));
  }
  cluster_sync_all();  // every CTA's s_last written (and rank 0's acquire behind it)
  if (!*s_last) return;
  const int64_t blocks = f.inter / 128, warp_items = int64_t(tile.z) * blocks;
  const int64_t warps = int64_t(split) * (kThreads / 32);
  for (int64_t w = int64_t(rank) * (kThreads / 32) + (threadIdx.x >> 5); w < warp_items; w += warps)
    swiglu_quant_item<true>(static_cast<const uint16_t*>(f.gate_up.y), f.inter, tile.y + w / blocks, w % blocks,
                            int(threadIdx.x & 31), f.rw, f.rw_index, f.limit, f.hq, f.hs, f.split_pairs);
  __threadfence();     // this thread's h stores, before the cluster's flag
  cluster_sync_all();  // every CTA's h rows stored
  if (rank == 0 && threadIdx.x == 0) st_release_gpu(f.ready(j), 1);
}

// The fused step where both GEMMs split their K slices over the S CTAs of a cluster (1 row
// at bench-1g: 6 list tiles x 32 weight tiles a GEMM, S = 2; docs/design/fused-expert-step.md,
// "Split slices"). Grid (items, 1, S) in clusters of 1 x 1 x S, one work item a cluster:
// cluster rank 0 takes the ticket after the dependency wait and writes it into every CTA of
// its cluster, so the items are handed out in ticket order as in expert_ffn_fused_kernel.
// A gate/up item is the cluster-fold tile of expert_gemm_kernel's cluster launch; rank 0
// then counts it on its list tile, and the cluster of the last arrival runs the tile's
// SwiGLU and quantization (its warps' items spread over the cluster's CTAs) and sets the
// ready flag. A down item streams its first weight stages, then waits for that flag
// (ReadyFlagWait, gemm_tile's early-weights wait, which runs only where the host sets
// f.down.weights_before_wait, as it does) and folds as the cluster launch does. The same
// tiles and the same SwiGLU items as the separate launches: the same bits. Off by default:
// measured slower at one row (cuda_linear.cu, split_fused_experts_enabled).
template <bool kTma>
__global__ void __launch_bounds__(kThreads, 4) expert_ffn_split_fused_kernel(const FusedExpertArgs f,
                                                                              const __grid_constant__ ExpertTable gate_up,
                                                                              const __grid_constant__ ExpertTable down) {
  __shared__ int s_item, s_last;
  const uint32_t rank = cluster_cta_rank(), split = uint32_t(f.gate_up.split);
  wait_for_predecessor();
  if (rank == 0 && threadIdx.x == 0) {
    const int ticket = atomicAdd(f.sync, 1);
    for (uint32_t r = 0; r < split; ++r) st_cluster_u32(cluster_map(shared_address(&s_item), r), uint32_t(ticket));
  }
  cluster_sync_all();  // every CTA's s_item written
  const int item = s_item, tiles = *f.gate_up.num_tiles;
  const int gate_up_items = f.gate_up_tiles * tiles;
  if (item < gate_up_items) {
    const int j = item / f.gate_up_tiles;
    const int4 tile = f.gate_up.tiles[j];
    expert_tile<WFmt::kFp4, 1, false, kTma, false, true, true>(f.gate_up, gate_up.p[tile.x], item % f.gate_up_tiles,
                                                                tile, item);
    cluster_tile_ready(f, j, tile, rank, split, &s_last);
    return;
  }
  const int d = item - gate_up_items;
  if (d >= f.down_tiles * tiles) return;  // (the cluster's CTAs share the item: they leave together)
  const int j = d / f.down_tiles;
  const int4 tile = f.down.tiles[j];
  expert_tile<WFmt::kFp4, 1, false, kTma, false, true, true, ReadyFlagWait>(
      f.down, down.p[tile.x], d % f.down_tiles, tile, item, ReadyFlagWait{f.ready(j)});
}

// The routed experts as two cluster launches chained by ready flags (1 row at bench-1g;
// docs/design/fused-expert-step.md, "Ready flags across two launches"): the gate/up and
// down cluster launches of expert_gemm_kernel (grid (weight tiles, max list tiles, S),
// clusters of 1 x 1 x S) without the SwiGLU launch between them. Each gate/up cluster ends
// in cluster_tile_ready: the last of a list tile's clusters runs its SwiGLU and sets its
// flag. Each down cluster streams its first weight stages and then waits for its list
// tile's flag (ReadyFlagWait) instead of for its predecessor's end, so it starts while
// the other tiles' gate/up clusters run, and no SM slot is held before the gate/up grid
// has placed every CTA: the down launch starts only once every gate/up CTA has triggered
// (gemm_tile, after its stages), and none of those waits on a down CTA, so each flag
// comes. The same tiles and SwiGLU items as the separate launches: the same bits. Off by
// default: measured slower at one row (cuda_linear.cu, ready_flag_experts_enabled).
template <bool kTma>
__global__ void __launch_bounds__(kThreads, 4)
    expert_gate_up_ready_kernel(const FusedExpertArgs f, const __grid_constant__ ExpertTable gate_up) {
  __shared__ int s_last;
  wait_for_predecessor();
  const int j = int(blockIdx.y);
  if (j >= *f.gate_up.num_tiles) return;  // (a cluster's CTAs share blockIdx.y: they leave together)
  const int4 tile = f.gate_up.tiles[j];
  expert_tile<WFmt::kFp4, 1, false, kTma, false, true, true>(f.gate_up, gate_up.p[tile.x], int(blockIdx.x), tile,
                                                              int(blockIdx.y * gridDim.x + blockIdx.x));
  cluster_tile_ready(f, j, tile, cluster_cta_rank(), uint32_t(f.gate_up.split), &s_last);
}

// The down half (above); its first weight stages stream before its flag unless
// DSV4_CUDA_EXPERT_EARLY_WEIGHTS=0 (f.down.weights_before_wait). Its tile list is
// moe_prep's, which ended before any gate/up CTA passed its own wait, and so before this
// grid launched (read through L2, as the early expert launches do). Every CTA ends in the
// dependency wait (the gate/up grid's end, by then at most its CTAs' exits): this grid
// then ends after its predecessor, as a grid that waits at entry does, which the
// programmatic edges' rule needs (cuda_backend.cu, make_kernel_edges_programmatic).
template <bool kTma>
__global__ void __launch_bounds__(kThreads, 4)
    expert_down_ready_kernel(const FusedExpertArgs f, const __grid_constant__ ExpertTable down) {
  const int j = int(blockIdx.y);
  if (j < __ldcg(f.down.num_tiles)) {
    const int4 tile = __ldcg(f.down.tiles + j);
    // (gemm_tile calls its wait only after early weight stages; without them, first the flag)
    if (f.down.weights_before_wait == 0) ReadyFlagWait{f.ready(j)}();
    expert_tile<WFmt::kFp4, 1, false, kTma, false, true, true, ReadyFlagWait>(
        f.down, down.p[tile.x], int(blockIdx.x), tile, int(blockIdx.y * gridDim.x + blockIdx.x),
        ReadyFlagWait{f.ready(j)});
  }
  wait_for_predecessor();
}

// ---- routed-expert bookkeeping ----------------------------------------------------------
// One CTA of 1024 threads (block 0 of moe_prep_kernel). Counting sort of the pairs p = r*k + s with a local expert
// (ids[p] - expert_begin in [0, num_local)) into compact rows grouped by expert
// (pair_list[c] = p, token_rows[c] = r; the order inside an expert is not
// deterministic and does not matter: every row's result is computed alone), and the
// tile list {expert, first compact row, rows <= bm, 0} of ceil(count/bm) tiles per
// expert. Shared memory: 4 * num_local ints. Roofline: one CTA, O(pairs + experts)
// work; a few µs of latency per step.
__device__ __forceinline__ void expert_prep_block(const int* __restrict__ ids, int num_pairs, int k, int expert_begin,
                                                  int num_local, int bm, int max_tiles, int* __restrict__ pair_list,
                                                  int* __restrict__ token_rows, int4* __restrict__ tiles,
                                                  int* num_tiles, int* num_rows) {
  extern __shared__ int s_int[];
  int* cnt = s_int;
  int* roff = s_int + num_local;
  int* toff = s_int + 2 * num_local;
  int* cursor = s_int + 3 * num_local;
  __shared__ int s_warp[32][2];
  __shared__ int s_total[2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nthreads = blockDim.x;

  for (int e = tid; e < num_local; e += nthreads) cnt[e] = cursor[e] = 0;
  __syncthreads();
  for (int p = tid; p < num_pairs; p += nthreads) {
    const int e = ids[p] - expert_begin;
    if (e >= 0 && e < num_local) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();

  // Exclusive scans of the counts and of the tile counts: contiguous chunk per thread.
  const int per = (num_local + nthreads - 1) / nthreads;
  const int e0 = min(num_local, tid * per), e1 = min(num_local, e0 + per);
  int a = 0, b = 0;
  for (int e = e0; e < e1; ++e) {
    a += cnt[e];
    b += (cnt[e] + bm - 1) / bm;
  }
  int ia = a, ib = b;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int xa = __shfl_up_sync(0xffffffffu, ia, o), xb = __shfl_up_sync(0xffffffffu, ib, o);
    if (lane >= o) {
      ia += xa;
      ib += xb;
    }
  }
  if (lane == 31) {
    s_warp[warp][0] = ia;
    s_warp[warp][1] = ib;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = nthreads / 32;
    const int va = lane < nwarps ? s_warp[lane][0] : 0, vb = lane < nwarps ? s_warp[lane][1] : 0;
    int sa = va, sb = vb;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int xa = __shfl_up_sync(0xffffffffu, sa, o), xb = __shfl_up_sync(0xffffffffu, sb, o);
      if (lane >= o) {
        sa += xa;
        sb += xb;
      }
    }
    if (lane < nwarps) {
      s_warp[lane][0] = sa - va;
      s_warp[lane][1] = sb - vb;
    }
    if (lane == 31) {
      s_total[0] = sa;
      s_total[1] = sb;
    }
  }
  __syncthreads();
  int pa = s_warp[warp][0] + ia - a, pb = s_warp[warp][1] + ib - b;
  for (int e = e0; e < e1; ++e) {
    roff[e] = pa;
    toff[e] = pb;
    pa += cnt[e];
    pb += (cnt[e] + bm - 1) / bm;
  }
  __syncthreads();

  for (int p = tid; p < num_pairs; p += nthreads) {
    const int e = ids[p] - expert_begin;
    if (e >= 0 && e < num_local) {
      const int pos = roff[e] + atomicAdd(&cursor[e], 1);
      pair_list[pos] = p;
      token_rows[pos] = p / k;
    }
  }
  for (int e = tid; e < num_local; e += nthreads) {
    const int c = cnt[e];
    for (int j = 0; j * bm < c; ++j) {
      const int ti = toff[e] + j;
      if (ti < max_tiles) tiles[ti] = make_int4(e, roff[e] + j * bm, min(bm, c - j * bm), 0);
    }
  }
  if (tid == 0) {
    *num_tiles = min(s_total[1], max_tiles);
    *num_rows = s_total[0];
  }
}

// expert_prep_block's outputs by one warp, for at most 32 pairs (1-5 rows at k = 6): lane p
// holds pair p's expert and finds its place by counting the lanes ahead of it through
// shuffles, so no shared memory, no counters to zero and no block barrier. Why: at one row
// block 0's counting sort (its counts zeroed over every local expert, five block barriers,
// the ids read twice) kept the launch ~3.3 µs past its wait for 6 pairs, a link of the
// step's chain between the router's select and the experts; with the warp ~2.5 (batch-1
// graph traces, H100, eighty-seventh session; docs/design/cuda-linear.md).
// The same tile list as the block's; inside an expert the pairs are in pair order (the
// block's order there is its atomics', and no output depends on it: every row's result is
// computed alone).
constexpr int kExpertPrepWarpPairs = 32;
__device__ __forceinline__ void expert_prep_warp(const int* __restrict__ ids, int num_pairs, int k, int expert_begin,
                                                 int num_local, int bm, int max_tiles, int* __restrict__ pair_list,
                                                 int* __restrict__ token_rows, int4* __restrict__ tiles,
                                                 int* num_tiles, int* num_rows) {
  const int lane = threadIdx.x & 31;
  const int e = lane < num_pairs ? ids[lane] - expert_begin : -1;
  const bool local = e >= 0 && e < num_local;
  // ahead: the local pairs of a smaller expert, or of this expert at a smaller pair (this
  // pair's place); same_ahead: those of this expert alone (0: the expert's first pair, its
  // leader); count: this expert's pairs; rows: the local pairs.
  int ahead = 0, same_ahead = 0, count = 0, rows = 0;
#pragma unroll 4
  for (int q = 0; q < 32; ++q) {
    const int eq = __shfl_sync(0xffffffffu, e, q);
    const bool lq = eq >= 0 && eq < num_local;
    rows += lq;
    count += lq && eq == e;
    same_ahead += lq && eq == e && q < lane;
    ahead += lq && (eq < e || (eq == e && q < lane));
  }
  // The tile list: each leader's tiles after those of the smaller experts.
  const bool leader = local && same_ahead == 0;
  const int my_tiles = leader ? (count + bm - 1) / bm : 0;
  int tiles_ahead = 0, total_tiles = 0;
#pragma unroll 4
  for (int q = 0; q < 32; ++q) {
    const int eq = __shfl_sync(0xffffffffu, e, q), tq = __shfl_sync(0xffffffffu, my_tiles, q);
    total_tiles += tq;
    tiles_ahead += eq < e ? tq : 0;
  }
  if (local) {
    pair_list[ahead] = lane;
    token_rows[ahead] = lane / k;
  }
  if (leader) {  // (its place is its expert's first compact row)
    for (int j = 0; j < my_tiles && tiles_ahead + j < max_tiles; ++j)
      tiles[tiles_ahead + j] = make_int4(e, ahead + j * bm, min(bm, count - j * bm), 0);
  }
  if (lane == 0) {
    *num_tiles = min(total_tiles, max_tiles);
    *num_rows = rows;
  }
}

// out[p, :] = 0 for every pair whose id is outside [expert_begin, expert_end). One warp per pair.
// Roofline: writes 2*d bytes per non-local pair (none on one GPU except pads).
__device__ __forceinline__ void zero_nonlocal_pair(const int* __restrict__ ids, int64_t p, int expert_begin,
                                                   int expert_end, uint16_t* __restrict__ out, int64_t d, int vec16,
                                                   int lane) {
  const int id = ids[p];
  if (id >= expert_begin && id < expert_end) return;
  uint16_t* row = out + p * d;
  if (vec16) {
    for (int64_t i = lane; i < d / 8; i += 32) reinterpret_cast<uint4*>(row)[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t i = lane; i < d; i += 32) row[i] = 0;
  }
}

__global__ void zero_nonlocal_kernel(const int* __restrict__ ids, int64_t num_pairs, int expert_begin, int expert_end,
                                     uint16_t* __restrict__ out, int64_t d, int vec16) {
  wait_then_release_dependents();
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t p = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; p < num_pairs; p += nwarps)
    zero_nonlocal_pair(ids, p, expert_begin, expert_end, out, d, vec16, lane);
}

// The routed experts' three preparations in one launch of 1024-thread blocks (they
// were three launches of a few µs each at decode): block 0 builds the tile list as
// expert_prep_block; the warps of the other blocks quantize x's (row, 128-block)
// items as act_quant_kernel, then zero the non-local pairs as zero_nonlocal_kernel.
// Same code per item, so the same bits. A grid of block 0 alone builds the tile list only;
// with rows = 0 the other blocks only zero (x quantized by a launch before).
struct MoePrepArgs {
  const int* ids;
  int num_pairs, k, expert_begin, num_local, bm, max_tiles;
  int* pair_list;
  int* token_rows;
  int4* tiles;
  int* num_tiles;
  int* num_rows;
  const uint16_t* x;  // act_quant: rows x d
  int64_t rows, d;
  uint8_t* q;
  float* scale;
  int split_pairs;
  uint16_t* out;  // zero_nonlocal: num_pairs x d
  int vec16;
  int* fused_sync;  // expert_ffn_fused_kernel's ticket, counters and flags to zero (or null)
  int fused_sync_ints;
  int warp_list;  // the tile list by expert_prep_warp (num_pairs <= kExpertPrepWarpPairs)
};

__global__ void __launch_bounds__(1024) moe_prep_kernel(const MoePrepArgs a) {
  wait_then_release_dependents();
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < a.fused_sync_ints; i += blockDim.x) a.fused_sync[i] = 0;
    if (a.warp_list) {
      if (threadIdx.x < 32)
        expert_prep_warp(a.ids, a.num_pairs, a.k, a.expert_begin, a.num_local, a.bm, a.max_tiles, a.pair_list,
                         a.token_rows, a.tiles, a.num_tiles, a.num_rows);
      return;
    }
    expert_prep_block(a.ids, a.num_pairs, a.k, a.expert_begin, a.num_local, a.bm, a.max_tiles, a.pair_list,
                      a.token_rows, a.tiles, a.num_tiles, a.num_rows);
    return;
  }
  const int lane = threadIdx.x & 31;
  const int64_t quant_items = a.rows * (a.d / 128), items = quant_items + a.num_pairs;
  const int64_t nwarps = (int64_t(gridDim.x) - 1) * (blockDim.x >> 5);
  for (int64_t w = (int64_t(blockIdx.x) - 1) * (blockDim.x >> 5) + (threadIdx.x >> 5); w < items; w += nwarps) {
    if (w < quant_items) act_quant_item(a.x, a.d, a.d, a.q, a.scale, a.split_pairs, w, lane);
    else zero_nonlocal_pair(a.ids, w - quant_items, a.expert_begin, a.expert_begin + a.num_local, a.out, a.d, a.vec16,
                            lane);
  }
}

// ---- router (spec §6.1) --------------------------------------------------------------
// A block a token row; shared memory 3 * E + 2 * k floats. logits [T, E] fp32 from the gate
// GEMM. Scores as ref (sqrt(softplus) / sigmoid / softmax with the sum in expert
// order), selection by top-k of scores + bias with ties to the lower id, or
// tid2eid[token] (bias == nullptr), weights = scores[ids] / sum (normalize) * scale,
// summed in slot order. Pad rows (position < 0): ids -1, weights 0. A NaN biased score is
// never selected; slots left without a candidate (fewer than k scores not NaN) get id -1 and
// weight 0, as the reference's.
// Roofline: reads 4E bytes per row; k argmax rounds over E/32 values per lane took 2-5 µs a
// row on an H100 (CTA probe), so the block ranks instead where it applies (router_topk_by_rank).
// The chosen ids and their scores stay in shared memory until the lanes' final stores
// (lane 0 used to read them back from the output rows; measured no faster or slower).
// A block a row. With split > 0 the logits are still the router GEMM's K-slice partials
// ([split][rows][num_experts], the layout split_fold_kernel reads) and the block folds
// them itself, ((0 + p_0) + p_1) + ..., split_fold_kernel's order, so the same bits
// with one launch less on the chain; the whole block folds and scores (a thread an
// expert), then warp 0 alone selects. Without split the block is one warp, or as wide as the
// experts where it ranks (router_topk_by_rank: the scores over the block, then the rank).
__device__ __forceinline__ float router_score(int scoring, float logit) {
  return scoring == 0 ? sqrtf(core::softplus_f32(logit))  // sqrt(softplus), not softplus(sqrt) (spec §12.12)
                      : core::sigmoid_f32(logit);
}

// The top k of v[0, n) by the block (topk_rank.h's two passes; it needs no NaN in v, k <= 32
// and topk_rank_slots(n, k) ints at cand): ids[rank] = index for ranks 0 .. k-1, in the CPU
// reference's order. Instead of warp 0's k dependent rounds over all n values (2-5 µs of a
// 256-expert row on the H100, CTA probe, seventy-ninth session). Pass one a thread a value;
// pass two a warp a candidate, each lane counting its share of the slots, summed by one
// redux (the first form, a thread a candidate over all the slots, read +0.3% a step at 16
// rows against the rounds on the H100, eightieth session). Ends with a barrier.
__device__ __forceinline__ void router_topk_by_rank(const float* v, int n, int k, int* cand, int* ids) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) topk_rank_chunk_pass(v, n, k, i, cand);
  __syncthreads();
  const int slots = topk_rank_slots(n, k), lane = threadIdx.x & 31;
  for (int slot = threadIdx.x >> 5; slot < slots; slot += blockDim.x >> 5) {
    const int i = cand[slot];  // (the same for the whole warp)
    if (i < 0) continue;
    const int rank = __reduce_add_sync(0xffffffffu, topk_rank_count_ahead(v, slots, cand, v[i], i, lane, 32));
    if (lane == 0 && rank < k) ids[rank] = i;
  }
  __syncthreads();
}

// kEarly (DSV4_CUDA_ROUTER_EARLY, default on; off for A/B runs): the row's position and
// token (step metadata: no kernel writes them), the bias and the hash ids (weights) before
// the dependency wait, each thread loading the bias values it adds later; they were
// dependent round trips after it, on the chain from the router GEMM to the experts. The
// same bits. Shared memory: 3 E + 2 k floats.
// Row `row` by this block (router_select_kernel's, or a CTA of router_gemm_select_kernel,
// whose GEMM has waited already: kWait false, the early loads then). s_f: the shared memory.
// (The late form's wait is its caller's, before the row's index is formed.) kFoldLoads: the
// fold's slice loads in flight a thread (the adds in slice order whatever it is). kSite,
// kFolded: the CTA probe's site and the mark numbers of `folded` and `selected` (kFolded + 1),
// stamped with probe_tag (the kernel's scope's tag); kWait's `waited` is mark 1.
template <bool kEarly, bool kWait, int kFoldLoads = 8, CtaProbeSite kSite = CtaProbeSite::kNone, int kFolded = 0>
__device__ __forceinline__ void router_select_row(const float* __restrict__ logits, int split, int64_t rows,
                                                  int64_t row, int num_experts, int k, int scoring, int normalize,
                                                  float route_scale, const float* __restrict__ bias,
                                                  const int64_t* __restrict__ tid2eid,
                                                  const int32_t* __restrict__ token_ids,
                                                  const int32_t* __restrict__ positions, float* __restrict__ weights,
                                                  int32_t* __restrict__ ids, float* s_f, bool by_rank,
                                                  const void* probe_tag) {
  float* score = s_f;
  float* biased = s_f + num_experts;
  int* s_ids = reinterpret_cast<int*>(s_f + 2 * num_experts);  // [k] the chosen ids, slot order
  float* s_wt = s_f + 2 * num_experts + k;                      // [k] their scores
  float* bias_s = s_f + 2 * num_experts + 2 * k;                // [E] the bias, loaded early
  const int lane = threadIdx.x;  // (warp 0's lane; other warps only score and rank)
  float* wt = weights + row * k;
  int32_t* it = ids + row * k;
  const int32_t pos = positions[row];
  const auto hash_ids = [&] {  // thread 0: the token's ids, slot order
    // tid2eid is int64; ids never pass through a float type (spec §12.13).
    const int64_t* tr = tid2eid + int64_t(token_ids[row]) * k;
    for (int i = 0; i < k; ++i) s_ids[i] = int32_t(tr[i]);
  };
  if constexpr (kEarly) {
    if (pos >= 0) {
      if (tid2eid) {
        if (threadIdx.x == 0) hash_ids();
      } else {  // (read by the thread that loads it, or after the fold's block barrier)
        for (int i = threadIdx.x; i < num_experts; i += blockDim.x) bias_s[i] = bias[i];
      }
    }
    if constexpr (kWait) {
      wait_then_release_dependents();
      DSV4_CTA_PROBE(kSite, 1, probe_tag);  // waited
    }
  }
  // The bias of expert i, read by the thread that loaded it in the early form.
  const auto bias_of = [&](int i) { return kEarly ? bias_s[i] : bias[i]; };
  if (pos < 0) {
    for (int i = lane; i < k; i += 32) {
      wt[i] = 0.0f;
      it[i] = -1;
    }
    return;
  }
  // Every thread scores its experts (split > 0: folded from the slices first); warp 0 then
  // applies the softmax (scoring 2) and the hash ids, or the block ranks the biased scores.
  bool nan = false;  // (a NaN among this thread's biased scores)
  for (int i = threadIdx.x; i < num_experts; i += blockDim.x) {
    float v = 0.0f;
    if (split > 0) {
      const int64_t stride = rows * num_experts;
      const float* q = logits + row * num_experts + i;
      for (int s0 = 0; s0 < split; s0 += kFoldLoads) {  // kFoldLoads slices' loads in flight
        float part[kFoldLoads];
#pragma unroll
        for (int j = 0; j < kFoldLoads; ++j)
          if (s0 + j < split) part[j] = __ldcg(q + int64_t(s0 + j) * stride);
#pragma unroll
        for (int j = 0; j < kFoldLoads; ++j)
          if (s0 + j < split) v += part[j];
      }
    } else {
      v = logits[row * num_experts + i];
    }
    score[i] = scoring == 2 ? v : router_score(scoring, v);
    if (scoring != 2 && !tid2eid) {
      biased[i] = score[i] + bias_of(i);
      nan |= biased[i] != biased[i];
    }
  }
  // The top k by rank (router_topk_by_rank; by_rank: DSV4_CUDA_ROUTER_RANK) where it
  // applies: no NaN among the biased scores (a rank needs a total order), and the candidates
  // fit the early bias's slots (read by now: the biased scores hold it). Else warp 0's k
  // rounds below, as before.
  bool ranked = false;
  if (by_rank && scoring != 2 && !tid2eid && k <= 32 && topk_rank_slots(num_experts, k) <= num_experts) {
    ranked = !__syncthreads_or(nan);  // (also the barrier after the scores)
    if (ranked) router_topk_by_rank(biased, num_experts, k, reinterpret_cast<int*>(bias_s), s_ids);
  }
  __syncthreads();
  DSV4_CTA_PROBE(kSite, kFolded, probe_tag);  // folded (scored; ranked too where it applies)
  if (threadIdx.x >= 32) return;
  if (scoring == 2) {
    float mx = -INFINITY;
    for (int i = lane; i < num_experts; i += 32) mx = fmaxf(mx, score[i]);
    mx = warp_max(mx);
    __syncwarp();
    if (lane == 0) {  // the reference's sequential sum
      float z = 0.0f;
      for (int i = 0; i < num_experts; ++i) z += (score[i] = core::exp_f32_via_f64(score[i] - mx));
      biased[0] = z;
    }
    __syncwarp();
    const float z = biased[0];
    __syncwarp();
    for (int i = lane; i < num_experts; i += 32) score[i] /= z;
  }
  __syncwarp();
  if (tid2eid) {
    if (!kEarly && lane == 0) hash_ids();  // (the early form has them)
  } else if (!ranked) {
    if (scoring == 2)
      for (int i = lane; i < num_experts; i += 32) biased[i] = score[i] + bias_of(i);
    __syncwarp();
    for (int sel = 0; sel < k; ++sel) {
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      for (int i = lane; i < num_experts; i += 32) {
        const float v = biased[i];
        if (v > bv || (v == bv && i < bi)) {
          bv = v;
          bi = i;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (lane == 0) {  // (no candidate left: only NaN scores remain; the slot routes nowhere)
        s_ids[sel] = bi < num_experts ? bi : -1;
        if (bi < num_experts) biased[bi] = __int_as_float(0x7fffffff);  // taken: NaN, never picked again
      }
      __syncwarp();
    }
  }
  __syncwarp();
  DSV4_CTA_PROBE(kSite, kFolded + 1, probe_tag);  // selected
  if (lane == 0) {  // the sum in slot order
    float sum = 0.0f;
    for (int i = 0; i < k; ++i) {
      const int id = s_ids[i];
      const float sc = (id >= 0 && id < num_experts) ? score[id] : 0.0f;
      s_wt[i] = sc;
      sum += sc;
    }
    biased[0] = sum;  // (biased is done with)
  }
  __syncwarp();
  const float sum = biased[0];
  for (int i = lane; i < k; i += 32) {
    float v = s_wt[i];
    if (normalize && s_ids[i] >= 0) v = v / sum;  // (a slot routed nowhere weighs 0, also where all are)
    wt[i] = v * route_scale;
    it[i] = s_ids[i];
  }
}

template <bool kEarly>
__global__ void router_select_kernel(const float* __restrict__ logits, int split, int64_t rows, int num_experts,
                                     int k, int scoring, int normalize, float route_scale,
                                     const float* __restrict__ bias, const int64_t* __restrict__ tid2eid,
                                     const int32_t* __restrict__ token_ids, const int32_t* __restrict__ positions,
                                     float* __restrict__ weights, int32_t* __restrict__ ids, int by_rank) {
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kRouterSelect, logits);
  if constexpr (!kEarly) {
    wait_then_release_dependents();
    DSV4_CTA_PROBE(CtaProbeSite::kRouterSelect, 1, logits);  // waited
  }
  extern __shared__ float s_f[];
  router_select_row<kEarly, true, 8, CtaProbeSite::kRouterSelect, 2>(
      logits, split, rows, blockIdx.x, num_experts, k, scoring, normalize, route_scale, bias, tid2eid, token_ids,
      positions, weights, ids, s_f, by_rank != 0, logits);
}

// The router's logits GEMM and its select in one launch (DSV4_CUDA_ROUTER_ONE_LAUNCH_ROWS):
// gemm_kernel's bf16 tile with its K slices split over CTAs and its partials left in
// global memory, as router_select_kernel's fold reads them; then every CTA counts itself
// (an acquire-release add, after a CTA barrier: its partial stores published), and the
// last min(m, CTAs) to arrive take a row each (and every CTAs-th row after it), once the
// count is complete, and fold and select it with router_select_kernel's code (kEarly's
// loads, no wait: the GEMM has waited), so the same bits. What it saves: the boundary
// between the two launches on every layer's chain (the select's launch waits for the
// GEMM grid's end, then ramps). The hand-over is hc_mix_finish_kernel's: no CTA waits
// before it is counted, so the count completes whatever order the CTAs start in and
// however few fit at once; the last finisher past its wait zeroes the counts for the
// next launch on them (which reads them after its own dependency wait). Shared memory:
// the GEMM's (the select's 3 E + 2 k floats fit it, the host checks). A finisher's fold
// has every slice's load of an expert in flight at once (kMaxSlices; router_select_kernel's
// block, twice the threads, has eight), the same adds.
struct RouterSelectArgs {
  int* sync;  // [arrivals, finishers past their wait], zero between launches
  int num_experts, k, scoring, normalize;
  float route_scale;
  const float* bias;
  const int64_t* tid2eid;
  const int32_t* token_ids;
  const int32_t* positions;
  float* weights;
  int32_t* ids;
  int by_rank;  // router_topk_by_rank where it applies (DSV4_CUDA_ROUTER_RANK)
};

template <int NT>
__global__ void __launch_bounds__(kThreads) router_gemm_select_kernel(const GemmParams p, const RouterSelectArgs r) {
  constexpr int BM = 8 * NT;
  const int linear = int(blockIdx.y * gridDim.x + blockIdx.x);
  const int m_tile = linear % int(gridDim.y), n_tile = linear / int(gridDim.y);
  const int row_base = m_tile * BM;
  // (gemm_tile stamps its marks under kGemmTile: the scope its slots come from; the hand-over's are 6-9)
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kGemmTile, p.w0);
  // The bias (a weight: no kernel writes it) toward the L2 for the finishers, whichever CTAs
  // they are (router_select_kernel's early form loads it before its dependency wait).
  if (linear == 0 && blockIdx.z == 0 && r.bias != nullptr && int(threadIdx.x) * 32 < r.num_experts)
    asm volatile("prefetch.L2 [%0];" ::"l"(r.bias + 32 * threadIdx.x));
  gemm_tile<WFmt::kBf16, NT, false, true>(p, p.w0, p.s0, p.w1, p.s1, n_tile % p.tiles_per_group,
                                          n_tile / p.tiles_per_group, row_base, min(BM, p.m - row_base), linear);
  __shared__ int s_arrival;
  __syncthreads();  // every partial store of the CTA issued (its release below publishes them); stages free
  if (threadIdx.x == 0) s_arrival = atom_add_acq_rel_gpu(r.sync, 1);
  __syncthreads();
  DSV4_CTA_PROBE(CtaProbeSite::kGemmTile, 6, p.w0);  // counted
  // The last `finishers` arrivals take rows finisher, finisher + finishers, ... (a launch of
  // fewer CTAs than rows: a small router, e.g. the tests' 2-slice one).
  const int arrivals = int(gridDim.x * gridDim.y * gridDim.z), finishers = min(p.m, arrivals);
  const int finisher = s_arrival - (arrivals - finishers);
  if (finisher < 0) return;
  if (threadIdx.x == 0) {
    if (s_arrival != arrivals - 1) {  // (the last arrival's own add read the complete count)
      unsigned polls = 0;
      while (ld_acquire_gpu(r.sync) < arrivals) {
        __nanosleep(32);
        if (++polls == (1u << 27)) __trap();  // a broken count fails the launch instead of hanging
      }
    }
    if (finishers == 1) {
      r.sync[0] = 0;
    } else if (atom_add_acq_rel_gpu(r.sync + 1, 1) == finishers - 1) {  // every finisher is past its wait
      r.sync[0] = 0;
      r.sync[1] = 0;
    }
  }
  __syncthreads();  // (thread 0's acquire, then this barrier: every CTA's partials visible to all)
  DSV4_CTA_PROBE(CtaProbeSite::kGemmTile, 7, p.w0);  // handed_over
  extern __shared__ __align__(16) uint8_t smem_raw[];
  for (int row = finisher; row < p.m; row += finishers) {
    router_select_row<true, false, kMaxSlices, CtaProbeSite::kGemmTile, 8>(
        p.partial, p.split, p.m, row, r.num_experts, r.k, r.scoring, r.normalize, r.route_scale, r.bias, r.tid2eid,
        r.token_ids, r.positions, r.weights, r.ids, reinterpret_cast<float*>(smem_raw), r.by_rank != 0, p.w0);
    __syncthreads();  // (warp 0 selects alone: the next row's fold waits until it is done with shared memory)
  }
}

// ---- simple reference kernels (DSV4_CUDA_KERNELS=simple) --------------------------------
// Obviously-correct and slow: one warp per output element, lanes stride over K with
// fp32 fmaf on the exact dequantized values, then a butterfly sum. Roofline: none
// intended; the weights are re-read once per activation row.

// Dequantized weight value W[n, kk] of a matrix of N rows and K columns: kind 0 FP8 (block 128x128), 1 FP4 (per
// 32, in the CUDA backend's FP4 order, fp4_device_layout.h), 2 the grouped linear's FP8 (in its order,
// fp8_bf16_layout.h).
__device__ __forceinline__ float weight_value(const uint8_t* w, const uint8_t* ws, int kind, int64_t n, int64_t kk,
                                              int64_t N, int64_t K) {
  if (kind == 1) {
    return core::e2m1_to_float(fp4_layout::element_code(w, n, kk, N, K)) *
           core::e8m0_to_float(ws[fp4_layout::scale_offset(n, kk / 128, N, K / 128) + (kk % 128) / 32]);
  }
  const int64_t at = kind == 2 ? fp8_bf16_layout::element_offset(n, kk, N, K) : n * K + kk;
  return core::e4m3_to_float(w[at]) * core::e8m0_to_float(ws[(n / 128) * ((K + 127) / 128) + kk / 128]);
}

// sum_k xq[kk] * 2^e[kk/128] * W[n, kk] over one quantized activation row (W: N x K; all lanes get the sum).
__device__ __forceinline__ float simple_qdot(const uint8_t* xq, const float* xs, const uint8_t* w, const uint8_t* ws,
                                             int fp4, int64_t n, int64_t N, int64_t K, int lane) {
  float acc = 0.0f;
  for (int64_t kk = lane; kk < K; kk += 32)
    acc = fmaf(core::e4m3_to_float(xq[kk]) * xs[kk / 128], weight_value(w, ws, fp4, n, kk, N, K), acc);
  return warp_sum(acc);
}

// y[m * ldy + n] = bf16(xq[m] . W[n]) for m < M, n < N.
__global__ void simple_quant_linear_kernel(const uint8_t* __restrict__ xq, const float* __restrict__ xs, int64_t M,
                                           int64_t K, const uint8_t* __restrict__ w, const uint8_t* __restrict__ ws,
                                           int fp4, int64_t N, uint16_t* __restrict__ y, int64_t ldy) {
  wait_for_predecessor();
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t o = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; o < M * N; o += nwarps) {
    const int64_t m = o / N, n = o % N;
    const float v = simple_qdot(xq + m * K, xs + m * (K / 128), w, ws, fp4, n, N, K, lane);
    if (lane == 0) y[m * ldy + n] = core::float_to_bf16(v);
  }
}

// y[m, n] = fp32(x[m]) . fp32(W[n]) with x bf16 or f32, W bf16, y bf16 or f32.
__global__ void simple_linear_bf16_kernel(const void* __restrict__ x, int x_f32, const uint16_t* __restrict__ w,
                                          int64_t M, int64_t N, int64_t K, void* __restrict__ y, int y_f32) {
  wait_for_predecessor();
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t o = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; o < M * N; o += nwarps) {
    const int64_t m = o / N, n = o % N;
    float acc = 0.0f;
    for (int64_t kk = lane; kk < K; kk += 32) {
      const float xv = x_f32 ? static_cast<const float*>(x)[m * K + kk]
                             : core::bf16_to_float(static_cast<const uint16_t*>(x)[m * K + kk]);
      acc = fmaf(xv, core::bf16_to_float(w[n * K + kk]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (y_f32) static_cast<float*>(y)[m * N + n] = acc;
      else static_cast<uint16_t*>(y)[m * N + n] = core::float_to_bf16(acc);
    }
  }
}

// y[m, g*R + r] = bf16(sum_c x[m, g*C + c] * Wdeq[g*R + r, c]) (spec §5.6).
__global__ void simple_grouped_kernel(const uint16_t* __restrict__ x, const uint8_t* __restrict__ w,
                                      const uint8_t* __restrict__ ws, int64_t M, int64_t G, int64_t R, int64_t C,
                                      uint16_t* __restrict__ y) {
  wait_for_predecessor();
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t N = G * R;
  for (int64_t o = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; o < M * N; o += nwarps) {
    const int64_t m = o / N, n = o % N, grp = n / R;
    const uint16_t* xr = x + m * G * C + grp * C;
    float acc = 0.0f;
    for (int64_t c = lane; c < C; c += 32)
      acc = fmaf(core::bf16_to_float(xr[c]), weight_value(w, ws, 2, n, c, N, C), acc);
    acc = warp_sum(acc);
    if (lane == 0) y[m * N + n] = core::float_to_bf16(acc);
  }
}

// h[r, i] = bf16(rw[r] * silu(min(g, L)) * clamp(u, +-L)) from gu [R, 2I] = (g | u).
__global__ void simple_swiglu_kernel(const uint16_t* __restrict__ gu, const float* __restrict__ rw, int64_t R,
                                     int64_t inter, float limit, uint16_t* __restrict__ h) {
  wait_for_predecessor();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < R * inter; o += stride) {
    const int64_t r = o / inter, i = o % inter;
    float gate = core::bf16_to_float(gu[r * 2 * inter + i]), up = core::bf16_to_float(gu[r * 2 * inter + inter + i]);
    if (limit > 0.0f) {
      up = core::clamp_f32(up, -limit, limit);
      gate = limit < gate ? limit : gate;
    }
    float act = core::silu_f32(gate) * up;
    if (rw) act = rw[r] * act;
    h[r * inter + i] = core::float_to_bf16(act);
  }
}

// Routed experts, simple path, gate/up + SwiGLU: h[p, i] for every pair p whose expert
// is in [chunk_begin, chunk_end) (global ids; table entry id - chunk_begin).
__global__ void simple_expert_gateup_kernel(const int* __restrict__ ids, int64_t num_pairs, int k, int chunk_begin,
                                            int chunk_end, const __grid_constant__ ExpertTable table, int fp4,
                                            const uint8_t* __restrict__ xq, const float* __restrict__ xs, int64_t D,
                                            int64_t inter, float limit, const float* __restrict__ weights,
                                            uint16_t* __restrict__ h) {
  wait_for_predecessor();
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t o = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; o < num_pairs * inter; o += nwarps) {
    const int64_t p = o / inter, i = o % inter;
    const int id = ids[p];
    if (id < chunk_begin || id >= chunk_end) continue;
    const uint8_t* const* e = table.p[id - chunk_begin];
    const int64_t r = p / k;
    const float g = simple_qdot(xq + r * D, xs + r * (D / 128), e[0], e[1], fp4, i, inter, D, lane);
    const float u = simple_qdot(xq + r * D, xs + r * (D / 128), e[2], e[3], fp4, i, inter, D, lane);
    float gate = core::round_bf16(g), up = core::round_bf16(u);  // linear outputs are bf16
    if (limit > 0.0f) {
      up = core::clamp_f32(up, -limit, limit);
      gate = limit < gate ? limit : gate;
    }
    const float act = weights[p] * (core::silu_f32(gate) * up);
    if (lane == 0) h[p * inter + i] = core::float_to_bf16(act);
  }
}

// Routed experts, simple path, down projection: out[p, d] for local pairs in the chunk.
__global__ void simple_expert_down_kernel(const int* __restrict__ ids, int64_t num_pairs, int chunk_begin,
                                          int chunk_end, const __grid_constant__ ExpertTable table, int fp4,
                                          const uint8_t* __restrict__ hq, const float* __restrict__ hs, int64_t inter,
                                          int64_t D, uint16_t* __restrict__ out) {
  wait_for_predecessor();
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t o = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; o < num_pairs * D; o += nwarps) {
    const int64_t p = o / D, d = o % D;
    const int id = ids[p];
    if (id < chunk_begin || id >= chunk_end) continue;
    const uint8_t* const* e = table.p[id - chunk_begin];
    const float v = simple_qdot(hq + p * inter, hs + p * (inter / 128), e[0], e[1], fp4, d, D, inter, lane);
    if (lane == 0) out[p * D + d] = core::float_to_bf16(v);
  }
}

}  // namespace dsv4::ops::linear_kernels
