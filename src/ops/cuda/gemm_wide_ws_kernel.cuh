// The wide FP8 GEMM with its warps specialised (thirtieth session; the default since the
// thirty-first, DSV4_CUDA_WIDE_WS=0 turns it off): the tile and the per-element accumulation sequence of
// gemm_wide_kernel<FP8, R, kTwoSets> (gemm_wide_kernel.cuh), so the same bits, with the
// work of a stage split by role instead of done by every thread in step:
//   - a producer warpgroup issues every cp.async of a stage (weights, activations, their
//     scales) and posts its completion on the stage's `full` barrier
//     (cp.async.mbarrier.arrive.noinc: the barrier counts the producer threads'
//     copies, nobody waits on a copy group);
//   - two consumer warpgroups, 64 weight rows each, wait on `full`, chain the stage's
//     4 k32 wgmmas from zero, wait for the chain, fold it (p = fmaf(d, 2^w * 2^x, p))
//     and release the buffer on the stage's `empty` barrier.
// No block barrier inside the loop: each consumer runs at its own pace, so one can fold
// while the other's chain is on the tensor core, and the copies no longer share the
// consumers' issue slots (docs/design/cuda-linear.md, "The wide FP8 kernel's stage, in
// cycles": the stage took ~3100 cycles for ~512 of tensor work with both warpgroups
// folding at once between two block barriers a stage). A CTA walks tiles (mode 2: a CTA
// an SM): the producer runs on into the next tile's stages while the consumers write
// the last tile's output, so a tile's fill and its epilogue overlap its neighbours'.
// FP8-as-bf16 (wo_a, grouped; forty-second session; the default since the sixty-sixth,
// DSV4_CUDA_WIDE_WS_WO_A=0 turns it off) takes the same roles with gemm_wide_kernel<
// FP8-as-bf16>'s stage: 64-wide, weights in 64-byte rows (tile-major) decoded by the
// consumers to bf16 A fragments, 4 k16 RS wgmmas from zero, p = fmaf(d, 2^w, p): the same
// bits as that kernel. Its consumers (consume_fp8bf16_tile, sixty-sixth session) keep one
// of their chains on the tensor core while they decode and fold: a stage's products are
// two chains (one a half of the tile's activation rows: m64n64 in place of m64n128, the
// same per-element sums), the next stage is decoded into a second fragment set and the
// first half folded while the second half runs, and the next stage's first half is issued
// before the second is folded; `setmaxnreg` moves the registers this takes (two fragment
// sets) from the producer to the consumers. Before, each stage's chain was waited for
// whole before its decode-free fold: ncu at 256 rows had a third of the stall samples at
// that wait and the launch at 47.2 µs; now 44.7 (the lockstep kernel: 56.8).
// bf16 in 256-row tiles of one K slice (the LM head from 129 rows; forty-fourth session, the
// default since the forty-fifth: DSV4_CUDA_WIDE_WS_BF16=0 turns it off) takes the same roles
// with gemm_wide_kernel<bf16, 256>'s chain: each consumer's m64n256k16 products summed over
// the whole K by the tensor core, a stage's products waited for one stage later (its buffer
// released then), and the 128 results a thread stored from registers (f32 or bf16): the
// same bits. Why: ncu put that kernel at ~54% of the tensor core's rate, its stall samples
// on the copy code all 256 threads run between the stages' products (docs/BENCHMARKS.md,
// forty-fourth session); in this one the LM head took 486 against 511 µs (forty-fifth).
#pragma once

#include <type_traits>

#include "ops/cuda/gemm_wide_kernel.cuh"

namespace dsv4::ops::linear_kernels {

constexpr int kWsProducerThreads = 128;
constexpr int kWsConsumerThreads = 256;  // two warpgroups, 64 weight rows each
constexpr int kWsThreads = kWsProducerThreads + kWsConsumerThreads;
constexpr int kWsOutStride = kTileN * 2 + 16;  // bytes a row of the bf16 output tile (padded: distinct banks)

// Bytes a weight row takes in a stage buffer: FP8's 128 (128-byte swizzle, read by
// wgmma), FP8-as-bf16's 64 e4m3 bytes (read as A fragments, 16 bytes a row).
template <WFmt F>
__host__ __device__ constexpr int wide_ws_weight_row_bytes() {
  return F == WFmt::kFp8Bf16 ? FmtTraits<F>::kWStride : 128;
}

// Dynamic shared memory of gemm_wide_ws_kernel<F, R, kTwoSets> at S stages: the stage
// buffers (128 weight rows, and R activation rows of 128 bytes), the bf16 output tile
// (its own: with tiles walked by one CTA the stage buffers already take the next tile's
// copies; bf16 weights: none, the results go out from registers), the running totals over
// K slices (kTwoSets), the activation scales and the block-scale word of each stage (an
// even count of words: the barriers after them are 8-byte objects), a full and an empty
// barrier a stage. (FP8-as-bf16: no activation scales.)
__host__ __device__ constexpr int wide_ws_scale_words(int S) { return (S + 1) & ~1; }
template <WFmt F, int R, bool kTwoSets>
__host__ __device__ constexpr int gemm_wide_ws_smem_bytes(int S) {
  return 1024 /* alignment slack */ + S * (kTileN * wide_ws_weight_row_bytes<F>() + R * 128) +
         (F == WFmt::kBf16 ? 0 : R * kWsOutStride) +
         (kTwoSets ? kWsConsumerThreads * (R / 2) * 4 : 0) + (F == WFmt::kFp8 ? S * R * 4 : 0) +
         wide_ws_scale_words(S) * 4 + 2 * S * 8;
}
// Four stages where they fit (FP8 at R = 128 with two sets: three).
template <WFmt F, int R, bool kTwoSets>
__host__ __device__ constexpr int wide_ws_stages() {
  return gemm_wide_ws_smem_bytes<F, R, kTwoSets>(4) <= 227 * 1024 ? 4 : 3;
}

__device__ __forceinline__ void mbar_arrive(uint32_t a) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(a) : "memory");
}
// The barrier at `a` receives one arrival once every cp.async this thread has issued so
// far has landed (.noinc: that arrival is one of the count the barrier was set up with).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t a) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}
// A warpgroup's register budget moved (sm_90a; every thread of the warpgroup runs it): the
// producer gives registers back to the pool, the consumers take them. The kernel launches
// at 168 a thread (384 threads, one CTA an SM: 64512 registers); FP8-as-bf16's consumers
// hold two accumulator halves and two fragment sets (~200), the producer fits 56.
constexpr int kWsProducerRegs = 56, kWsConsumerRegs = 224;
static_assert(kWsProducerThreads * kWsProducerRegs + kWsConsumerThreads * kWsConsumerRegs <= kWsThreads * 168,
              "the warpgroups' registers stay inside the launch's");
template <int N>
__device__ __forceinline__ void warpgroup_regs_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void warpgroup_regs_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
// A barrier of the consumer warpgroups only (id 1; __syncthreads is id 0).
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kWsConsumerThreads) : "memory");
}

// One output tile of the grid's: its rows, group and weight rows.
struct WideWsTile {
  int row_base, rows, group, n0, valid_n;  // n0: the first weight row inside the group
  bool second;  // a stacked pair's second weight (w1, s1, and y1 where given)
};
// The tile's first weight row (of w0, or of w1 where second); grouped (FP8-as-bf16): of
// its group's rows, which are also its output columns (no pair).
template <bool kGrouped>
__device__ __forceinline__ int64_t wide_ws_weight_row(const GemmParams& p, const WideWsTile& t) {
  if constexpr (kGrouped) return int64_t(t.group) * p.n + t.n0;
  else return t.n0 - (t.second ? p.n_split : 0);
}
template <int R, bool kGrouped>
__device__ __forceinline__ WideWsTile wide_ws_tile(const GemmParams& p, int tile, int m_tiles) {
  WideWsTile t;
  const int m_tile = tile % m_tiles, n_tile = tile / m_tiles;  // (the row tile fastest, as gemm_wide_kernel)
  t.row_base = m_tile * R;
  t.rows = min(R, p.m - t.row_base);
  t.group = kGrouped ? n_tile / p.tiles_per_group : 0;  // (FP8: one group)
  t.n0 = (kGrouped ? n_tile % p.tiles_per_group : n_tile) * kTileN;
  t.valid_n = min(kTileN, p.n - t.n0);
  t.second = t.n0 >= p.n_split;  // (host keeps n_split % 128 == 0; grouped: n_split = n)
  return t;
}

// The block-scale row of tile t's 128 weight rows (one 128-row scale block: its first
// weight row is a multiple of 128).
template <bool kGrouped>
__device__ __forceinline__ const uint8_t* wide_ws_scale_row(const GemmParams& p, const WideWsTile& t) {
  if constexpr (kGrouped) return p.s0 + wide_ws_weight_row<true>(p, t) / 128 * int64_t(p.s_row_stride);
  else return (t.second ? p.s1 : p.s0) + (t.n0 - (t.second ? p.n_split : 0)) / 128 * int64_t(p.s_row_stride);
}

// The results of a bf16 256-row tile from a consumer thread's registers: d[4q + e] is weight
// row (output column) row0 + g + 8 * (e / 2) of the tile, activation row 8q + 2t + e % 2.
// A warp's store of one (q, e) covers 8 consecutive columns of 4 output rows: 32-byte
// pieces (f32). Rows past the tile's and columns past valid_n are not stored. The values
// are stage_wide_results's (its 0 + d), so the bits are gemm_wide_kernel's.
__device__ __forceinline__ void store_wide256_results(const GemmParams& p, const WideWsTile& tile,
                                                      const float (&d)[128], int row0, int g, int t) {
  const TileOutput out = tile_output(p, tile.second, tile.n0);
#pragma unroll
  for (int q = 0; q < 32; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + g + 8 * (e >> 1), c = 8 * q + 2 * t + (e & 1);
      if (c < tile.rows && r < tile.valid_n)  // (0 + d: -0 -> +0, as stage_wide_results writes it)
        out.store(p, tile.row_base, c, r, 0.0f + d[4 * q + e]);
    }
}

// A consumer warpgroup's share of a bf16 256-row tile: the tile's stages, from CTA stage g
// on, each waited for on its `full` barrier (full0 + 8 * buffer) and its 4 m64n256k16
// products chained onto d over the whole K (from zero at the first, then summing: the
// lockstep kernel's chain). Stage it's products stay in flight across the next stage's
// wait; once they are done (wait_1 after the next stage's issue) release(buffer) gives
// its buffer back, and the last one's after the chain's end. w_stage / a_stage: the
// stage buffer's weights (this warpgroup's 64 rows start 64 * cw rows in) and activations.
// kGenericCopies: the stages were copied by cp.async (the generic proxy), so the wgmmas
// need a proxy fence after the barrier; TMA copies do not. Both bf16 256-row kernels
// (gemm_wide_ws_kernel, gemm_wide_mc_kernel.cuh) chain with it.
template <int S, bool kGenericCopies, typename WStage, typename AStage, typename Release>
__device__ __forceinline__ void chain_bf16_tile256(float (&d)[128], unsigned& g, int stages_total, uint32_t full0,
                                                   WStage w_stage, AStage a_stage, int cw, Release release) {
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.0f;
  int prev = 0;
  for (int it = 0; it < stages_total; ++it, ++g) {
    const int buf = int(g % S);
    mbar_wait(full0 + 8 * buf, (g / S) & 1);
    if constexpr (kGenericCopies) fence_proxy_async();  // the producer's copies, seen through the barrier, to the wgmmas
    const uint32_t a_lo = wgmma_desc_lo(w_stage(buf) + cw * 64 * 128);
    const uint32_t b_lo = wgmma_desc_lo(a_stage(buf));
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j)
      wgmma_wide256_bf16(d, wgmma_desc_at(a_lo, 32 * j), wgmma_desc_at(b_lo, 32 * j), it == 0 && j == 0 ? 0 : 1);
    wgmma_commit();
    if (it > 0) {
      wgmma_wait_1();
      release(prev);  // stage it-1's weights and activations are read
    }
    prev = buf;
  }
  wgmma_wait_all();
  release(prev);
}

// The slices of a consumer warpgroup's tile, each run as a pipeline of its stages:
// first(gs) starts CTA stage gs (its first products in flight), stage(kNext, it, parity)
// runs tile stage it and, where kNext, starts the next one; a slice's last stage has no
// next, so nothing is in flight at its end, where p_s goes into the running total
// (kTwoSets: tot[i * kWsConsumerThreads] += cur[i], cur from zero again). Stages come in
// unrolled pairs (parity 0, 1: the fragment sets the caller alternates), the last one
// peeled. Why a slice at a time: a running slice end inside the pipeline (a branch
// writing cur while a chain is in flight) made ptxas serialize the wgmmas (C7514).
template <int NA, bool kTwoSets, typename First, typename Stage>
__device__ __forceinline__ void run_pipelined_slices(float (&cur)[NA], unsigned g, int stages_total, int per_slice,
                                                     float* tot, First first, Stage stage) {
  using Next = std::true_type;
  using Last = std::false_type;
#pragma unroll
  for (int i = 0; i < NA; ++i) cur[i] = 0.0f;
  if constexpr (kTwoSets) {
#pragma unroll
    for (int i = 0; i < NA; ++i) tot[i * kWsConsumerThreads] = 0.0f;
  }
  for (int s0 = 0; s0 < stages_total; s0 += per_slice, g += unsigned(per_slice)) {
    first(g);
    int it = 0;
    for (; it + 2 < per_slice; it += 2) {
      stage(Next{}, s0 + it, 0);
      stage(Next{}, s0 + it + 1, 1);
    }
    if (it + 2 == per_slice) {
      stage(Next{}, s0 + it, 0);
      stage(Last{}, s0 + it + 1, 1);
    } else {
      stage(Last{}, s0 + it, 0);
    }
    if constexpr (kTwoSets) {
#pragma unroll
      for (int i = 0; i < NA; ++i) {
        tot[i * kWsConsumerThreads] += cur[i];
        cur[i] = 0.0f;
      }
    }
  }
}

// A consumer warpgroup's share of an FP8-as-bf16 (wo_a) tile of R activation rows, its
// stages from CTA stage g on (each waited for on its `full` barrier, full0 + 8 * buffer;
// g ends past them), into cur (p_s; with kTwoSets the slice sums go to tot[i *
// kWsConsumerThreads] and cur ends at zero). Per stage: the warpgroup's 64 weight rows
// (w_rows(buf): this thread's first, 64 e4m3 bytes a row) decoded to bf16 A fragments;
// their products with activation rows 0..R/2-1 (lo; a_stage(buf): R rows of 128 bytes,
// 128-byte swizzle) and R/2..R-1 (hi) chained from zero into two sets (m64n(R/2) in place
// of one m64nR: each value is the same sum); while hi runs, the next stage decoded into the
// other fragment set and lo folded, p = fmaf(d, 2^w, p); the next stage's lo issued; then
// hi folded while that runs; release(buf). So one of the warpgroup's chains is on the
// tensor core while it decodes and folds, and the decode is done before the next stage's
// products are issued. scale_byte(it, buf): tile stage it's UE8M0 weight scale (a 128-wide
// block is two stages). Each value's sequence is gemm_wide_kernel's (one product chain a
// stage, then the fold), so the bits. The stages came by cp.async (the generic proxy): a
// proxy fence before the wgmmas read them.
template <int R, int S, bool kTwoSets, typename WRows, typename AStage, typename ScaleByte, typename Release>
__device__ __forceinline__ void consume_fp8bf16_tile(float (&cur)[R / 2], unsigned& g, int stages_total,
                                                     int per_slice, uint32_t full0, float* tot, WRows w_rows,
                                                     AStage a_stage, ScaleByte scale_byte, Release release) {
  constexpr int NH = R / 4;  // a thread's values of one half of the tile's rows
  const int t4 = threadIdx.x & 3;
  const unsigned g0 = g;
  float d_lo[NH], d_hi[NH];
#pragma unroll
  for (int i = 0; i < NH; ++i) d_lo[i] = d_hi[i] = 0.0f;
  uint32_t a[2][4][4];  // two fragment sets, taken in turn
  // CTA stage gs waited for and decoded into set f.
  auto decode = [&](int f, unsigned gs) {
    const int buf = int(gs % S);
    mbar_wait(full0 + 8 * buf, (gs / S) & 1);
    fence_proxy_async();  // the producer's copies, seen through the barrier, to the wgmmas
    const uint8_t* lo = w_rows(buf);
    load_a_frags_e4m3_bf16(lo, lo + 8 * 64, t4, [&](int j) -> uint32_t(&)[4] { return a[f][j]; });
  };
  // The products of set f with buffer buf's lo (half 0) or hi (1) rows into d, one group.
  auto issue = [&](float(&d)[NH], int f, int buf, int half) {
    const uint32_t b_lo = wgmma_desc_lo(a_stage(buf)) + half * (R / 2 * 128 >> 4);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma_bf16_rs<R / 16>(d, a[f][j], wgmma_desc_at(b_lo, 32 * j), j == 0 ? 0 : 1);
    wgmma_commit();
  };
  run_pipelined_slices<R / 2, kTwoSets>(
      cur, g, stages_total, per_slice, tot,
      [&](unsigned gs) {
        decode(0, gs);
        issue(d_lo, 0, int(gs % S), 0);
      },
      [&](auto has_next, int it, int f) {
        constexpr bool kNext = decltype(has_next)::value;
        const unsigned gs = g0 + unsigned(it);
        const int buf = int(gs % S);
        issue(d_hi, f, buf, 1);
        const float wsc = core::e8m0_to_float(scale_byte(it, buf));
        if constexpr (kNext) decode(f ^ 1, gs + 1);
        wgmma_wait_1();
#pragma unroll
        for (int i = 0; i < NH; ++i) cur[i] = fmaf(d_lo[i], wsc, cur[i]);
        if constexpr (kNext) {
          issue(d_lo, f ^ 1, int((gs + 1) % S), 0);
          wgmma_wait_1();
        } else {
          wgmma_wait_all();
        }
#pragma unroll
        for (int i = 0; i < NH; ++i) cur[NH + i] = fmaf(d_hi[i], wsc, cur[NH + i]);
        release(buf);  // its weights, activations and scale are read
      });
  g = g0 + unsigned(stages_total);
}

// Requirements (host: wide_ws_fits): FP8 weights of one group, or FP8-as-bf16 ones of
// any groups, bf16 output, the block-scale tensors 4-byte aligned (a stage's scale byte
// comes in its aligned 4-byte word, cut at the row's end); or bf16 weights of one group
// and one K slice in 256-row tiles, bf16 or f32 output. Grid: (CTAs), each walking
// tiles blockIdx.x, + gridDim.x, ... of the groups x ceil(n / 128) x ceil(m / R) tiles
// (one tile a CTA where the grid has them all).
template <WFmt F, int R, bool kTwoSets>
__global__ void __launch_bounds__(kWsThreads, 1) gemm_wide_ws_kernel(const GemmParams p) {
  static_assert(F == WFmt::kFp8 || F == WFmt::kFp8Bf16 || F == WFmt::kBf16,
                "warp-specialised wide tiles: FP8, FP8-as-bf16 or bf16");
  constexpr bool kRegA = F == WFmt::kFp8Bf16;  // weights decoded into A fragments (wgmma RS), no activation scales
  constexpr bool kBf16 = F == WFmt::kBf16;     // no scales at all, one K slice, results from registers
  constexpr bool kActScales = F == WFmt::kFp8;
  constexpr int S = wide_ws_stages<F, R, kTwoSets>();
  static_assert(kBf16 ? R == 256 && !kTwoSets : R == 64 || R == 128,
                "wide tiles: 64 or 128 activation rows (bf16: 256, one K slice)");
  static_assert(gemm_wide_ws_smem_bytes<F, R, kTwoSets>(S) <= 227 * 1024, "wide tiles: shared memory");
  static_assert((gemm_wide_ws_smem_bytes<F, R, kTwoSets>(S) - 1024 - 2 * S * 8) % 8 == 0,
                "the mbarriers after the scale words must be 8-byte aligned");
  constexpr int NA = R / 2;
  constexpr int kWRow = wide_ws_weight_row_bytes<F>();
  constexpr int kStageBytes = kTileN * kWRow;  // (a multiple of 1024: the activation stages stay aligned)
  static_assert(kStageBytes % 1024 == 0, "the activation stages stay 1024-aligned");
  constexpr int kStageK = FmtTraits<F>::kStageK;  // 128 (FP8) or 64 (FP8-as-bf16) values a stage
  constexpr int kWPieces = FmtTraits<F>::kWBytes / 16;  // 16-byte weight pieces a row a stage: 8 or 4
  constexpr int kWPieceRows = kWsProducerThreads / kWPieces;  // weight rows a producer pass covers
  constexpr int kPieceRows = kWsProducerThreads / 8;  // activation rows a producer pass covers (8 pieces a row)
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023;
  uint8_t* smem = smem_raw + ((1024 - misalign) & 1023);
  uint8_t* s_w = smem;                                                         // [S][128 rows][kWRow B]
  uint8_t* s_a = s_w + S * kStageBytes;                                        // [S][R rows][128 B]
  uint8_t* s_out = s_a + S * R * 128;                                          // [R][kWsOutStride B] (not bf16)
  float* s_tot = reinterpret_cast<float*>(s_out + (kBf16 ? 0 : R * kWsOutStride));  // kTwoSets: [NA][256] totals
  float* s_as = s_tot + (kTwoSets ? NA * kWsConsumerThreads : 0);              // FP8: [S][R]
  uint32_t* s_bw = reinterpret_cast<uint32_t*>(s_as + (kActScales ? S * R : 0));  // [S] block-scale words
  const uint32_t bar0 = smem_u32(s_bw + wide_ws_scale_words(S));               // full[S], then empty[S]
  auto full_bar = [&](int s) { return bar0 + 8 * s; };
  auto empty_bar = [&](int s) { return bar0 + 8 * (S + s); };

  const int tid = threadIdx.x;
  const int m_tiles = (p.m + R - 1) / R, tiles = (kRegA ? p.groups : 1) * p.tiles_per_group * m_tiles;
  const int stages_total = p.k / kStageK, per_slice = stages_total / p.slices;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar(s), kWsProducerThreads);
      mbar_init(empty_bar(s), kWsConsumerThreads);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (tid < kWsProducerThreads) {
    // ---- producer: every copy of every stage of the CTA's tiles ----
    if constexpr (kRegA) warpgroup_regs_down<kWsProducerRegs>();
    const int c_row = tid >> 3, c_part = tid & 7;  // activations: piece c_part of rows c_row + 16 i
    const int w_row = kRegA ? tid >> 2 : c_row, w_part = kRegA ? tid & 3 : c_part;  // weights: rows w_row + kWPieceRows i
    static_assert(kWPieces == (kRegA ? 4 : 8), "a weight row's 16-byte pieces a stage");
    constexpr int kAPieces = R / kPieceRows;
    const uint8_t* w_src = nullptr;  // this thread's first weight piece of the tile
    const uint8_t* w = nullptr;
    const uint8_t* scale_row = nullptr;
    int valid_n = 0;
    auto start_tile = [&](const WideWsTile& t) {
      w = t.second ? p.w1 : p.w0;
      // (FP8-as-bf16: tile-major, fp8_bf16_layout.h; a stage is valid_n rows of 64 bytes)
      w_src = kRegA ? w + wide_ws_weight_row<kRegA>(p, t) * p.w_row_bytes + 16 * tid
                    : w + (wide_ws_weight_row<kRegA>(p, t) + w_row) * p.w_row_bytes + w_part * 16;
      if constexpr (!kBf16) scale_row = wide_ws_scale_row<kRegA>(p, t);
      valid_n = t.valid_n;
    };
    auto load_weights = [&](int st, int buf) {
      uint8_t* dw = s_w + buf * kStageBytes;
      const uint8_t* src = w_src + int64_t(st) * (kRegA ? valid_n : 1) * FmtTraits<F>::kWBytes;
#pragma unroll
      for (int i = 0; i < kTileN / kWPieceRows; ++i,
               src += int64_t(kWPieceRows) * (kRegA ? FmtTraits<F>::kWBytes : p.w_row_bytes)) {
        const int r = w_row + kWPieceRows * i;
        const bool ok = r < valid_n;
        cp_async16_l2_128(dw + (kRegA ? r * kWRow + w_part * 16 : sw128_offset(r, w_part)), ok ? src : w,
                          ok ? 16 : 0);
      }
      if (!kBf16 && tid == 0) {  // stage st's block scale (FP8-as-bf16: one a 128-wide block, two stages): the
                                 // aligned word that holds it, up to the row's end
        const uintptr_t at = reinterpret_cast<uintptr_t>(scale_row + (kRegA ? st / 2 : st)), word = at & ~uintptr_t(3);
        const int bytes = int(min(uintptr_t(4), reinterpret_cast<uintptr_t>(scale_row + p.s_row_stride) - word));
        cp_async4(s_bw + buf, reinterpret_cast<const uint8_t*>(word), bytes);
      }
    };
    // The first tile's first stages of weights (which nobody writes) go out before the
    // dependency wait.
    const int first = int(blockIdx.x);
    const int early = first < tiles ? min(S, stages_total) : 0;
    if (early > 0) {
      start_tile(wide_ws_tile<R, kRegA>(p, first, m_tiles));
      for (int s = 0; s < early; ++s) load_weights(s, s);
    }
    wait_for_predecessor();
    unsigned g = 0;  // stages issued by this CTA so far (ring slot g % S, use g / S)
    for (int tile = first; tile < tiles; tile += int(gridDim.x)) {
      const WideWsTile t = wide_ws_tile<R, kRegA>(p, tile, m_tiles);
      start_tile(t);
      const uint8_t* a_src[kAPieces];
#pragma unroll
      for (int i = 0; i < kAPieces; ++i) {
        const int r = c_row + kPieceRows * i;
        const int src_row = r < t.rows ? (p.in_rows ? p.in_rows[t.row_base + r] : t.row_base + r) : -1;
        a_src[i] = src_row >= 0 ? p.a + int64_t(src_row) * p.a_row_bytes + (kRegA ? t.group * p.a_group_bytes : 0) +
                                      c_part * 16
                                : nullptr;
      }
      const float* as_src = nullptr;  // FP8: activation scales of tile row tid
      if (kActScales && tid < R && tid < t.rows)
        as_src = p.a_scale + int64_t(p.in_rows ? p.in_rows[t.row_base + tid] : t.row_base + tid) * p.a_scale_stride;
      for (int it = 0; it < stages_total; ++it, ++g) {
        const int buf = int(g % S);
        if (g >= unsigned(S)) mbar_wait(empty_bar(buf), ((g / S) - 1) & 1);  // the buffer's last stage is read
        if (tile != first || it >= early) load_weights(it, buf);
        uint8_t* da = s_a + buf * R * 128;
#pragma unroll
        for (int i = 0; i < kAPieces; ++i)
          cp_async16(da + sw128_offset(c_row + kPieceRows * i, c_part), a_src[i] ? a_src[i] + int64_t(it) * 128 : p.a,
                     a_src[i] ? 16 : 0);
        if (kActScales && tid < R) cp_async4(s_as + buf * R + tid, as_src ? as_src + it : p.a_scale, as_src ? 4 : 0);
        cp_async_mbar_arrive(full_bar(buf));
      }
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    allow_dependents_to_launch();
  } else if constexpr (kBf16) {
    // ---- consumers (bf16): the tile's K summed in the tensor core; then its output ----
    wait_for_predecessor();  // (the output stores: the predecessor may still read y)
    const int ctid = tid - kWsProducerThreads, cw = ctid >> 7, lane = tid & 31;
    const int warp = (ctid >> 5) & 3;
    unsigned g = 0;  // stages consumed by this CTA so far
    for (int tile = int(blockIdx.x); tile < tiles; tile += int(gridDim.x)) {
      const WideWsTile t = wide_ws_tile<R, false>(p, tile, m_tiles);
      float d[NA];
      chain_bf16_tile256<S, true>(
          d, g, stages_total, full_bar(0), [&](int buf) { return smem_u32(s_w + buf * kStageBytes); },
          [&](int buf) { return smem_u32(s_a + buf * R * 128); }, cw, [&](int buf) { mbar_arrive(empty_bar(buf)); });
      if (tile + int(gridDim.x) >= tiles) allow_dependents_to_launch();  // only the last output is left
      store_wide256_results(p, t, d, 64 * cw + 16 * warp, lane >> 2, lane & 3);
    }
  } else {
    // ---- consumers: the tile's stages (FP8-as-bf16: consume_fp8bf16_tile; FP8: chain, fold,
    // release), then its output ----
    if constexpr (kRegA) warpgroup_regs_up<kWsConsumerRegs>();  // (two accumulator halves, two fragment sets)
    wait_for_predecessor();  // (the output stores: the predecessor may still read y)
    const int ctid = tid - kWsProducerThreads, cw = ctid >> 7, lane = tid & 31, t4 = lane & 3;
    const int warp = (ctid >> 5) & 3, g8 = lane >> 2;
    unsigned g = 0;  // stages consumed by this CTA so far
    for (int tile = int(blockIdx.x); tile < tiles; tile += int(gridDim.x)) {
      const WideWsTile t = wide_ws_tile<R, kRegA>(p, tile, m_tiles);
      // Where the tile's scale row starts in its aligned word (the producer's words).
      const int srow_misalign = int(reinterpret_cast<uintptr_t>(wide_ws_scale_row<kRegA>(p, t)) & 3);
      float cur[NA];
      if constexpr (kRegA) {
        consume_fp8bf16_tile<R, S, kTwoSets>(
            cur, g, stages_total, per_slice, full_bar(0), s_tot + ctid,
            [&](int buf) { return s_w + buf * kStageBytes + (64 * cw + 16 * warp + g8) * kWRow; },
            [&](int buf) { return smem_u32(s_a + buf * R * 128); },
            [&](int it, int buf) { return uint8_t(s_bw[buf] >> (8 * ((srow_misalign + it / 2) & 3))); },
            [&](int buf) { mbar_arrive(empty_bar(buf)); });
      } else {
        float d[NA];
#pragma unroll
        for (int i = 0; i < NA; ++i) cur[i] = d[i] = 0.0f;
        if constexpr (kTwoSets) {
#pragma unroll
          for (int i = 0; i < NA; ++i) s_tot[i * kWsConsumerThreads + ctid] = 0.0f;
        }
        int slice_pos = 0;
        for (int it = 0; it < stages_total; ++it, ++g) {
          const bool slice_last = slice_pos == per_slice - 1;
          slice_pos = slice_last ? 0 : slice_pos + 1;
          const int buf = int(g % S);
          mbar_wait(full_bar(buf), (g / S) & 1);
          fence_proxy_async();  // the producer's copies, seen through the barrier, to the wgmmas
          const uint32_t b_lo = wgmma_desc_lo(smem_u32(s_a + buf * R * 128));
          const uint32_t a_lo = wgmma_desc_lo(smem_u32(s_w + buf * kStageBytes + cw * 64 * 128));
          wgmma_fence();
#pragma unroll
          for (int j = 0; j < 4; ++j)
            wide_mma<WFmt::kFp8, R>(d, wgmma_desc_at(a_lo, 32 * j), wgmma_desc_at(b_lo, 32 * j), j == 0 ? 0 : 1);
          wgmma_commit();
          wgmma_wait_all();
          const float wsc = core::e8m0_to_float(uint8_t(s_bw[buf] >> (8 * ((srow_misalign + it) & 3))));
          fold_fp8_wide_stage<R>(cur, d, wsc, s_as + buf * R, t4);
          mbar_arrive(empty_bar(buf));  // its weights, activations and scales are read
          if constexpr (kTwoSets) {
            if (slice_last) {
#pragma unroll
              for (int i = 0; i < NA; ++i) {
                s_tot[i * kWsConsumerThreads + ctid] += cur[i];
                cur[i] = 0.0f;
              }
            }
          }
        }
      }
      if (tile + int(gridDim.x) >= tiles) allow_dependents_to_launch();  // only the last output is left
      // The output tile through shared memory, as gemm_wide_kernel's: each thread's R / 2
      // values scattered over R / 4 rows become whole 16-byte pieces of output rows.
      stage_wide_results<R, kTwoSets>(s_out, kWsOutStride, false, cur, s_tot, ctid, kWsConsumerThreads,
                                       64 * cw + 16 * warp, g8, t4);
      consumers_sync();
      const bool to_y1 = !kRegA && t.second && p.y1 != nullptr;  // linear_pair: the second weight's own output
      void* const y_out = to_y1 ? p.y1 : p.y;
      const int64_t ld_out = to_y1 ? p.ldy1 : p.ldy,
                    col_out = kRegA ? wide_ws_weight_row<true>(p, t) : to_y1 ? int64_t(t.n0) - p.n_split : int64_t(t.n0);
      store_wide_tile<kWsConsumerThreads>(p.out_rows, y_out, ld_out, col_out, 2, s_out, kWsOutStride, t.row_base, t.rows,
                                          t.valid_n, ctid);
      consumers_sync();  // the output tile is read: the next tile may write it
    }
  }
}

}  // namespace dsv4::ops::linear_kernels
