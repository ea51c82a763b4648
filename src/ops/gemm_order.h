// The K order of the CUDA backend's tensor-core GEMMs, the part of it that depends
// on the launch (docs/design/cuda-linear.md, linear_kernels.cuh's header comment):
// an output's K range is cut into S equal slices of whole stages, each slice summed
// on its own from zero and the slice sums added in order, ((0 + p_0) + p_1) + ...
// S is a function of the launch's weight tiles, K and the process's slice floor
// (gemm_min_slice_stages), never of the rows M, so a row's bits do not depend on its
// batch. The CUDA launcher and the CPU backend's
// model of it (QuantDotModel::kHopperWgmma) both take S from here.
#pragma once

#include <cstdint>

namespace dsv4::ops {

constexpr int64_t kGemmTileRows = 128;  // weight rows (output columns) of one tile
constexpr int kGemmMaxSlices = 32;

// Weight tiles of a launch over `rows` weight rows per group (two weights stacked
// into one launch count together).
constexpr int64_t gemm_weight_tiles(int64_t rows, int64_t groups = 1) {
  return groups * ((rows + kGemmTileRows - 1) / kGemmTileRows);
}

// Whether two weights share one launch (linear_pair, linear_bf16_pair): the first
// must fill whole tiles, so that each CTA reads one weight, and the second have rows.
// The launch's weight tiles then count both.
constexpr bool gemm_pair_stacks(int64_t first_rows, int64_t second_rows) {
  return first_rows % kGemmTileRows == 0 && second_rows > 0;
}

// S: doubled while the launch's CTAs (weight tiles x slices x tile_mult) stay under
// ~256, the stages (K / 128 quantized, K / 64 bf16) still divide evenly and a slice
// keeps at least min_slice_stages of them. tile_mult counts the row tiles expected per
// weight tile (4 for the routed experts, where several experts are busy at once; 1
// otherwise).
constexpr int gemm_k_slices(int64_t weight_tiles, int64_t stages, int64_t tile_mult, int64_t min_slice_stages = 1) {
  int s = 1;
  while (s < kGemmMaxSlices && weight_tiles * tile_mult * s < 256 && stages % (2 * s) == 0 &&
         stages / (2 * s) >= min_slice_stages)
    s *= 2;
  return s;
}

// The least stages a slice keeps in every launch of this process: 2, or
// DSV4_GEMM_MIN_SLICE_STAGES (1, 2, 4 or 8; read once; A/B runs), or a test's
// gemm_force_min_slice_stages. It changes the K order, so the CUDA launcher and the
// CPU backend's model of it both take S from gemm_slices (ops/backend.cpp). Why 2: a
// slice of one stage is a CTA that streams one 16 KB weight stage with no pipeline
// behind it and then stores and folds a partial; bench-1g's wq_a + wkv (12 tiles, 32
// stages) took 32 such slices. Two stages a slice (S = 16 there): -0.2 / -0.3 / -0.5 /
// -0.1% a step at 1 / 16 / 64 / 256 rows against one (H200, docs/BENCHMARKS.md,
// fifty-second session); four (S = 8 there, with the router's, the indexer's, the ratio-128
// compressor's and the shared expert's down GEMM's S halved too): +0.5 / +0.3 / -1.2 / -0.3%.
int gemm_min_slice_stages();

// The floor of the launches whose stages are 128-wide quantized ones (FP8 / FP4
// activations: wq_a + wkv, the shared and routed experts, the compressors' and the
// indexer's FP8 GEMMs): gemm_min_slice_stages(), or DSV4_GEMM_MIN_QUANT_SLICE_STAGES
// (1, 2, 4 or 8; read once; A/B runs of a floor per launch format). The bf16 and
// FP8-as-bf16 launches (64-wide stages: the router, wo_a) keep the other. Four for the
// quantized launches alone: +0.1 / +0.3 / -0.1 / -0.2% at 1 / 16 / 64 / 256 rows; four
// for the bf16 ones alone: +0.8 / +0.4 / -0.1 / -0.5% (H200, BENCHMARKS.md, fifty-third
// session), so both stay at two.
int gemm_min_quant_slice_stages();

// Test hook: n > 0 makes every later launch take n as both floors (tests whose shapes
// exercise the split paths of one-stage slices); 0 follows the defaults and the
// environment again.
void gemm_force_min_slice_stages(int n);

// S as the launches of this process take it; quant_stages: the stages are 128-wide
// quantized ones (K / 128), else 64-wide bf16 ones (K / 64).
inline int gemm_slices(int64_t weight_tiles, int64_t stages, int64_t tile_mult, bool quant_stages) {
  return gemm_k_slices(weight_tiles, stages, tile_mult,
                       quant_stages ? gemm_min_quant_slice_stages() : gemm_min_slice_stages());
}

}  // namespace dsv4::ops
