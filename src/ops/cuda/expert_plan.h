// How the CUDA routed experts lay out a decode step's expert GEMMs: how many list tiles
// the launch provisions, whether a GEMM splits its K slices over CTAs, and whether the
// automatic rule runs gate/up and down as one fused launch. Host code, tested on the
// CPU (tests/ops/expert_plan_test.cpp). No choice here changes a bit: split and walked
// slices, fused and separate launches give the same outputs (the GPU tests
// CudaLinearFusedExperts.*), so two micro-batches that choose differently still match
// the whole batch.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dsv4::ops {

// The most list tiles of bm rows that pairs (token, expert) routed to num_local local
// experts can need: the sum over busy experts of ceil(count / bm) is at most
// (pairs + busy * (bm - 1)) / bm, busy <= min(num_local, pairs), and never more than
// one tile a pair.
constexpr int64_t expert_max_tiles(int64_t pairs, int64_t num_local, int64_t bm) {
  return std::min<int64_t>(pairs, (pairs + std::min(num_local, pairs) * (bm - 1)) / bm);
}

// Whether an expert GEMM of n_tiles weight tiles over max_tiles list tiles splits its
// K slices over CTAs: only where the tiles alone are fewer than two an SM. With more,
// each CTA walks its slices, which saves the partial sums and halves the CTAs.
// Measured on bench-1g (32 weight tiles a GEMM, 132 SMs, H200), walking against
// splitting: +3.3% a step at 1 row (6 list tiles, 192 CTAs), -4.8% at 2 rows (12 list
// tiles, 384 CTAs), which the rule before this one (four an SM) still split
// (docs/BENCHMARKS.md, thirty-third session).
constexpr bool expert_split_k(int64_t n_tiles, int64_t max_tiles, int64_t num_sms) {
  return n_tiles * max_tiles < 2 * num_sms;
}

// The automatic rule of the fused expert step (docs/design/fused-expert-step.md): up to
// kFusedExpertsAutoRows rows, where it measured faster against the four launches on
// bench-1g (-1.8 / -2.1 / -2.0 / -1.0..-1.4 / -0.9..-1.0% a step at 3 / 4 / 8 / 16 /
// 20 rows; +0.2% and -0.5% at 24 in two sessions, +0.4..0.6% at 32, +1.4..1.7% at
// 64), and only where the gate/up CTAs fill every slot the fused kernel has on the GPU
// (slots = its resident CTAs an SM times the SMs). At 2 rows (384 gate/up CTAs for 528
// slots) it measured +4.5% a step against the four launches; the likely cost, not
// measured apart: down CTAs that take free slots and wait there for their list tile.
constexpr int64_t kFusedExpertsAutoRows = 20;
constexpr bool fused_experts_auto(int64_t rows, int64_t gate_up_ctas, int64_t slots) {
  return rows <= kFusedExpertsAutoRows && gate_up_ctas >= slots;
}

}  // namespace dsv4::ops
