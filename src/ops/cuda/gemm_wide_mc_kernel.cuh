// bf16 256-row wide tiles (the LM head from 129 rows) in clusters of two CTAs that share
// each stage's activations by TMA multicast (forty-fifth session; the default
// since the forty-sixth, DSV4_CUDA_WIDE_MC=0 keeps gemm_wide_ws_kernel).
//
// Why: at 256 rows each SM of the wide GEMMs brought in 14-25 bytes a cycle from L2 (the
// LM head 48 KB a stage in ~1960 cycles; 5.3-6.4 TB/s over 132 SMs for it and wo_b) while
// the LM head's tensor core was about half busy and its consumers waited on data; more
// ring stages, a cheaper output path and chains issued ahead of the fold changed nothing
// (docs/BENCHMARKS.md, forty-fifth session). An LM head stage is 16 KB of weights (the
// CTA's own 128 vocabulary rows) and 32 KB of activations (the same 256 rows for every
// CTA). Two CTAs of a cluster take neighbouring weight tiles of one row tile, and each
// loads half of the stage's activation rows for both (cp.async.bulk.tensor
// .multicast::cluster): 32 KB a stage from L2 instead of 48. Predicted ~330 µs a launch
// against ~486; measured ~430 in one run (a third of the predicted saving): the L2's rate
// is part of the bound, not all of it. A/B over 3 rounds (forty-sixth session): -0.5% a
// step at 192 rows (apart), -0.2% at 256.
//
// Roles as gemm_wide_ws_kernel<bf16, 256>: one producer thread issues the stage's TMA
// copies (its weights, its half of the activations to both CTAs) after the stage's buffer
// is free in both CTAs; two consumer warpgroups chain each m64n256k16 product over the
// whole K (from zero at the first, then summing: the lockstep kernel's chain, so the same
// bits) and store their 128 results a thread from registers. A stage's buffer is released,
// one stage later (its products waited for by wait_1), by every consumer warp of both CTAs
// on the stage's `empty` barrier of each (16 arrivals). The TMA writes the 128-byte
// swizzled rows the wgmma descriptors expect (the layout sw128_offset computes). Rows past
// m and weight rows past n come back as zeros.
#pragma once

#include <cuda.h>  // CUtensorMap (a host-encoded TMA descriptor; no driver library is linked)

#include "ops/cuda/gemm_wide_ws_kernel.cuh"

namespace dsv4::ops::linear_kernels {

constexpr int kMcStages = 4;
constexpr int kMcStageBytes = kTileN * 128 + 256 * 128;  // 16 KB of weights, 32 KB of activations
constexpr int kMcEmptyArrivals = 2 * kWsConsumerThreads / 32;  // every consumer warp of both CTAs
// Dynamic shared memory: the stages (1024-aligned for the 128-byte swizzle) and a full and an
// empty barrier a stage.
constexpr int kMcSmemBytes = 1024 + kMcStages * kMcStageBytes + 2 * kMcStages * 8;

// The barrier at this CTA's shared address `a`, in the shared memory of cluster CTA `rank`,
// receives one arrival. (The default semantics, as CUTLASS's cluster pipelines release a
// stage: the stage's reads are wgmma reads, finished by the wait before it. The
// .release.cluster form put a memory barrier before every arrival: ncu had 39% of the
// kernel's stall samples there and the LM head at 681 µs.)
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t a, uint32_t rank) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_map(a, rank)) : "memory");
}
// A 2-D box of `map` at (column x, row y) into this CTA's shared memory at d, counted on the
// barrier at b.
__device__ __forceinline__ void tma_load_box(uint32_t d, const CUtensorMap& map, int x, int y, uint32_t b) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          d),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(x), "r"(y), "r"(b)
      : "memory");
}
// The same box into shared address d of every cluster CTA in `mask`, counted on the barrier
// at b of each.
__device__ __forceinline__ void tma_load_box_multicast(uint32_t d, const CUtensorMap& map, int x, int y, uint32_t b,
                                                       uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3}], [%4], %5;\n" ::"r"(d),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(x), "r"(y), "r"(b), "h"(mask)
      : "memory");
}

// Requirements (host: wide_mc_fits): bf16 weights of one group, no stacked pair, one K slice,
// no row gather, an even number of weight tiles; `wmap` a map of the weights [n, k] and
// `amap` of the activations [m, k], both bf16 with boxes of 64 values x 128 rows and the
// 128-byte swizzle. Grid: clusters of 2 (an even grid), cluster c walking tile pairs c, c +
// gridDim.x / 2, ... of (n tiles / 2) x ceil(m / 256); CTA rank r of a pair takes weight tile
// 2j + r of its pair j.
__global__ void __launch_bounds__(kWsThreads, 1)
    gemm_wide_mc_bf16_kernel(const __grid_constant__ GemmParams p, const __grid_constant__ CUtensorMap wmap,
                             const __grid_constant__ CUtensorMap amap) {
  constexpr int S = kMcStages, R = 256, NA = R / 2;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023;
  uint8_t* smem = smem_raw + ((1024 - misalign) & 1023);  // (the same offset in both CTAs: multicast)
  const uint32_t s_base = smem_u32(smem);
  auto w_stage = [&](int buf) { return s_base + buf * kMcStageBytes; };
  auto a_stage = [&](int buf) { return s_base + buf * kMcStageBytes + kTileN * 128; };
  const uint32_t bar0 = s_base + S * kMcStageBytes;
  auto full_bar = [&](int s) { return bar0 + 8 * s; };
  auto empty_bar = [&](int s) { return bar0 + 8 * (S + s); };

  const int tid = threadIdx.x;
  const uint32_t rank = cluster_cta_rank(), peer = rank ^ 1;
  const int cluster = int(blockIdx.x) / 2, clusters = int(gridDim.x) / 2;
  const int m_tiles = (p.m + R - 1) / R, pairs = p.tiles_per_group / 2 * m_tiles;
  const int stages_total = p.k / 64;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar(s), 1);
      mbar_init(empty_bar(s), kMcEmptyArrivals);
    }
    mbar_init_fence();
  }
  cluster_sync_all();  // both CTAs' barriers exist before any copy or arrival reaches them

  // Pair j's tile for this CTA (row tile fastest, as gemm_wide_kernel's order).
  auto pair_tile = [&](int pair) {
    WideWsTile t;
    const int m_tile = pair % m_tiles, n_tile = 2 * (pair / m_tiles) + int(rank);
    t.row_base = m_tile * R;
    t.rows = min(R, p.m - t.row_base);
    t.group = 0;
    t.n0 = n_tile * kTileN;
    t.valid_n = min(kTileN, p.n - t.n0);
    t.second = false;
    return t;
  };

  if (tid < kWsProducerThreads) {
    // ---- producer (one thread): the weights of this CTA's tile, half of the activations for both ----
    if (tid == 0) {
      const int first = cluster;
      const int early = first < pairs ? min(S, stages_total) : 0;
      if (early > 0) {  // the first stages' weights (which nobody writes) before the dependency wait
        const WideWsTile t = pair_tile(first);
        for (int s = 0; s < early; ++s) {
          mbar_expect_tx(full_bar(s), kMcStageBytes);
          tma_load_box(w_stage(s), wmap, 64 * s, t.n0, full_bar(s));
        }
      }
      wait_for_predecessor();
      unsigned g = 0;  // stages issued by this CTA so far (ring slot g % S, use g / S)
      for (int pair = first; pair < pairs; pair += clusters) {
        const WideWsTile t = pair_tile(pair);
        for (int it = 0; it < stages_total; ++it, ++g) {
          const int buf = int(g % S);
          if (g >= unsigned(S)) mbar_wait(empty_bar(buf), ((g / S) - 1) & 1);  // free in both CTAs
          if (pair != first || it >= early) {
            mbar_expect_tx(full_bar(buf), kMcStageBytes);
            tma_load_box(w_stage(buf), wmap, 64 * it, t.n0, full_bar(buf));
          }
          tma_load_box_multicast(a_stage(buf) + rank * (128 * 128), amap, 64 * it, t.row_base + 128 * int(rank),
                                 full_bar(buf), 0x3);
        }
      }
    }
    allow_dependents_to_launch();
  } else {
    // ---- consumers: the tile's K summed in the tensor core; then its output ----
    wait_for_predecessor();  // (the output stores: the predecessor may still read y)
    const int ctid = tid - kWsProducerThreads, cw = ctid >> 7, lane = tid & 31;
    const int warp = (ctid >> 5) & 3;
    auto release = [&](int buf) {  // this warp's reads of stage buf are done, in both CTAs' count
      __syncwarp();
      if (lane == 0) {
        mbar_arrive_cluster(empty_bar(buf), rank);
        mbar_arrive_cluster(empty_bar(buf), peer);
      }
    };
    unsigned g = 0;  // stages consumed by this CTA so far
    for (int pair = cluster; pair < pairs; pair += clusters) {
      const WideWsTile t = pair_tile(pair);
      float d[NA];
      chain_bf16_tile256<S, false>(d, g, stages_total, full_bar(0), w_stage, a_stage, cw, release);
      if (pair + clusters >= pairs) allow_dependents_to_launch();  // only the last output is left
      store_wide256_results(p, t, d, 64 * cw + 16 * warp, lane >> 2, lane & 3);
    }
  }
  cluster_sync_all();  // the other CTA's last arrivals on this CTA's barriers are in
}

}  // namespace dsv4::ops::linear_kernels
