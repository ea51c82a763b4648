// CUDA backend: linear, linear_bf16, grouped_linear, expert_ffn, routed_experts,
// router (spec §2.7, §2.8, §5.6, §6). Launch code only; the kernels live in
// linear_kernels.cuh and the design with its roofline numbers in
// docs/design/cuda-linear.md.
//
// Two implementations of every op: the fast one (tensor-core GEMM, device-built
// expert tile lists) and a simple one (one warp per output element) selected by
// DSV4_CUDA_KERNELS=simple, read once at first use. The fast path also falls back
// to the simple kernels for shapes or alignments it does not cover (noted at each
// `*_fast_ok`). Neither path synchronises, reads device data on the host or
// allocates outside CudaBackend::scratch, so every op can be captured in a graph
// once it has run eagerly with its largest shapes.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled (the driver's entry point, looked up at run time)

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "core/error.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_hooks.h"
#include "ops/cuda/expert_plan.h"
#include "ops/cuda/gemm_wide_kernel.cuh"
#include "ops/cuda/gemm_wide_mc_kernel.cuh"
#include "ops/cuda/gemm_wide_ws_kernel.cuh"
#include "ops/cuda/linear_kernels.cuh"
#include "ops/cuda/mismatch_count.cuh"
#include "ops/cuda/quantized_linear.h"
#include "ops/cuda/wide_ws_grid.h"
#include "ops/gemm_order.h"

namespace dsv4::ops {

namespace lk = linear_kernels;
using core::DType;
using core::Tensor;
using lk::WFmt;

namespace {

std::atomic<int> g_force_path{-1};

bool simple_path() {
  static const bool from_env = env_is("DSV4_CUDA_KERNELS", "simple");
  return forced_or(g_force_path, from_env);
}

// Scratch of this file (CudaBackend::scratch keeps one buffer per name and stream).
// `fresh` reports a new allocation (contents undefined).
void* scratch_on(CudaBackend& be, const char* name, size_t bytes, bool* fresh = nullptr) {
  char key[128];
  std::snprintf(key, sizeof key, "linear.%s", name);
  return be.scratch(key, std::max<size_t>(bytes, 16), fresh);
}

template <typename T>
T* scratch_as(CudaBackend& be, const char* name, int64_t count) {
  return static_cast<T*>(scratch_on(be, name, size_t(count) * sizeof(T)));
}

bool aligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

unsigned blocks_for_warps(int64_t warps, int64_t cap = int64_t(1) << 30) {
  return unsigned(std::clamp<int64_t>((warps + 7) / 8, 1, cap));  // 8 warps per 256-thread block
}

constexpr int64_t kSimpleBlocks = 8192;  // grid-stride simple kernels

// ---- activation quantization -----------------------------------------------------------
// act_quant8_kernel / swiglu_quant8_kernel (a half warp a 128-block, 16-byte loads) where
// the rows are 16-byte aligned; DSV4_CUDA_QUANT8=0 keeps the warp-a-block kernels (A/B
// runs). Same bits either way. Measured (H200, bench-1g, thirty-ninth session): the step
// -0.1 / -0.2 / -0.1 / -0.4% at 1 / 16 / 64 / 256 rows against the warp-a-block kernels.
std::atomic<int> g_force_quant8{-1};
std::atomic<int64_t> g_quant8_launches{0};
bool quant8_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_QUANT8", "0");
  return forced_or(g_force_quant8, from_env);
}

// split_pairs: the layout the FP4 GEMM reads (lk::store_quant4); element order otherwise.
void quantize_rows(CudaBackend& be, const uint16_t* x, int64_t ldx, int64_t rows, int64_t k, uint8_t* q, float* s,
                   bool split_pairs) {
  const int64_t items = rows * (k / 128);
  if (items == 0) return;
  if (quant8_enabled() && aligned(x, 16) && ldx % 8 == 0) {
    lk::act_quant8_kernel<<<blocks_for_warps((items + 1) / 2), 256, 0, be.stream()>>>(x, ldx, rows, k, q, s,
                                                                                       split_pairs ? 1 : 0);
    g_quant8_launches.fetch_add(1, std::memory_order_relaxed);
  } else
    lk::act_quant_kernel<<<blocks_for_warps(items), 256, 0, be.stream()>>>(x, ldx, rows, k, q, s,
                                                                           split_pairs ? 1 : 0);
  check_launch(be.stream());
}

// SwiGLU + quantization of gu's rows [0, rows) (those below *num_rows where given).
// Returns the launch's blocks (0: none).
unsigned swiglu_quantize(CudaBackend& be, const uint16_t* gu, int64_t rows, int64_t inter, const int* num_rows,
                         const float* rw, const int* rw_index, float limit, uint8_t* hq, float* hs, bool split_pairs) {
  const int64_t items = rows * (inter / 128);
  if (items == 0) return 0;
  unsigned blocks = 0;
  if (quant8_enabled() && aligned(gu, 16)) {
    blocks = blocks_for_warps((items + 1) / 2);
    lk::swiglu_quant8_kernel<<<blocks, 256, 0, be.stream()>>>(gu, rows, inter, num_rows, rw, rw_index, limit, hq,
                                                               hs, split_pairs ? 1 : 0);
    g_quant8_launches.fetch_add(1, std::memory_order_relaxed);
  } else {
    blocks = blocks_for_warps(items);
    lk::swiglu_quant_kernel<<<blocks, 256, 0, be.stream()>>>(gu, rows, inter, num_rows, rw, rw_index, limit, hq, hs,
                                                              split_pairs ? 1 : 0);
  }
  check_launch(be.stream());
  return blocks;
}

// ---- the tensor-core GEMM ---------------------------------------------------------------
// Number of K slices S: a function of (weight row tiles, stages) only, never of M
// (the bit-identity rule): gemm_k_slices (ops/gemm_order.h), shared with the CPU
// backend's model.
static_assert(lk::kTileN == kGemmTileRows && lk::kMaxSlices == kGemmMaxSlices, "ops/gemm_order.h's tile and slices");

// Split launches write S fp32 partials per output; beyond this many bytes the
// CTAs walk their slices in sequence instead. (A 64 MiB cap for the plain GEMMs, which
// would let bench-1g's wq_a + wkv split its 32 slices at 256 rows (48 MiB), measured +1.0%
// a step at 256 and +0.2% at 192: docs/BENCHMARKS.md, twenty-ninth session.)
constexpr int64_t kMaxPartialBytes = int64_t(32) << 20;

// The most rows a plain GEMM runs in 8-row tiles (gemm_tile NT = 1); more take 16-row
// tiles. Where a split tile's last CTA folds, an 8-row tile's adds one output's slices at
// a time (fold_row_major_slices: a dependent L2 load a partial, ~0.45 µs a row at S = 4
// in `bench linears`), a 16-row tile's 64 of a weight row's partials a round trip
// (fold_tile_slices), or in clusters. 4 (H100, ninety-seventh session, docs/BENCHMARKS.md):
// against 8, -0.9 / -1.2% a step at 6 / 8 rows (and 8 +0.8 / +1.1% on a second grant).
// 16-row tiles from 2 rows lost +4.7 / +1.6% at 2 / 4 rows, and from 2 rows
// only for the GEMMs of at most 8 slices (`wo_a` among them, 1.2 µs faster a launch in
// `bench linears`) +1.0 / +2.1 / +1.0% at 2 / 3 / 4. DSV4_CUDA_NT1_ROWS (1-8; A/B runs).
// The same bits either way: S and the fold's order do not depend on the tile.
int nt1_rows() {
  static const int rows = int(env_integer("DSV4_CUDA_NT1_ROWS", 4, 1, 8));
  return rows;
}

int nt_for_rows(int64_t rows) { return rows <= nt1_rows() ? 1 : rows <= 16 ? 2 : rows <= 32 ? 4 : 8; }

bool is_quant(WFmt f) { return f == WFmt::kFp8 || f == WFmt::kFp4; }

// Raises a kernel's dynamic shared-memory limit once per device (done on the
// first, eager, use: before any capture).
template <typename Kernel>
void allow_smem(Kernel kernel, int bytes, int device, std::atomic<uint64_t>& done) {
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (done.load(std::memory_order_acquire) & bit) return;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done.fetch_or(bit, std::memory_order_acq_rel);
}

// The tiles that have a cluster-fold instantiation: run_gemm takes it for split
// launches of 16-row tiles (9-16 rows) that would otherwise need split_fold_kernel.
// 32- and 64-row tiles measured slower as clusters (twenty-ninth session: +0.2% a step
// at 32 rows, +1.5% at 64) and keep the fold launch.
constexpr int kClusterFoldNt = 2;
template <WFmt F, int NT>
constexpr bool kClusterFoldTiles = NT == kClusterFoldNt && F != WFmt::kFp4;

// The cluster-fold kernel of format F, its shared-memory limit raised (once per device).
template <WFmt F>
auto cluster_fold_kernel(CudaBackend& be) {
  static std::atomic<uint64_t> done{0};
  const auto kernel = lk::gemm_kernel<F, kClusterFoldNt, false, true>;
  allow_smem(kernel, lk::gemm_smem_bytes<F, kClusterFoldNt>(), be.device_index(), done);
  return kernel;
}

// A launch of `grid` in clusters of a tile's `split` CTAs (cluster dims 1 x 1 x split),
// `smem` bytes of dynamic shared memory a CTA; `cluster` holds the attribute the config
// points to.
cudaLaunchConfig_t cluster_fold_config(dim3 grid, int64_t split, int smem, cudaStream_t stream,
                                       cudaLaunchAttribute& cluster) {
  return cluster_launch_config(grid, dim3(1, 1, unsigned(split)), lk::kThreads, size_t(smem), stream, cluster);
}

template <WFmt F, int NT, bool kTwo>
void launch_plain(CudaBackend& be, const lk::GemmParams& p, dim3 grid, bool cluster_fold) {
  constexpr int smem = lk::gemm_smem_bytes<F, NT>();
  static std::atomic<uint64_t> done{0};
  if (cluster_fold) {  // the split CTAs of a tile as one cluster (gemm_kernel's kClusterFold)
    if constexpr (kClusterFoldTiles<F, NT> && !kTwo) {
      cudaLaunchAttribute cluster;
      const cudaLaunchConfig_t cfg =
          cluster_fold_config(grid, p.split, lk::gemm_smem_bytes<F, kClusterFoldNt>(), be.stream(), cluster);
      DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, cluster_fold_kernel<F>(be), p));
      check_launch(be.stream());
      return;
    } else {
      DSV4_CHECK(false, "gemm: no cluster fold for this tile (nt {}, slices walked {})", NT, kTwo);
    }
  }
  allow_smem(lk::gemm_kernel<F, NT, kTwo>, smem, be.device_index(), done);
  lk::gemm_kernel<F, NT, kTwo><<<grid, lk::kThreads, smem, be.stream()>>>(p);
  check_launch(be.stream());
}

template <WFmt F, int NT, bool kTwo, bool kTma, bool kSixteen = false, bool kSmallRows = false>
void launch_expert(CudaBackend& be, const lk::GemmParams& p, dim3 grid, const lk::ExpertTable& table) {
  constexpr int smem = lk::gemm_smem_bytes<F, NT * (kSixteen ? 2 : 1), kTma>();  // (sized by the tile's rows)
  static std::atomic<uint64_t> done{0};
  const auto kernel = lk::expert_gemm_kernel<F, NT, kTwo, kTma, kSixteen, false, kSmallRows>;
  allow_smem(kernel, smem, be.device_index(), done);
  kernel<<<grid, lk::kThreads, smem, be.stream()>>>(p, table);
  check_launch(be.stream());
}

// The cluster-fold expert kernel (8-row FP4 tiles, split slices), its shared-memory
// limit raised (once per device).
constexpr int kExpertClusterSmem = lk::gemm_smem_bytes<WFmt::kFp4, 1, true>();
// kKernel with that shared memory allowed (once per device and kernel): the cluster
// launches of the routed experts' GEMMs all take it.
template <auto kKernel>
auto with_expert_cluster_smem(CudaBackend& be) {
  static std::atomic<uint64_t> done{0};
  allow_smem(kKernel, kExpertClusterSmem, be.device_index(), done);
  return kKernel;
}
template <bool kTma>
constexpr auto kExpertClusterKernel = lk::expert_gemm_kernel<WFmt::kFp4, 1, false, kTma, false, true, true>;
template <bool kTma>
auto expert_cluster_kernel(CudaBackend& be) {
  static_assert(lk::gemm_smem_bytes<WFmt::kFp4, 1, kTma>() <= kExpertClusterSmem, "one size for both forms");
  return with_expert_cluster_smem<kExpertClusterKernel<kTma>>(be);
}
template <bool kTma>
void launch_expert_cluster(CudaBackend& be, const lk::GemmParams& p, dim3 grid, const lk::ExpertTable& table) {
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t cfg = cluster_fold_config(grid, p.split, kExpertClusterSmem, be.stream(), cluster);
  DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, expert_cluster_kernel<kTma>(be), p, table));
  check_launch(be.stream());
}

// GemmParams::release_at_entry: plain GEMMs of up to cuda_entry_release_rows() rows whose
// weights take at most DSV4_CUDA_ENTRY_RELEASE_MB megabytes (default 64: every layer GEMM
// of bench-1g, not its 1 GB LM head, with which it measured within the noise).
bool release_at_entry(const lk::GemmParams& p) {
  static const int64_t mb = env_integer("DSV4_CUDA_ENTRY_RELEASE_MB", 64, 0, 1 << 20);
  return p.m <= cuda_entry_release_rows() && int64_t(p.n) * p.groups * p.w_row_bytes <= mb * 1000000;
}

template <WFmt F>
void dispatch_plain(CudaBackend& be, const lk::GemmParams& p_in, dim3 grid, int nt, bool two, bool cluster_fold) {
  lk::GemmParams p = p_in;
  p.release_at_entry = release_at_entry(p) ? 1 : 0;
  const bool c = cluster_fold;
  switch (nt) {
    case 1: return two ? launch_plain<F, 1, true>(be, p, grid, c) : launch_plain<F, 1, false>(be, p, grid, c);
    case 2: return two ? launch_plain<F, 2, true>(be, p, grid, c) : launch_plain<F, 2, false>(be, p, grid, c);
    case 4: return two ? launch_plain<F, 4, true>(be, p, grid, c) : launch_plain<F, 4, false>(be, p, grid, c);
    default:
      if constexpr (F == WFmt::kFp4) DSV4_CHECK(false, "gemm: FP4 tiles hold at most 32 rows (nt {})", nt);
      else return two ? launch_plain<F, 8, true>(be, p, grid, c) : launch_plain<F, 8, false>(be, p, grid, c);
  }
}

// The routed experts' gate/up and down GEMMs in one launch of `ctas` CTAs (FP4 by TMA,
// 8-row tiles).
constexpr int kFusedExpertSmem = lk::gemm_smem_bytes<WFmt::kFp4, 1, true>();
std::atomic<uint64_t> g_fused_expert_smem_set{0};
void launch_fused_experts(CudaBackend& be, const lk::FusedExpertArgs& f, const lk::ExpertTable& gate_up,
                          const lk::ExpertTable& down, int64_t ctas) {
  allow_smem(lk::expert_ffn_fused_kernel, kFusedExpertSmem, be.device_index(), g_fused_expert_smem_set);
  lk::expert_ffn_fused_kernel<<<unsigned(ctas), lk::kThreads, kFusedExpertSmem, be.stream()>>>(f, gate_up, down);
  check_launch(be.stream());
}

// The split fused step (expert_ffn_split_fused_kernel): `items` clusters of f.gate_up.split
// CTAs, the cluster-fold expert kernel's shared memory.
template <bool kTma>
void launch_split_fused_experts(CudaBackend& be, const lk::FusedExpertArgs& f, const lk::ExpertTable& gate_up,
                                const lk::ExpertTable& down, int64_t items) {
  cudaLaunchAttribute cluster;
  const dim3 grid(unsigned(items), 1u, unsigned(f.gate_up.split));
  const cudaLaunchConfig_t cfg = cluster_fold_config(grid, f.gate_up.split, kExpertClusterSmem, be.stream(), cluster);
  DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, with_expert_cluster_smem<lk::expert_ffn_split_fused_kernel<kTma>>(be), f,
                                     gate_up, down));
  check_launch(be.stream());
}

// The ready-flag form (expert_gate_up_ready_kernel, then expert_down_ready_kernel): two
// launches of clusters of f.gate_up.split CTAs, the cluster-fold expert kernel's shared
// memory, grids (weight tiles, max list tiles, S).
template <bool kTma>
void launch_ready_flag_experts(CudaBackend& be, const lk::FusedExpertArgs& f, const lk::ExpertTable& gate_up,
                               const lk::ExpertTable& down) {
  cudaLaunchAttribute cluster;
  const dim3 gate_up_grid(unsigned(f.gate_up_tiles), unsigned(f.max_tiles), unsigned(f.gate_up.split));
  const cudaLaunchConfig_t a =
      cluster_fold_config(gate_up_grid, f.gate_up.split, kExpertClusterSmem, be.stream(), cluster);
  DSV4_CUDA_CHECK(
      cudaLaunchKernelEx(&a, with_expert_cluster_smem<lk::expert_gate_up_ready_kernel<kTma>>(be), f, gate_up));
  check_launch(be.stream());
  const dim3 down_grid(unsigned(f.down_tiles), unsigned(f.max_tiles), unsigned(f.down.split));
  const cudaLaunchConfig_t b = cluster_fold_config(down_grid, f.down.split, kExpertClusterSmem, be.stream(), cluster);
  DSV4_CUDA_CHECK(cudaLaunchKernelEx(&b, with_expert_cluster_smem<lk::expert_down_ready_kernel<kTma>>(be), f, down));
  check_launch(be.stream());
}

// CTAs of expert_ffn_fused_kernel the GPU holds at once (registers and shared memory),
// asked once per device (as cluster_fold_fits does): every routed_experts call in the
// fused step's row range needs it.
int64_t fused_expert_slots(CudaBackend& be) {
  static std::atomic<int> per_sm_of[64];  // 0: not asked yet (the kernel fits at least one CTA an SM)
  std::atomic<int>& cached = per_sm_of[be.device_index() & 63];
  int per_sm = cached.load(std::memory_order_acquire);
  if (per_sm == 0) {
    allow_smem(lk::expert_ffn_fused_kernel, kFusedExpertSmem, be.device_index(), g_fused_expert_smem_set);
    DSV4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, lk::expert_ffn_fused_kernel, lk::kThreads,
                                                                  kFusedExpertSmem));
    cached.store(per_sm, std::memory_order_release);
  }
  return int64_t(per_sm) * be.properties().multiProcessorCount;
}

// row_groups 2 (FP4, nt 1): 16-row tiles, each weight fragment decoded once for all their rows.
// cluster_fold (FP4, nt 1, one row group, split slices): expert_gemm_kernel's cluster fold.
// Split slices or early weights (nt 1, one row group: small_row_shape) take the small-row
// instances (expert_gemm_kernel's kSmallRows).
bool small_row_shape(int nt, int row_groups) { return nt == 1 && row_groups == 1; }
template <WFmt F, bool kTma>
void dispatch_expert(CudaBackend& be, const lk::GemmParams& p, dim3 grid, int nt, int row_groups, bool two,
                     bool cluster_fold, const lk::ExpertTable& table) {
  if (small_row_shape(nt, row_groups) && !cluster_fold && (p.split > 1 || p.weights_before_wait != 0))
    return two ? launch_expert<F, 1, true, kTma, false, true>(be, p, grid, table)
               : launch_expert<F, 1, false, kTma, false, true>(be, p, grid, table);
  if constexpr (F == WFmt::kFp4) {
    if (cluster_fold) {
      DSV4_CHECK(small_row_shape(nt, row_groups) && !two && p.split > 1,
                 "expert gemm: the cluster fold takes split 8-row tiles (nt {}, row groups {}, split {})", nt,
                 row_groups, p.split);
      return launch_expert_cluster<kTma>(be, p, grid, table);
    }
  }
  DSV4_CHECK(p.weights_before_wait == 0, "expert gemm: early weights need 8-row tiles in one row group");
  if constexpr (F == WFmt::kFp4) {
    if (row_groups == 2) {
      DSV4_CHECK(nt == 1, "expert gemm: 16-row tiles replace 8-row ones only (nt {})", nt);
      return two ? launch_expert<F, 1, true, kTma, true>(be, p, grid, table)
                 : launch_expert<F, 1, false, kTma, true>(be, p, grid, table);
    }
  }
  DSV4_CHECK(row_groups == 1, "expert gemm: {} row groups need FP4 weights", row_groups);
  DSV4_CHECK(!cluster_fold, "expert gemm: the cluster fold needs FP4 weights");
  switch (nt) {
    case 1:
      return two ? launch_expert<F, 1, true, kTma>(be, p, grid, table)
                 : launch_expert<F, 1, false, kTma>(be, p, grid, table);
    case 2:
      return two ? launch_expert<F, 2, true, kTma>(be, p, grid, table)
                 : launch_expert<F, 2, false, kTma>(be, p, grid, table);
    default:
      return two ? launch_expert<F, 4, true, kTma>(be, p, grid, table)
                 : launch_expert<F, 4, false, kTma>(be, p, grid, table);
  }
}

// ---- wide tiles (gemm_wide_kernel) ---------------------------------------------------------
std::atomic<int64_t> g_wide_launches{0};
std::atomic<int> g_force_wide{-1};

// FP8 linears and bf16 GEMMs of one group take wide tiles (128 weight rows x 128
// activation rows, or x 64) from this many rows, where those tiles fill the GPU's
// SMs: 128-row tiles where they make a wave, else 64-row ones where those make 7/8 of
// one (N = 4096 at 256 rows: 128 CTAs on 132 SMs); gemm_kernel's smaller tiles
// otherwise. Returns the tile's rows, or 0. DSV4_CUDA_WIDE_GEMM=0 turns wide tiles
// off; =1 on for every such GEMM (64-row tiles up to 64 rows), whatever its size.
// The grouped FP8-as-bf16 GEMM (wo_a) takes the same wide tiles: at 256 rows 70 µs a
// launch against 97 on gemm_kernel's 64-row tiles (ncu, H200), step -0.7% at 256,
// equal at 128 (BENCHMARKS.md, thirteenth session). DSV4_CUDA_WIDE_WO_A=0 keeps wo_a
// on the small tiles (A/B runs). bf16 GEMMs of one K slice from 129 rows take 128 x 256
// tiles where those fill the SMs (the LM head: its weights then cross from L2 once
// instead of once per 128 rows; docs/design/decode-roofline.md, thirtieth session, item
// 1b): -1.3 / -1.0% a step at 192 / 256 rows alone, -2.4% at 256 with the warp-
// specialised FP8 tiles below against neither (BENCHMARKS.md, thirty-first session);
// DSV4_CUDA_WIDE_BF16_256=0 keeps them on 128-row tiles (A/B runs).
constexpr int64_t kWideMinRows = 128;
int wide_gemm_rows(CudaBackend& be, WFmt fmt, const lk::GemmParams& p, int64_t n_tiles) {
  const bool wo_a = fmt == WFmt::kFp8Bf16;
  if (!wo_a && ((fmt != WFmt::kFp8 && fmt != WFmt::kBf16) || p.groups != 1)) return 0;
  static const int from_env = env_mode("DSV4_CUDA_WIDE_GEMM");
  const int mode = forced_mode(g_force_wide, from_env);
  const bool bf16_256 = fmt == WFmt::kBf16 && p.slices == 1;  // (the 256-row tile's one slice)
  if (mode >= 0) return mode == 0 ? 0 : mode == 3 && bf16_256 ? 256 : mode == 2 || p.m <= 64 ? 64 : 128;
  static const bool wo_a_wide = env_mode("DSV4_CUDA_WIDE_WO_A") != 0;
  if (wo_a && !wo_a_wide) return 0;
  if (p.m < kWideMinRows) return 0;
  const int64_t sms = be.properties().multiProcessorCount;
  // wo_a takes 128-row tiles once they fill 7/8 of the SMs (at 256 rows one wave of 128
  // CTAs on 132 SMs, against two waves of 64-row tiles): a decoded weight fragment serves
  // twice the rows. At 256 rows -0.4% a step (bench-1g, H200; docs/BENCHMARKS.md,
  // forty-second session).
  if (wo_a && 8 * n_tiles * ((p.m + 127) / 128) >= 7 * sms) return 128;
  static const bool wide_256 = env_mode("DSV4_CUDA_WIDE_BF16_256") != 0;
  if (wide_256 && bf16_256 && p.m > 128 && n_tiles * ((p.m + 255) / 256) >= sms) return 256;
  if (n_tiles * ((p.m + 127) / 128) >= sms) return 128;
  if (8 * n_tiles * ((p.m + 63) / 64) >= 7 * sms) return 64;
  return 0;
}

// The FP8 wide tiles by the warp-specialised kernel (same bits), by default with CTAs
// walking tiles, at most one an SM (mode 2: -0.5 / -0.6 / -0.7% a step at 128 / 192 / 256 rows;
// mode 1, one tile a CTA, -0.3 / -0.3 / -0.4%; BENCHMARKS.md, thirty-first session).
// DSV4_CUDA_WIDE_WS=0 keeps them on gemm_wide_kernel, =1 takes mode 1 (A/B runs). It
// takes a stage's block scale in the aligned 4-byte word that holds it.
std::atomic<int64_t> g_wide_ws_launches{0};
std::atomic<int> g_force_wide_ws{-1};
std::atomic<int> g_wide_ws_max_ctas{0};
int wide_ws_mode() {
  static const int from_env = [] {
    const int m = env_mode("DSV4_CUDA_WIDE_WS");
    return m < 0 ? 2 : m;
  }();
  return forced_mode(g_force_wide_ws, from_env);
}
bool wide_ws_fits(const lk::GemmParams& p) { return !p.y_f32 && aligned(p.s0, 4) && aligned(p.s1, 4); }
// wo_a's FP8-as-bf16 wide tiles by the same kernel (same bits), in DSV4_CUDA_WIDE_WS's
// mode: the default since the sixty-sixth session, whose consumers keep a chain on the tensor
// core while they decode and fold (consume_fp8bf16_tile); DSV4_CUDA_WIDE_WS_WO_A=0 keeps
// gemm_wide_kernel. ncu at 256 rows: 44.7 against 56.8 µs a launch; the step -0.0 to -0.6%
// at 128 and 256 rows over four A/Bs (one apart in every round; BENCHMARKS.md).
std::atomic<int> g_force_wide_ws_wo_a{-1};
bool wide_ws_wo_a() {
  static const bool from_env = env_mode("DSV4_CUDA_WIDE_WS_WO_A") != 0;
  return forced_or(g_force_wide_ws_wo_a, from_env);
}
// bf16's 256-row tiles (the LM head from 129 rows) by the same kernel (same bits; results
// stored from registers, f32 or bf16), in DSV4_CUDA_WIDE_WS's mode; DSV4_CUDA_WIDE_WS_BF16=0
// keeps the lockstep kernel. ncu had that kernel's LM head at 511 µs (~530 TFLOPS) at 256
// rows, its stalls on the copy code between the products; in this one the LM head takes
// 486 µs, -0.6% a step at 192 rows and -0.1% at 256 (docs/BENCHMARKS.md, forty-fifth session).
std::atomic<int> g_force_wide_ws_bf16{-1};
bool wide_ws_bf16() {
  static const bool from_env = env_mode("DSV4_CUDA_WIDE_WS_BF16") != 0;
  return forced_or(g_force_wide_ws_bf16, from_env);
}

// Mode 2's grid (ops/cuda/wide_ws_grid.h): as few CTAs as its rounds of tiles need, at
// most one an SM or the test hook's cap. In a CSA layer at 256 rows the indexer's chain
// had waited ~48 µs for wq_b's last CTAs to leave the SMs (trace-chain-b256-h100-b91de82.tsv);
// with 4 SMs left free the step measured -0.1% at 256 rows (H100, ninety-sixth session).
// DSV4_CUDA_WIDE_WS_GRID=sms: one CTA an SM whatever the rounds (A/B runs).
int64_t wide_ws_grid(int64_t tiles, int sms) {
  static const bool even = !env_is("DSV4_CUDA_WIDE_WS_GRID", "sms");
  const int cap = g_wide_ws_max_ctas.load(std::memory_order_relaxed);
  return wide_ws_walk_ctas(tiles, cap > 0 ? cap : sms, even);
}

template <WFmt F, int R, bool kTwo>
void launch_wide_ws(CudaBackend& be, const lk::GemmParams& p, int64_t tiles, int mode) {
  constexpr int smem = lk::gemm_wide_ws_smem_bytes<F, R, kTwo>(lk::wide_ws_stages<F, R, kTwo>());
  static std::atomic<uint64_t> done{0};
  allow_smem(lk::gemm_wide_ws_kernel<F, R, kTwo>, smem, be.device_index(), done);
  const int64_t ctas = mode == 2 ? wide_ws_grid(tiles, be.properties().multiProcessorCount) : tiles;
  lk::gemm_wide_ws_kernel<F, R, kTwo><<<unsigned(ctas), lk::kWsThreads, smem, be.stream()>>>(p);
  check_launch(be.stream());
  g_wide_launches.fetch_add(1, std::memory_order_relaxed);
  g_wide_ws_launches.fetch_add(1, std::memory_order_relaxed);
}

// bf16's 256-row tiles in clusters of two CTAs sharing each stage's activations by TMA
// multicast (gemm_wide_mc_kernel.cuh; same bits): the default since the forty-sixth session
// (-0.5% a step at 192 rows, apart in 3 rounds), DSV4_CUDA_WIDE_MC=0 keeps the
// warp-specialised kernel; in DSV4_CUDA_WIDE_WS's mode 2, where it can: wide_mc_fits.
std::atomic<int> g_force_wide_mc{-1};
std::atomic<int64_t> g_wide_mc_launches{0};
bool wide_mc() {
  static const bool from_env = env_mode("DSV4_CUDA_WIDE_MC") != 0;
  return forced_or(g_force_wide_mc, from_env);
}
bool wide_mc_fits(const lk::GemmParams& p) {
  return p.groups == 1 && p.n_split >= p.n && p.in_rows == nullptr && p.slices == 1 && p.tiles_per_group % 2 == 0 &&
         p.k % 64 == 0 && aligned(p.w0, 16) && aligned(p.a, 16) && p.w_row_bytes % 16 == 0 && p.a_row_bytes % 16 == 0;
}
// A TMA map of a bf16 matrix [rows, cols] (row stride row_bytes) in boxes of 64 values x 128
// rows with the 128-byte swizzle (gemm_wide_mc_kernel.cuh); rows past `rows` read as zeros.
CUtensorMap bf16_box_map(const void* base, int64_t rows, int64_t cols, int64_t row_bytes) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    DSV4_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    DSV4_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
               "gemm: the driver has no cuTensorMapEncodeTiled (CUDA 12.0 or later is needed for TMA maps)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(row_bytes)};
  const cuuint32_t box[2] = {64, 128};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  DSV4_CHECK(r == CUDA_SUCCESS, "gemm: cuTensorMapEncodeTiled failed ({}) for a bf16 matrix of {} x {} (row {} bytes)",
             int(r), rows, cols, row_bytes);
  return map;
}
// The launch of gemm_wide_mc_bf16_kernel in clusters of two (grid set by the caller);
// `cluster` holds the attribute the config points to.
cudaLaunchConfig_t wide_mc_config(cudaStream_t stream, cudaLaunchAttribute& cluster) {
  cluster = cudaLaunchAttribute{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 2;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(2);
  cfg.blockDim = dim3(lk::kWsThreads);
  cfg.dynamicSmemBytes = lk::kMcSmemBytes;
  cfg.stream = stream;
  cfg.attrs = &cluster;
  cfg.numAttrs = 1;
  return cfg;
}
// Clusters of two of gemm_wide_mc_bf16_kernel that can be resident at once on this device
// (asked once per device, on the first, eager, use): the grid, so that every cluster's walk
// runs in one wave. 0 where none fits (e.g. a MIG slice): the bf16 tiles then stay on
// gemm_wide_ws_kernel.
int wide_mc_max_clusters(CudaBackend& be) {
  static std::atomic<int> known[64];
  static std::atomic<uint64_t> asked{0};
  const int dev = be.device_index() & 63;
  const uint64_t bit = uint64_t(1) << dev;
  if (asked.load(std::memory_order_acquire) & bit) return known[dev].load(std::memory_order_relaxed);
  static std::atomic<uint64_t> done{0};
  allow_smem(lk::gemm_wide_mc_bf16_kernel, lk::kMcSmemBytes, be.device_index(), done);
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t cfg = wide_mc_config(nullptr, cluster);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, lk::gemm_wide_mc_bf16_kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // (the query's error is not the stream's)
    n = 0;
  }
  known[dev].store(n, std::memory_order_relaxed);
  asked.fetch_or(bit, std::memory_order_acq_rel);
  return n;
}
void launch_wide_mc(CudaBackend& be, const lk::GemmParams& p) {
  const CUtensorMap wmap = bf16_box_map(p.w0, p.n, p.k, p.w_row_bytes);
  const CUtensorMap amap = bf16_box_map(p.a, p.m, p.k, p.a_row_bytes);
  cudaLaunchAttribute cluster;
  cudaLaunchConfig_t cfg = wide_mc_config(be.stream(), cluster);
  const int64_t pairs = int64_t(p.tiles_per_group / 2) * ((p.m + 255) / 256);
  const int cap = g_wide_ws_max_ctas.load(std::memory_order_relaxed);  // (tests: CTAs, so cap / 2 clusters)
  const int64_t clusters =
      std::max<int64_t>(1, std::min<int64_t>({pairs, wide_mc_max_clusters(be), cap > 0 ? cap / 2 : INT32_MAX}));
  cfg.gridDim = dim3(unsigned(2 * clusters));
  DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, lk::gemm_wide_mc_bf16_kernel, p, wmap, amap));
  check_launch(be.stream());
  g_wide_launches.fetch_add(1, std::memory_order_relaxed);
  g_wide_mc_launches.fetch_add(1, std::memory_order_relaxed);
}

template <WFmt F, int R, bool kTwo>
void launch_wide(CudaBackend& be, const lk::GemmParams& p, dim3 grid) {
  if constexpr (F == WFmt::kFp8 || F == WFmt::kFp8Bf16) {
    if (const int mode = wide_ws_mode(); mode > 0 && wide_ws_fits(p) && (F == WFmt::kFp8 || wide_ws_wo_a()))
      return launch_wide_ws<F, R, kTwo>(be, p, int64_t(grid.x) * grid.y, mode);
  }
  if constexpr (F == WFmt::kBf16 && R == 256) {  // (one K slice: dispatch_wide checks it)
    if (wide_ws_mode() == 2 && wide_mc() && wide_mc_fits(p) && wide_mc_max_clusters(be) > 0)
      return launch_wide_mc(be, p);
    if (const int mode = wide_ws_mode(); mode > 0 && wide_ws_bf16())
      return launch_wide_ws<F, R, kTwo>(be, p, int64_t(grid.x) * grid.y, mode);
  }
  constexpr int smem = lk::gemm_wide_smem_bytes<F, R, kTwo>();
  static std::atomic<uint64_t> done{0};
  allow_smem(lk::gemm_wide_kernel<F, R, kTwo>, smem, be.device_index(), done);
  lk::gemm_wide_kernel<F, R, kTwo><<<grid, lk::kWideThreads, smem, be.stream()>>>(p);
  check_launch(be.stream());
  g_wide_launches.fetch_add(1, std::memory_order_relaxed);
}

template <WFmt F>
void dispatch_wide(CudaBackend& be, const lk::GemmParams& p, dim3 grid, int rows, bool two) {
  if constexpr (F == WFmt::kBf16) {
    if (rows == 256) {
      DSV4_CHECK(!two, "gemm: 256-row wide tiles take one K slice ({} slices)", p.slices);
      return launch_wide<F, 256, false>(be, p, grid);
    }
  }
  DSV4_CHECK(rows == 64 || rows == 128, "gemm: no {}-row wide tiles for this format", rows);
  if (rows == 128)
    return two ? launch_wide<F, 128, true>(be, p, grid) : launch_wide<F, 128, false>(be, p, grid);
  return two ? launch_wide<F, 64, true>(be, p, grid) : launch_wide<F, 64, false>(be, p, grid);
}

// ---- TMA bulk copies of FP4 expert weights ------------------------------------------------
std::atomic<int64_t> g_tma_launches{0};
std::atomic<int> g_force_tma{-1};
std::atomic<int64_t> g_shared_decode_launches{0};
std::atomic<int> g_force_shared_decode{-1};

// DSV4_CUDA_TMA=0: the FP4 expert GEMM copies its weights with cp.async (A/B runs and
// the bit-for-bit test of both).
bool tma_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_TMA", "0");
  return forced_or(g_force_tma, from_env);
}

// FP4 experts in 16-row tiles, each weight fragment decoded once for all 16 rows:
// pays where experts often hold 9-16 rows (~15% of them at an average of 6); where
// none does, the launch's 128-register cap and its two code paths cost a little.
// Step on bench-1g (H200), on against off (as two 8-row groups, the seventh
// session's form), by the average rows an expert:
// 1 (batch 16) +0.6%, 2 (64) +0.9% (e7ec4eb); 3 (128) -0.7%, 5 (192) -2.3%,
// 6 (256) -4.9% (55d3f51). DSV4_CUDA_SHARED_DECODE=0 / 1 turns it off / on at every
// load (A/B runs).
constexpr int64_t kSharedDecodeMinAvgRows = 3;
// Those launches run a tile of 9-16 rows as one 16-row tile (gemm_tile NT = 2: n16
// wgmmas, two chunks a wait). The form it replaced, two 8-row groups sharing each
// decoded fragment (n8 wgmmas, four chunks a wait a group), was slower at every
// batch that takes it, in two sessions (H200, bench-1g, ms a step): 10.49 / 13.06 /
// 13.99-14.00 against 10.61 / 13.16-13.27 / 14.13-14.20 at 128 / 192 / 256, then
// 10.37 / 12.93-12.98 / 13.88-13.95 against 10.50 / 13.11 / 14.05 (BENCHMARKS.md,
// thirteenth and fourteenth sessions). Same bits.
bool shared_decode_wanted(int64_t avg_rows) {
  static const int from_env = env_mode("DSV4_CUDA_SHARED_DECODE");
  const int mode = forced_mode(g_force_shared_decode, from_env);
  return mode < 0 ? avg_rows >= kSharedDecodeMinAvgRows : mode == 1;
}

// FP4 expert weights by TMA bulk copies, or false (cp.async copies): whole 128-row
// tiles only (a stage run never reaches past an expert's rows), every weight 16-byte
// aligned (the bulk copy's rule; cudaMalloc'd tensors are).
bool expert_bulk_copies(const lk::GemmParams& p, const lk::ExpertTable& table, int64_t count) {
  if (!tma_enabled() || p.n % lk::kTileN != 0 || p.n_split % lk::kTileN != 0) return false;
  for (int64_t e = 0; e < count; ++e)
    if (!aligned(table.p[e][0], 16) || !aligned(table.p[e][2], 16)) return false;
  return true;
}

// The fold of a split GEMM's S partials, in slice order either way (same bits): by
// each tile's last CTA, its thread r summing S x rows partials of weight row r, or
// by split_fold_kernel, one more launch (52 a step at batch 16 on bench-1g, 3.4 µs
// each under ncu). The launch spreads the reads over many SMs; the last CTA reads
// its tile's alone (S x rows x 512 bytes, 256 KB at S = 32 and 16 rows) and wins
// only while that is small: last-CTA folds up to S x rows = 256 / 1024 measured
// +0.8% / +4.9% a step at 16 and +1.2% / +7.4% at 32 against 64 (bench-1g, H200,
// twenty-fifth session), with tile-major partials and 64 loads a slab. The 64-row tiles
// keep it too; DSV4_CUDA_LAST_CTA_FOLD moves it for the 16- and 32-row tiles (A/B runs).
// The 8-row tiles' last CTA loads a thread's partials one after another
// (fold_row_major_slices) and takes up to kLastCtaFoldMax8Rows: against 64, -0.3 / -0.9% a
// step at 3 / 4 rows, within 0.1% at 1, 2, 6 and 8 (H100, ninety-seventh session,
// docs/BENCHMARKS.md); 16 lost 0.2% at 3 rows. DSV4_CUDA_LAST_CTA_FOLD_8ROW moves it (A/B
// runs). One row's fold stays with the last CTA: S <= 32.
constexpr int64_t kLastCtaFoldMax = 64;
constexpr int64_t kLastCtaFoldMax8Rows = 32;
static_assert(kGemmMaxSlices <= kLastCtaFoldMax8Rows, "one row's slices stay with the last CTA");
std::atomic<int64_t> g_fold_launches{0};
std::atomic<int> g_force_last_cta_fold{-1};
// GEMM launches whose fold also wrote the output's FP8 codes (GemmParams::yq), and
// grouped_linear_linear's switch for it: DSV4_CUDA_FOLD_QUANT=0 quantizes z by its own
// launch instead (A/B runs); a test hook may force either. The same bits.
std::atomic<int64_t> g_fold_quant_launches{0};
std::atomic<int> g_force_fold_quant{-1};
bool fold_quant_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_FOLD_QUANT", "0");
  return forced_or(g_force_fold_quant, from_env);
}

// The cluster fold of split plain GEMMs (gemm_kernel's kClusterFold) in place of
// split_fold_kernel's launch, for 16-row tiles whose slices make a portable cluster
// (<= 8; docs/design/cuda-linear.md, "The cluster fold"): at bench-1g's 16 rows wo_b
// and the shared expert's two launches a layer (24 of the step's 52 fold launches),
// -0.6% a step. DSV4_CUDA_CLUSTER_FOLD=0 keeps the fold launches.
std::atomic<int64_t> g_cluster_fold_launches{0};
std::atomic<int> g_force_cluster_fold{-1};
bool cluster_fold_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_CLUSTER_FOLD", "0");
  return forced_or(g_force_cluster_fold, from_env);
}

// The batched last-CTA fold's half-width slabs for 16-row tiles of at most 8 rows
// (GemmParams::fold_half_rows): on, -0.3 / -0.5% a step at 5 / 8 rows on an H200 (docs/BENCHMARKS.md,
// "Ninety-ninth session"); DSV4_CUDA_FOLD_HALF_ROWS=0 keeps the full-width slabs, a test hook may
// force either. The same bits: each output adds its slices in order.
std::atomic<int> g_force_fold_half_rows{-1};
bool fold_half_rows_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_FOLD_HALF_ROWS", "0");
  return forced_or(g_force_fold_half_rows, from_env);
}

// Whether clusters of `split` CTAs of the 16-row cluster-fold kernel can be resident on
// this device (cudaOccupancyMaxActiveClusters > 0), asked once per device, format and
// cluster size: a partitioned GPU (MIG) need not fit 8 of them in one GPC. Where they
// do not fit, or the query fails, run_gemm keeps the fold launch (same bits).
// (Generic: `kernel` with `smem` bytes a CTA, the answers cached per device in asked / fits,
// one pair per kernel.)
template <typename Kernel>
bool clusters_fit(CudaBackend& be, Kernel kernel, int smem, int split, std::atomic<uint64_t>* asked,
                  std::atomic<uint64_t>* fits) {
  const uint64_t bit = uint64_t(1) << (be.device_index() & 63);
  if (asked[split].load(std::memory_order_acquire) & bit) return fits[split].load(std::memory_order_acquire) & bit;
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t cfg = cluster_fold_config(dim3(1, 1, unsigned(split)), split, smem, nullptr, cluster);
  int clusters = 0;
  const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters > 0;
  if (!ok) (void)cudaGetLastError();  // (the query's error, if any, is not the stream's)
  if (ok) fits[split].fetch_or(bit, std::memory_order_acq_rel);
  asked[split].fetch_or(bit, std::memory_order_acq_rel);
  return ok;
}
template <WFmt F>
bool cluster_fold_fits(CudaBackend& be, int split) {
  static std::atomic<uint64_t> asked[lk::kMaxClusterFold + 1], fits[lk::kMaxClusterFold + 1];
  return clusters_fit(be, cluster_fold_kernel<F>(be), lk::gemm_smem_bytes<F, kClusterFoldNt>(), split, asked, fits);
}
bool cluster_fold_fits(CudaBackend& be, WFmt fmt, int64_t split) {
  if (split < 2 || split > lk::kMaxClusterFold) return false;
  switch (fmt) {
    case WFmt::kFp8: return cluster_fold_fits<WFmt::kFp8>(be, int(split));
    case WFmt::kBf16: return cluster_fold_fits<WFmt::kBf16>(be, int(split));
    case WFmt::kFp8Bf16: return cluster_fold_fits<WFmt::kFp8Bf16>(be, int(split));
    case WFmt::kFp4: return false;
  }
  return false;
}

// The routed experts' FP4 GEMMs that split their K slices (1 row at bench-1g) copy their
// row scales a 4-stage group at a time where a slice is whole groups (GemmParams::
// split_scale_groups), with the stage's bulk copy in the TMA path, instead of 4 bytes a
// row and stage by cp.async (whose addressing, conversion and wait were ~45 instructions
// of the batch-1 gate/up stage's ~250 in its SASS, fifty-seventh session; the seventh
// session's group copies, two cp.async a row, had measured 0.6% slower at batch 1).
// DSV4_CUDA_SPLIT_SCALE_GROUPS=0 keeps the 4-byte copies (same bits).
std::atomic<int64_t> g_split_scale_group_launches{0};
std::atomic<int> g_force_split_scale_groups{-1};
bool split_scale_groups_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_SPLIT_SCALE_GROUPS", "0");
  return forced_or(g_force_split_scale_groups, from_env);
}
// p.split_scale_groups = on, counted where the kernel then copies whole groups (a slice of
// whole groups): the split launches and the split fused step both set it this way.
void set_split_scale_groups(lk::GemmParams& p, bool on) {
  p.split_scale_groups = on ? 1 : 0;
  if (on && (p.k / 128 / p.split) % lk::kScaleStages == 0)
    g_split_scale_group_launches.fetch_add(1, std::memory_order_relaxed);
}

// The routed experts' down GEMM (the separate launches) reads its tile list and its
// first weight stages before its dependency wait, under SwiGLU's launch
// (routed_experts), where that launch lets it start early: a SwiGLU grid of at most
// half the SMs (wait_then_release_dependents; 1-2 rows at bench-1g). Larger grids
// release it only as they exit, so the early form would start no sooner (and at 256
// rows the session's end read 0.9% slower than its start with it everywhere, s66e; not
// measured apart). DSV4_CUDA_EXPERT_EARLY_WEIGHTS=0 never, =1 always where the down GEMM
// runs 8-row tiles in one row group (expert_gemm_kernel's small-row instances; same bits).
std::atomic<int64_t> g_expert_early_weight_launches{0};
std::atomic<int> g_force_expert_early_weights{-1};
bool expert_early_weights(CudaBackend& be, unsigned swiglu_blocks) {
  static const int from_env = env_mode("DSV4_CUDA_EXPERT_EARLY_WEIGHTS");
  const int mode = forced_mode(g_force_expert_early_weights, from_env);
  return mode == 1 ||
         (mode == -1 && grid_releases_early(swiglu_blocks, uint64_t(be.properties().multiProcessorCount)));
}

// The routed experts' split GEMMs (1 row at bench-1g: 6 list tiles x 32 weight tiles,
// S = 2) fold their slices in clusters of a tile's S CTAs (expert_gemm_kernel's
// kClusterFold) instead of by the tile's last CTA: the last-CTA fold's partial stores,
// fence, counted arrival and partial loads were ~16% of the batch-1 gate/up launch's
// stall samples (ncu, fifty-seventh session). FP4 8-row tiles, S <= 8, where the device
// holds such clusters; DSV4_CUDA_EXPERT_CLUSTER_FOLD=0 keeps the last-CTA fold (same bits).
std::atomic<int64_t> g_expert_cluster_fold_launches{0};
std::atomic<int> g_force_expert_cluster_fold{-1};
// Whether clusters of `split` CTAs of kKernel (the cluster expert kernels' shared memory)
// fit on the device, asked once per device and split.
template <auto kKernel>
bool expert_clusters_fit(CudaBackend& be, int64_t split) {
  if (split < 2 || split > lk::kMaxClusterFold) return false;
  static std::atomic<uint64_t> asked[lk::kMaxClusterFold + 1], fits[lk::kMaxClusterFold + 1];
  return clusters_fit(be, with_expert_cluster_smem<kKernel>(be), kExpertClusterSmem, int(split), asked, fits);
}
bool expert_cluster_fold(CudaBackend& be, bool tma, int64_t split) {
  static const bool from_env = !env_is("DSV4_CUDA_EXPERT_CLUSTER_FOLD", "0");
  if (!forced_or(g_force_expert_cluster_fold, from_env)) return false;
  return tma ? expert_clusters_fit<kExpertClusterKernel<true>>(be, split)
             : expert_clusters_fit<kExpertClusterKernel<false>>(be, split);
}
// Whether clusters of `split` CTAs of the split fused step fit (as expert_cluster_fold asks
// for the cluster launch).
bool split_fused_clusters_fit(CudaBackend& be, bool tma, int64_t split) {
  return tma ? expert_clusters_fit<lk::expert_ffn_split_fused_kernel<true>>(be, split)
             : expert_clusters_fit<lk::expert_ffn_split_fused_kernel<false>>(be, split);
}
// Whether clusters of `split` CTAs of both ready-flag launches fit.
bool ready_flag_clusters_fit(CudaBackend& be, bool tma, int64_t split) {
  return tma ? expert_clusters_fit<lk::expert_gate_up_ready_kernel<true>>(be, split) &&
                   expert_clusters_fit<lk::expert_down_ready_kernel<true>>(be, split)
             : expert_clusters_fit<lk::expert_gate_up_ready_kernel<false>>(be, split) &&
                   expert_clusters_fit<lk::expert_down_ready_kernel<false>>(be, split);
}

// The router's logits folded by router_select_kernel from the GEMM's K-slice partials
// where the GEMM would otherwise be followed by split_fold_kernel (3-256 rows on
// bench-1g): the same bits, one launch less on each layer's chain.
// DSV4_CUDA_ROUTER_FOLD=0 keeps the fold launch (A/B runs).
std::atomic<int64_t> g_router_folds{0};
std::atomic<int> g_force_router_fold{-1};
// router_select_kernel's early form (its kEarly): DSV4_CUDA_ROUTER_EARLY=0 keeps the late
// one (A/B runs); a test hook may force either. The same bits.
std::atomic<int> g_force_router_early{-1};
bool router_early() {
  static const bool from_env = !env_is("DSV4_CUDA_ROUTER_EARLY", "0");
  return forced_or(g_force_router_early, from_env);
}
// The router's top k by rank (router_topk_by_rank, the select kernel's block as wide as the
// experts, every thread scoring its own) or warp 0's k rounds. DSV4_CUDA_ROUTER_RANK unset:
// by rank where the select does not fold the GEMM's partials (1-2 rows at bench-1g), where
// its block would otherwise be one warp: -2.9 / -1.3% a step at 1 / 2 rows on an H200, -1.9 /
// -0.9% on an H100; where it folds (its block already scores), the rounds: by rank there read
// +0.1% at 8 rows, 0.0% at 4, 16, 64 and 256 (H200, eightieth session). 1: by rank wherever
// it applies; 0: the rounds (one warp where the select does not fold). A test hook may force 0
// or 1. The same bits every way.
std::atomic<int> g_force_router_rank{-1};
int router_rank_mode() {
  static const int from_env = env_mode("DSV4_CUDA_ROUTER_RANK");
  return forced_mode(g_force_router_rank, from_env);
}
// moe_prep_kernel's block size: DSV4_CUDA_PREP_THREADS=256|512|1024, default 512: at
// bench-1g's 16 rows -0.6% and -0.4% a step against 1024 (two A/Bs on an H200, 2026-12-03;
// 1, 64 and 256 rows within 0.2%): smaller blocks find room beside the shared expert's
// GEMM on the other lane sooner. Any size gives the same bits (a counting sort whose
// order inside an expert does not matter, and the same per-warp quantization items); a
// test hook may force one.
std::atomic<int> g_force_prep_threads{0};
int moe_prep_threads() {
  static const int from_env = [] {
    const char* v = std::getenv("DSV4_CUDA_PREP_THREADS");
    if (v == nullptr || *v == '\0') return 512;
    const std::string t(v);
    DSV4_CHECK(t == "256" || t == "512" || t == "1024", "DSV4_CUDA_PREP_THREADS='{}': expected 256, 512 or 1024", t);
    return std::atoi(v);
  }();
  const int forced = g_force_prep_threads.load(std::memory_order_relaxed);
  return forced > 0 ? forced : from_env;
}
// moe_prep_kernel's tile list by one warp where the pairs fit one (expert_prep_warp):
// DSV4_CUDA_PREP_WARP=0 keeps the block's counting sort (A/B runs); a test hook may force
// either. The same tiles, so the same bits.
std::atomic<int> g_force_prep_warp{-1};
std::atomic<int64_t> g_prep_warp_launches{0};
bool moe_prep_warp_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_PREP_WARP", "0");
  return forced_or(g_force_prep_warp, from_env);
}
// The rows up to which moe_prep_kernel's one launch also quantizes x and zeroes the
// non-local pairs (beyond: three launches, the tile list alone in block 0):
// DSV4_CUDA_PREP_ONE_LAUNCH_ROWS, default 64 (A/B runs). The same bits either way.
// Measured (bench-1g, H200, fifty-second session), 64 against 32: -0.7% a step at 64
// rows (apart in both rounds), in 512-thread blocks; the older limit of 32 came from an
// A/B with 1024-thread blocks (caf5932: one launch 0.8% slower at 64 then).
int64_t moe_prep_one_launch_rows() {
  static const int64_t from_env = env_integer("DSV4_CUDA_PREP_ONE_LAUNCH_ROWS", 64, 0, 65536);
  return from_env;
}
// Beyond moe_prep_one_launch_rows(): the non-local pairs' outputs zeroed by moe_prep_kernel's
// blocks other than the tile list's (DSV4_CUDA_PREP_ZERO=1, the default), or by a launch of
// their own before it (=0, A/B runs). The same bits.
bool prep_zeroes_nonlocal() {
  static const bool from_env = !env_is("DSV4_CUDA_PREP_ZERO", "0");
  return from_env;
}
bool router_fold_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_ROUTER_FOLD", "0");
  return forced_or(g_force_router_fold, from_env);
}
// The rows up to which the router's GEMM and select run as one launch
// (router_gemm_select_kernel, where the GEMM splits its slices over CTAs in 8- or 16-row
// tiles): DSV4_CUDA_ROUTER_ONE_LAUNCH_ROWS, 0-16, default 0 (two launches). Measured (H100,
// seventy-eighth session): +0.7% a step at 1 row, +1.0% at 16; in the batch-1 trace the
// launch runs 14.7 µs against the GEMM's 5.0 and the select's 4.9 after it (its
// finisher's ~10 µs not explained). Kept for A/Bs; a test hook may force a bound. The same
// bits either way.
std::atomic<int64_t> g_router_one_launches{0};
std::atomic<int> g_force_router_one_launch_rows{-1};
int64_t router_one_launch_rows() {
  static const int64_t from_env = env_integer("DSV4_CUDA_ROUTER_ONE_LAUNCH_ROWS", 0, 0, 16);
  const int forced = g_force_router_one_launch_rows.load(std::memory_order_relaxed);
  return forced >= 0 ? forced : from_env;
}

int64_t last_cta_fold_max(int nt) {
  const int forced = g_force_last_cta_fold.load(std::memory_order_relaxed);
  if (nt == 1) {
    static const int64_t eight_rows = env_integer("DSV4_CUDA_LAST_CTA_FOLD_8ROW", kLastCtaFoldMax8Rows, 0, 1 << 20);
    return forced >= 0 ? forced : eight_rows;
  }
  if (!lk::batched_fold_tiles(nt)) return kLastCtaFoldMax;
  static const int64_t from_env = env_integer("DSV4_CUDA_LAST_CTA_FOLD", kLastCtaFoldMax, 0, int64_t(1) << 20);
  return forced >= 0 ? forced : from_env;
}

// Partial sums and arrival counters for split launches (last_cta_fold = false: no
// counters, the caller launches split_fold_kernel). Counters are zeroed when the
// buffer is (re)allocated; the last CTA of each tile resets its counter. tile_rows:
// the row tile of a plain GEMM whose last CTAs take the batched fold (16 or 32,
// GemmParams::partial's tile-major layout), else 0.
void bind_split(CudaBackend& be, lk::GemmParams& p, int64_t rows, int64_t cols, int64_t tiles,
                bool last_cta_fold = true, int64_t tile_rows = 0) {
  const int64_t floats = last_cta_fold && tile_rows > 0 ? tiles * tile_rows * lk::kTileN : rows * cols;
  p.partial = scratch_as<float>(be, "partial", int64_t(p.split) * floats);
  p.partial_rows = rows;
  p.partial_cols = cols;
  p.counters = nullptr;
  if (!last_cta_fold) return;
  // Zero the whole allocation (scratch_on rounds small requests up), not just this launch's tiles.
  const size_t bytes = std::max<size_t>(size_t(tiles) * sizeof(int), 16);
  bool fresh = false;
  p.counters = static_cast<int*>(scratch_on(be, "counters", bytes, &fresh));
  if (fresh) DSV4_CUDA_CHECK(cudaMemsetAsync(p.counters, 0, bytes, be.stream()));
}

// Where a split GEMM's fold is left to its consumer (run_gemm's `leave`): the K-slice
// partials, [split][rows][cols] fp32, as split_fold_kernel would read them.
struct LeftPartials {
  const float* partial = nullptr;
  int split = 0;  // 0: nothing left, the GEMM wrote its output
  int64_t rows = 0;
};

// Plain or grouped GEMM; p describes weights, activations, output, n, k, groups, m.
// With `leave`, a launch that would be followed by split_fold_kernel is not: its
// partials are described in *leave for the consumer to fold (router_select_kernel).
// With p.yq set (bf16 y, 128-column tiles, no second output, no scatter), the fold also
// writes y's FP8 codes and scales where it forms whole rows of tiles (the last CTAs'
// fold of wo_a's FP8-as-bf16 tiles, split_fold_kernel's 4-column form); returns whether
// it did (else the caller quantizes y).
bool run_gemm(CudaBackend& be, WFmt fmt, lk::GemmParams p, LeftPartials* leave = nullptr) {
  if (leave != nullptr) *leave = LeftPartials{};
  DSV4_CHECK(p.yq == nullptr || (p.n % lk::kTileN == 0 && p.y1 == nullptr && p.out_rows == nullptr && !p.y_f32 &&
                                 leave == nullptr && p.ldq == int64_t(p.groups) * p.n),
             "gemm: quantized output needs 128-column tiles of one bf16 output in row order (n={}, ldq={})", p.n,
             p.ldq);
  const int stage_k = is_quant(fmt) ? 128 : 64;
  DSV4_CHECK(p.k % stage_k == 0 && p.k > 0, "gemm: K={} not a multiple of {}", p.k, stage_k);
  const int64_t stages = p.k / stage_k;
  p.tiles_per_group = (p.n + lk::kTileN - 1) / lk::kTileN;
  const int64_t n_tiles = int64_t(p.groups) * p.tiles_per_group;
  p.slices = gemm_slices(n_tiles, stages, 1, is_quant(fmt));
  const int64_t cols = int64_t(p.groups) * p.n;
  DSV4_CHECK(p.y1 == nullptr || (p.groups == 1 && p.n_split % lk::kTileN == 0),
             "gemm: a second output needs one group and a tile-aligned split ({})", p.n_split);
  if (const int wide_rows = wide_gemm_rows(be, fmt, p, n_tiles); wide_rows > 0) {  // all slices walked
    const int64_t m_tiles = (p.m + wide_rows - 1) / wide_rows;
    DSV4_CHECK(m_tiles <= 65535 && n_tiles < (int64_t(1) << 31), "gemm: grid {}x{} too large", n_tiles, m_tiles);
    p.split = 1;
    const dim3 grid{unsigned(n_tiles), unsigned(m_tiles)};
    p.yq = nullptr;
    if (fmt == WFmt::kFp8) dispatch_wide<WFmt::kFp8>(be, p, grid, wide_rows, p.slices > 1);
    else if (fmt == WFmt::kFp8Bf16) dispatch_wide<WFmt::kFp8Bf16>(be, p, grid, wide_rows, p.slices > 1);
    else dispatch_wide<WFmt::kBf16>(be, p, grid, wide_rows, p.slices > 1);
    return false;
  }
  // FP4 (wgmma) tiles stop at 32 rows: 64 would need 256 accumulator registers. FP8
  // beyond 128 rows: 32-row tiles measured 2% faster at batch 256 (one wgmma wait per
  // 2 chunks instead of per chunk), 64-row tiles 1% faster at batch 64 (e0338ef).
  const int nt = fmt == WFmt::kFp4 || (fmt == WFmt::kFp8 && p.m > 128) ? std::min(nt_for_rows(p.m), 4)
                                                                       : nt_for_rows(p.m);
  const int64_t m_tiles = (p.m + 8 * nt - 1) / (8 * nt);
  DSV4_CHECK(m_tiles <= 65535 && n_tiles < (int64_t(1) << 31), "gemm: grid {}x{} too large", n_tiles, m_tiles);
  // Split the slices over CTAs when the tiles alone do not fill one wave (decode,
  // small N) and the partials stay small; otherwise each CTA walks all slices.
  // Both give the same bits.
  const bool split = p.slices > 1 && n_tiles * m_tiles < be.properties().multiProcessorCount &&
                     int64_t(p.slices) * p.m * cols * 4 <= kMaxPartialBytes;
  p.split = split ? p.slices : 1;
  const bool fold_launch = split && int64_t(p.slices) * p.m > last_cta_fold_max(nt);
  const bool cluster_fold =
      fold_launch && nt == kClusterFoldNt && cluster_fold_enabled() && cluster_fold_fits(be, fmt, p.split);
  DSV4_CHECK(!fold_launch || cluster_fold || p.out_rows == nullptr, "gemm: split_fold_kernel writes rows in order");
  if (split && !cluster_fold)
    bind_split(be, p, p.m, cols, n_tiles * m_tiles, !fold_launch, lk::batched_fold_tiles(nt) ? 8 * nt : 0);
  p.fold_half_rows = fold_half_rows_enabled() ? 1 : 0;
  if (cluster_fold) g_cluster_fold_launches.fetch_add(1, std::memory_order_relaxed);
  const bool fold_v4 = cols % 4 == 0 && p.n_split % 4 == 0 && aligned(p.partial, 16);
  const bool fold_quantizes =
      (split && !fold_launch && fmt == WFmt::kFp8Bf16) || (fold_launch && !cluster_fold && fold_v4);
  if (!fold_quantizes) p.yq = nullptr;
  if (p.yq != nullptr) g_fold_quant_launches.fetch_add(1, std::memory_order_relaxed);
  const dim3 grid(unsigned(n_tiles), unsigned(m_tiles), unsigned(p.split));
  const bool two = !split && p.slices > 1;
  switch (fmt) {
    case WFmt::kFp8: dispatch_plain<WFmt::kFp8>(be, p, grid, nt, two, cluster_fold); break;
    case WFmt::kFp4: dispatch_plain<WFmt::kFp4>(be, p, grid, nt, two, cluster_fold); break;
    case WFmt::kBf16: dispatch_plain<WFmt::kBf16>(be, p, grid, nt, two, cluster_fold); break;
    case WFmt::kFp8Bf16: dispatch_plain<WFmt::kFp8Bf16>(be, p, grid, nt, two, cluster_fold); break;
  }
  if (fold_launch && !cluster_fold && leave != nullptr) {
    *leave = LeftPartials{.partial = p.partial, .split = p.split, .rows = p.m};
    return false;
  }
  if (fold_launch && !cluster_fold) {
    const int v = fold_v4 ? 4 : 1;
    const dim3 fold_grid(unsigned((cols / v + lk::kFoldThreads - 1) / lk::kFoldThreads),
                         unsigned(std::min<int64_t>(p.m, 65535)));
    auto* fold = fold_v4 ? lk::split_fold_kernel<4> : lk::split_fold_kernel<1>;
    fold<<<fold_grid, lk::kFoldThreads, 0, be.stream()>>>(p.partial, p.split, p.m, cols, p.y, p.ldy, p.y1, p.ldy1,
                                                         p.n_split, p.y_f32, p.yq, p.ys, p.ldq);
    check_launch(be.stream());
    g_fold_launches.fetch_add(1, std::memory_order_relaxed);
  }
  return p.yq != nullptr;
}

WFmt quant_fmt(const QuantLinear& w) { return w.format == QuantLinear::Format::kFp4Group32 ? WFmt::kFp4 : WFmt::kFp8; }

// Fast path of a quantized weight: 16-byte aligned weight rows for cp.async,
// 4-byte aligned FP4 scale rows, the FP8 block-scale row fits in smem, int sizes.
bool quant_fast_ok(const QuantLinear& w) {
  const bool fp4 = w.format == QuantLinear::Format::kFp4Group32;
  return w.k % 128 == 0 && w.k > 0 && w.n > 0 && w.n < (int64_t(1) << 30) && w.k < (int64_t(1) << 30) &&
         aligned(w.weight.data(), 16) && (fp4 ? aligned(w.scale.data(), 4) : (w.k + 127) / 128 <= lk::kMaxScaleBlocks);
}

// Whether w runs on the FP4 tensor-core GEMM, which reads its activations in the
// split-pairs layout (quantize_rows); every other path reads them in element order.
bool fp4_gemm_path(const QuantLinear& w) {
  return w.format == QuantLinear::Format::kFp4Group32 && !simple_path() && quant_fast_ok(w);
}

// GEMM parameters of an FP8 / FP4 weight on pre-quantized activations xq / xs (M rows).
lk::GemmParams quant_params(const QuantLinear& w, const uint8_t* xq, const float* xs, int64_t M, uint16_t* y,
                            int64_t ldy) {
  const bool fp4 = w.format == QuantLinear::Format::kFp4Group32;
  lk::GemmParams p{};
  p.w0 = p.w1 = w.weight.as<uint8_t>();
  p.s0 = p.s1 = w.scale.as<uint8_t>();
  p.w_row_bytes = fp4 ? w.k / 2 : w.k;
  p.s_row_stride = fp4 ? w.k / 32 : (w.k + 127) / 128;
  p.n = int(w.n);
  p.n_split = int(w.n);
  p.k = int(w.k);
  p.groups = 1;
  p.a = xq;
  p.a_row_bytes = w.k;
  p.a_scale = xs;
  p.a_scale_stride = w.k / 128;
  p.m = int(M);
  p.y = y;
  p.ldy = ldy;
  return p;
}

// y[m * ldy + n] = bf16(xq[m] . W[n]) for pre-quantized activations, in the split-pairs
// layout when split_pairs (then w must take the FP4 GEMM), in element order otherwise.
void quant_gemm(CudaBackend& be, const QuantLinear& w, const uint8_t* xq, const float* xs, int64_t M, uint16_t* y,
                int64_t ldy, bool split_pairs) {
  const bool fp4 = w.format == QuantLinear::Format::kFp4Group32;
  DSV4_CHECK(!split_pairs || fp4_gemm_path(w), "quant_gemm: split-pairs activations for a weight off the FP4 GEMM");
  if (simple_path() || !quant_fast_ok(w) || fp4 != split_pairs) {
    lk::simple_quant_linear_kernel<<<blocks_for_warps(M * w.n, kSimpleBlocks), 256, 0, be.stream()>>>(
        xq, xs, M, w.k, w.weight.as<uint8_t>(), w.scale.as<uint8_t>(), fp4 ? 1 : 0, w.n, y, ldy);
    check_launch(be.stream());
    return;
  }
  run_gemm(be, quant_fmt(w), quant_params(w, xq, xs, M, y, ldy));
}

// Fast path of a bf16 GEMM: bf16 activations (f32 ones use the simple kernel), K a
// multiple of the 64-wide stage, 16-byte aligned rows.
bool bf16_fast_ok(const Tensor& x, const Tensor& w) {
  const int64_t K = w.size(1);
  return x.dtype() == DType::kBF16 && K % 64 == 0 && K > 0 && K < (int64_t(1) << 30) &&
         w.size(0) < (int64_t(1) << 30) && aligned(x.data(), 16) && aligned(w.data(), 16);
}

lk::GemmParams bf16_params(const Tensor& x, const Tensor& w, void* y, bool y_f32) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  lk::GemmParams p{};
  p.w0 = p.w1 = w.as<uint8_t>();
  p.w_row_bytes = 2 * K;
  p.n = int(N);
  p.n_split = int(N);
  p.k = int(K);
  p.groups = 1;
  p.a = x.as<uint8_t>();
  p.a_row_bytes = 2 * K;
  p.m = int(M);
  p.y = y;
  p.ldy = N;
  p.y_f32 = y_f32 ? 1 : 0;
  return p;
}

void bf16_gemm(CudaBackend& be, const Tensor& x, const Tensor& w, void* y, bool y_f32) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  if (simple_path() || !bf16_fast_ok(x, w)) {
    lk::simple_linear_bf16_kernel<<<blocks_for_warps(M * N, kSimpleBlocks), 256, 0, be.stream()>>>(
        x.data(), x.dtype() == DType::kF32 ? 1 : 0, w.as<uint16_t>(), M, N, K, y, y_f32 ? 1 : 0);
    check_launch(be.stream());
    return;
  }
  run_gemm(be, WFmt::kBf16, bf16_params(x, w, y, y_f32));
}

// Two weights' rows stacked into one launch: rows [0, na) from the first (p), the
// rest from the second (q), whose outputs go to q.y (linear_pair). The host keeps na
// a multiple of the 128-row tile, so that a CTA reads one weight.
lk::GemmParams stacked(lk::GemmParams p, const lk::GemmParams& q) {
  p.w1 = q.w0;
  p.s1 = q.s0;
  p.n_split = p.n;
  p.n = p.n + q.n;
  p.y1 = q.y;
  p.ldy1 = q.ldy;
  return p;
}

// DSV4_CUDA_EXPERT_LAUNCHES=N (1-8; a diagnostic, like DSV4_REPEAT_OPS): each expert
// GEMM whose CTAs walk all K runs as N launches over consecutive ranges of its weight
// tiles, each CTA's tile computed as in one launch (same bits), so the step's growth is
// what N - 1 more launch boundaries (a drain, a dependent launch, a ramp) cost.
std::atomic<int64_t> g_expert_launches{0};
std::atomic<int> g_force_expert_launches{-1};
int expert_launch_pieces() {
  static const int from_env = int(env_integer("DSV4_CUDA_EXPERT_LAUNCHES", 1, 1, 8));
  const int f = g_force_expert_launches.load(std::memory_order_relaxed);
  return f >= 1 ? f : from_env;
}

// The routed experts' gate/up and down GEMMs as one launch (docs/design/fused-expert-step.md):
// a list tile's down tiles start once its gate/up tiles and its SwiGLU are done, instead
// of after the whole gate/up launch. Automatic (the default): fused_experts_auto
// (expert_plan.h, where the measurements are). DSV4_CUDA_FUSED_EXPERTS=1 wherever it
// applies, =0 never.
std::atomic<int64_t> g_fused_expert_launches{0};
std::atomic<int> g_force_fused_experts{-1};
int fused_experts_mode() {  // -1 automatic, 0 never, 1 wherever it applies
  static const int from_env = env_mode("DSV4_CUDA_FUSED_EXPERTS");
  return forced_mode(g_force_fused_experts, from_env);
}
// The fused step where both GEMMs split their K slices over clusters of the same size
// (expert_ffn_split_fused_kernel; 1-2 rows where the shapes split alike, 1 row at
// bench-1g): the SwiGLU launch and the boundary before the down GEMM go, the down items'
// first weight stages stream while the gate/up items run. The same bits. Off: measured
// +3.2% a step at one row on an H100 (eighty-first session, 3 rounds apart): in the batch-1
// trace the launch runs ~48 µs a layer on the chain against the three launches' ~44, and
// the shared expert's SwiGLU, on its own lane, starts ~18 µs later than beside the separate
// launches (docs/design/fused-expert-step.md, "Split slices"). DSV4_CUDA_SPLIT_FUSED_EXPERTS=1
// turns it on (A/B runs); a test hook may force either.
std::atomic<int64_t> g_split_fused_expert_launches{0};
std::atomic<int> g_force_split_fused_experts{-1};
bool split_fused_experts_enabled() {
  static const bool from_env = env_is("DSV4_CUDA_SPLIT_FUSED_EXPERTS", "1");
  return forced_or(g_force_split_fused_experts, from_env);
}

// The two expert GEMMs as cluster launches chained by per-list-tile ready flags, the
// SwiGLU in the last gate/up cluster of each list tile (expert_gate_up_ready_kernel,
// expert_down_ready_kernel; docs/design/fused-expert-step.md, "Ready flags across two
// launches"): where the split fused step would apply (1 row at bench-1g), the SwiGLU launch
// and the boundary before the down GEMM go, without the split fused step's down clusters
// holding SM slots while the gate/up clusters run. The same bits. Off: measured +1.3% a
// step at one row on an H100 (eighty-ninth session, 3 rounds apart): in the batch-1 trace
// the SwiGLU link goes and the down link shrinks ~3 µs a layer, but the gate/up grid ends
// ~8 µs a layer later. With the down weights after the flag (DSV4_CUDA_EXPERT_EARLY_WEIGHTS=0)
// +2.1% (ninetieth session): the gate/up grid ends as late, so the cost is its tail (or the
// down CTAs polling beside it), not the down weights' traffic. DSV4_CUDA_EXPERT_READY_FLAGS=1
// turns it on; a test hook may force either.
std::atomic<int64_t> g_ready_flag_expert_launches{0};
std::atomic<int> g_force_ready_flag_experts{-1};
bool ready_flag_experts_enabled() {
  static const bool from_env = env_is("DSV4_CUDA_EXPERT_READY_FLAGS", "1");
  return forced_or(g_force_ready_flag_experts, from_env);
}

// An expert GEMM's tiles and K slices (p.groups, tiles_per_group, slices, split) for
// num_pairs rows in at most max_tiles list tiles: the slices split over CTAs where
// expert_split_k (expert_plan.h) asks for it and the partials stay small; both give the
// same bits. DSV4_CUDA_EXPERT_SPLIT=0 (or the test hook at 0) keeps every CTA walking
// its slices.
std::atomic<int> g_force_expert_split{-1};
bool expert_split_allowed() {
  static const int from_env = env_mode("DSV4_CUDA_EXPERT_SPLIT");
  return forced_mode(g_force_expert_split, from_env) != 0;
}
void plan_expert_gemm(CudaBackend& be, lk::GemmParams& p, int64_t num_pairs, int64_t max_tiles) {
  const int64_t stages = p.k / 128;
  p.groups = 1;
  p.tiles_per_group = (p.n + lk::kTileN - 1) / lk::kTileN;
  const int64_t n_tiles = p.tiles_per_group;
  p.slices = gemm_slices(n_tiles, stages, 4, true);
  const bool split = p.slices > 1 && expert_split_allowed() &&
                     expert_split_k(n_tiles, max_tiles, be.properties().multiProcessorCount) &&
                     int64_t(p.slices) * num_pairs * p.n * 4 <= kMaxPartialBytes;
  p.split = split ? p.slices : 1;
}

// Expert GEMM over the device tile list, one launch per chunk of <= kMaxTableExperts
// local experts. p describes n, n_split, k, activations and output; entries(e, ptrs)
// fills the 4 table pointers of local expert e.
template <typename Entries>
void run_expert_gemm(CudaBackend& be, WFmt fmt, lk::GemmParams p, int64_t num_local, int64_t num_pairs,
                     int64_t max_tiles, int nt, int row_groups, const Entries& entries) {
  plan_expert_gemm(be, p, num_pairs, max_tiles);
  const int64_t n_tiles = p.tiles_per_group;
  const bool split = p.split > 1;
  // (The cluster fold needs no partials; the table's TMA check below decides its kernel.)
  const bool small_rows = small_row_shape(nt, row_groups);
  const bool cluster_fold_shape = split && fmt == WFmt::kFp4 && small_rows;
  set_split_scale_groups(p, split && fmt == WFmt::kFp4 && small_rows && split_scale_groups_enabled());
  if (!small_rows) p.weights_before_wait = 0;  // (no such instance: its launch waits at entry)
  if (p.weights_before_wait) g_expert_early_weight_launches.fetch_add(1, std::memory_order_relaxed);
  if (split) bind_split(be, p, num_pairs, p.n, n_tiles * max_tiles);
  const dim3 grid(unsigned(n_tiles), unsigned(max_tiles), unsigned(p.split));
  const bool two = !split && p.slices > 1;
  auto table = std::make_unique<lk::ExpertTable>();
  for (int64_t c0 = 0; c0 < num_local; c0 += lk::kMaxTableExperts) {
    const int64_t c1 = std::min<int64_t>(num_local, c0 + lk::kMaxTableExperts);
    std::memset(table.get(), 0, sizeof(lk::ExpertTable));
    for (int64_t e = c0; e < c1; ++e) entries(e, table->p[e - c0]);
    p.chunk_begin = int(c0);
    p.chunk_end = int(c1);
    const bool tma = fmt == WFmt::kFp4 && expert_bulk_copies(p, *table, c1 - c0);
    const int64_t pieces = split ? 1 : std::min<int64_t>(expert_launch_pieces(), n_tiles);
    for (int64_t piece = 0; piece < pieces; ++piece) {  // (one launch unless the diagnostic asks for more)
      const int64_t t0 = n_tiles * piece / pieces, t1 = n_tiles * (piece + 1) / pieces;
      p.n_tile_offset = int(t0);
      const dim3 piece_grid(unsigned(t1 - t0), grid.y, grid.z);
      const bool cluster = cluster_fold_shape && expert_cluster_fold(be, tma, p.split);
      if (tma) dispatch_expert<WFmt::kFp4, true>(be, p, piece_grid, nt, row_groups, two, cluster, *table);
      else if (fmt == WFmt::kFp4)
        dispatch_expert<WFmt::kFp4, false>(be, p, piece_grid, nt, row_groups, two, cluster, *table);
      else dispatch_expert<WFmt::kFp8, false>(be, p, piece_grid, nt, row_groups, two, false, *table);
      if (cluster) g_expert_cluster_fold_launches.fetch_add(1, std::memory_order_relaxed);
      g_expert_launches.fetch_add(1, std::memory_order_relaxed);
    }
    if (tma) g_tma_launches.fetch_add(1, std::memory_order_relaxed);
    if (row_groups > 1) g_shared_decode_launches.fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace

void cuda_linear_force_path(int path) { g_force_path.store(path, std::memory_order_relaxed); }
int64_t cuda_linear_fused_expert_launches() { return g_fused_expert_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_fused_experts(int on) { g_force_fused_experts.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_split_fused_expert_launches() {
  return g_split_fused_expert_launches.load(std::memory_order_relaxed);
}
void cuda_linear_force_split_fused_experts(int on) {
  g_force_split_fused_experts.store(on, std::memory_order_relaxed);
}
int64_t cuda_linear_ready_flag_expert_launches() {
  return g_ready_flag_expert_launches.load(std::memory_order_relaxed);
}
void cuda_linear_force_ready_flag_experts(int on) { g_force_ready_flag_experts.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_expert_launches() { return g_expert_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_expert_split(int mode) { g_force_expert_split.store(mode, std::memory_order_relaxed); }
void cuda_linear_force_expert_launches(int pieces) {
  g_force_expert_launches.store(pieces, std::memory_order_relaxed);
}
int64_t cuda_linear_tma_launches() { return g_tma_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_tma(int on) { g_force_tma.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_shared_decode_launches() { return g_shared_decode_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_shared_decode(int on) { g_force_shared_decode.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_wide_launches() { return g_wide_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_wide(int on) { g_force_wide.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_wide_ws_launches() { return g_wide_ws_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_wide_ws_wo_a(int on) { g_force_wide_ws_wo_a.store(on, std::memory_order_relaxed); }
void cuda_linear_force_wide_ws_bf16(int on) { g_force_wide_ws_bf16.store(on, std::memory_order_relaxed); }
void cuda_linear_force_wide_mc(int on) { g_force_wide_mc.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_wide_mc_launches() { return g_wide_mc_launches.load(std::memory_order_relaxed); }
bool cuda_linear_wide_mc_fits_device(CudaBackend& be) { return wide_mc_max_clusters(be) > 0; }
void cuda_linear_force_wide_ws(int mode, int max_ctas) {
  g_force_wide_ws.store(mode, std::memory_order_relaxed);
  g_wide_ws_max_ctas.store(max_ctas, std::memory_order_relaxed);
}
int64_t cuda_linear_fold_launches() { return g_fold_launches.load(std::memory_order_relaxed); }
int64_t cuda_linear_fold_quant_launches() { return g_fold_quant_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_fold_quant(int on) { g_force_fold_quant.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_router_folds() { return g_router_folds.load(std::memory_order_relaxed); }
void cuda_linear_force_router_fold(int on) { g_force_router_fold.store(on, std::memory_order_relaxed); }
void cuda_linear_force_router_early(int on) { g_force_router_early.store(on, std::memory_order_relaxed); }
void cuda_linear_force_router_rank(int on) { g_force_router_rank.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_router_one_launches() { return g_router_one_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_router_one_launch_rows(int rows) {
  DSV4_CHECK(rows >= -1 && rows <= 16, "cuda_linear_force_router_one_launch_rows({}): expected -1 .. 16", rows);
  g_force_router_one_launch_rows.store(rows, std::memory_order_relaxed);
}
void cuda_linear_force_prep_warp(int on) { g_force_prep_warp.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_prep_warp_launches() { return g_prep_warp_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_prep_threads(int threads) {
  DSV4_CHECK(threads == 0 || threads == 256 || threads == 512 || threads == 1024,
             "cuda_linear_force_prep_threads({}): expected 0, 256, 512 or 1024", threads);
  g_force_prep_threads.store(threads, std::memory_order_relaxed);
}
int64_t cuda_linear_quant8_launches() { return g_quant8_launches.load(std::memory_order_relaxed); }
void cuda_linear_force_quant8(int on) { g_force_quant8.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_cluster_fold_launches() { return g_cluster_fold_launches.load(std::memory_order_relaxed); }
int64_t cuda_linear_split_scale_group_launches() {
  return g_split_scale_group_launches.load(std::memory_order_relaxed);
}
void cuda_linear_force_split_scale_groups(int on) { g_force_split_scale_groups.store(on, std::memory_order_relaxed); }
int64_t cuda_linear_expert_early_weight_launches() {
  return g_expert_early_weight_launches.load(std::memory_order_relaxed);
}
void cuda_linear_force_expert_early_weights(int on) {
  g_force_expert_early_weights.store(on, std::memory_order_relaxed);
}
int64_t cuda_linear_expert_cluster_fold_launches() {
  return g_expert_cluster_fold_launches.load(std::memory_order_relaxed);
}
void cuda_linear_force_expert_cluster_fold(int on) {
  g_force_expert_cluster_fold.store(on, std::memory_order_relaxed);
}
void cuda_linear_force_cluster_fold(int on) { g_force_cluster_fold.store(on, std::memory_order_relaxed); }
void cuda_linear_force_fold_half_rows(int on) { g_force_fold_half_rows.store(on, std::memory_order_relaxed); }
void cuda_linear_force_last_cta_fold(int max_partials) {
  g_force_last_cta_fold.store(max_partials, std::memory_order_relaxed);
}

namespace {
__global__ void e4m3_cast_mismatch_kernel(unsigned long long* count, uint32_t* first) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (uint64_t(1) << 32);
       i += uint64_t(gridDim.x) * blockDim.x) {
    const float x = __uint_as_float(uint32_t(i));
    const float a[4] = {x, -x, x * 0.001953125f, x * 1.5f};  // each position, other values too
    const uint32_t hw = e4m3x4_sat(a[0], a[1], a[2], a[3]);
    bool same = true;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      same &= ((hw >> (8 * b)) & 0xffu) == core::float_to_e4m3(core::clamp_f32(a[b], -448.0f, 448.0f));
    if (!same && atomicAdd(count, 1ull) == 0) *first = uint32_t(i);
  }
}

// Every float x: core::float_to_bf16 (the hardware conversion on the GPU) and
// round_bf16 against the integer rounding, float_to_bf16_bits, bit for bit.
__global__ void bf16_cast_mismatch_kernel(unsigned long long* count, uint32_t* first) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (uint64_t(1) << 32);
       i += uint64_t(gridDim.x) * blockDim.x) {
    const float x = __uint_as_float(uint32_t(i));
    const uint16_t want = core::float_to_bf16_bits(x);
    const bool same = core::float_to_bf16(x) == want &&
                      __float_as_uint(core::round_bf16(x)) == uint32_t(want) << 16;
    if (!same && atomicAdd(count, 1ull) == 0) *first = uint32_t(i);
  }
}

// Every 32-bit word w: e4m3x4_has_nan(w) against a byte-by-byte test, and, where its
// low two codes are not NaN, e4m3x2_to_float2(w) against core::e4m3_to_float, bit for bit.
__global__ void e4m3_decode_mismatch_kernel(unsigned long long* count, uint32_t* first) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (uint64_t(1) << 32);
       i += uint64_t(gridDim.x) * blockDim.x) {
    const uint32_t w = uint32_t(i);
    bool nan_ref = false;
#pragma unroll
    for (int b = 0; b < 4; ++b) nan_ref |= ((w >> (8 * b)) & 0x7fu) == 0x7fu;
    bool same = e4m3x4_has_nan(w) == nan_ref;
    if ((w & 0x7fu) != 0x7fu && ((w >> 8) & 0x7fu) != 0x7fu) {
      const float2 v = e4m3x2_to_float2(w);
      same &= __float_as_uint(v.x) == __float_as_uint(core::e4m3_to_float(uint8_t(w))) &&
              __float_as_uint(v.y) == __float_as_uint(core::e4m3_to_float(uint8_t(w >> 8)));
    }
    if (!same && atomicAdd(count, 1ull) == 0) *first = w;
  }
}

// Every pair of e4m3 codes (the index, low code in the low byte): FP8-as-bf16's decode
// (lk::e4m3x2_to_bf16x2, the pair in either half of its word, the other half a
// different pair) against the bf16 of core::e4m3_to_float, bit for bit, where neither
// code is NaN (those read as +-480 there).
__global__ void e4m3_bf16_decode_mismatch_kernel(unsigned long long* count, uint32_t* first) {
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < 65536; i += stride) {
    const uint16_t pair = uint16_t(i);
    if ((pair & 0x7fu) == 0x7fu || ((pair >> 8) & 0x7fu) == 0x7fu) continue;
    const uint32_t other = uint32_t(uint16_t(pair * 40503u + 7919u));  // (a neighbour that is not the pair)
    const uint32_t got_lo = lk::e4m3x2_to_bf16x2<0x9180>(pair | other << 16);
    const uint32_t got_hi = lk::e4m3x2_to_bf16x2<0xB3A2>(other | uint32_t(pair) << 16);
    const uint32_t want = uint32_t(core::float_to_bf16_bits(core::e4m3_to_float(uint8_t(pair)))) |
                          uint32_t(core::float_to_bf16_bits(core::e4m3_to_float(uint8_t(pair >> 8)))) << 16;
    if ((got_lo != want || got_hi != want) && atomicAdd(count, 1ull) == 0) *first = pair;
  }
}
}  // namespace

int64_t cuda_e4m3_cast_mismatches(uint32_t* first) { return count_mismatches(e4m3_cast_mismatch_kernel, first); }
int64_t cuda_e4m3_decode_mismatches(uint32_t* first) { return count_mismatches(e4m3_decode_mismatch_kernel, first); }
int64_t cuda_bf16_cast_mismatches(uint32_t* first) { return count_mismatches(bf16_cast_mismatch_kernel, first); }
int64_t cuda_e4m3_bf16_decode_mismatches(uint32_t* first) {
  return count_mismatches(e4m3_bf16_decode_mismatch_kernel, first);
}

// ---- linear (spec §2.7, §2.8) ---------------------------------------------------------
void CudaBackend::do_linear(const Tensor& x, const QuantLinear& w, const Tensor& y) {
  const int64_t M = x.size(0), K = w.k;
  if (M == 0 || w.n == 0) return;
  if (K == 0) return fill_zero(y);
  const QuantizedRows a = linear_activation_scratch(*this, M, K);
  const bool split = fp4_gemm_path(w);
  quantize_rows(*this, x.as<uint16_t>(), K, M, K, a.codes, a.scales, split);
  quant_gemm(*this, w, a.codes, a.scales, M, y.as<uint16_t>(), w.n, split);
}

// ---- linear_pair: one quantization, one launch when both weights take the FP8 GEMM ----------
namespace {
bool pair_stacks_fp8(const QuantLinear& wa, const QuantLinear& wb) {
  const bool fp8 = wa.format == QuantLinear::Format::kFp8Block128 && wb.format == wa.format;
  return wa.n > 0 && gemm_pair_stacks(wa.n, wb.n) && !simple_path() && fp8 && quant_fast_ok(wa) &&
         quant_fast_ok(wb) && wa.n + wb.n < (int64_t(1) << 30);
}
}  // namespace

void CudaBackend::do_linear_pair(const Tensor& x, const QuantLinear& wa, const Tensor& ya, const QuantLinear& wb,
                                 const Tensor& yb) {
  const int64_t M = x.size(0), K = wa.k;
  if (M == 0 || !pair_stacks_fp8(wa, wb)) {
    Backend::do_linear_pair(x, wa, ya, wb, yb);
    return;
  }
  const QuantizedRows a = linear_activation_scratch(*this, M, K);
  quantize_rows(*this, x.as<uint16_t>(), K, M, K, a.codes, a.scales, false);
  linears_on_quantized_rows(*this, a, M, wa, ya, &wb, &yb);
}

// ---- linears on activations quantized elsewhere (quantized_linear.h) ---------------------
bool linears_take_quantized_rows(const QuantLinear& wa, const QuantLinear* wb) {
  if (wb) return pair_stacks_fp8(wa, *wb);
  return wa.format == QuantLinear::Format::kFp8Block128 && wa.k > 0 && !simple_path();
}

QuantizedRows linear_activation_scratch(CudaBackend& be, int64_t M, int64_t K) {
  return {scratch_as<uint8_t>(be, "xq", M * K), scratch_as<float>(be, "xs", M * (K / 128))};
}

void linears_on_quantized_rows(CudaBackend& be, const QuantizedRows& a, int64_t M, const QuantLinear& wa,
                               const Tensor& ya, const QuantLinear* wb, const Tensor* yb) {
  DSV4_CHECK(linears_take_quantized_rows(wa, wb), "linears_on_quantized_rows: weights off the element-order path");
  if (M == 0 || wa.n == 0) return;
  if (!wb) return quant_gemm(be, wa, a.codes, a.scales, M, ya.as<uint16_t>(), wa.n, false);
  run_gemm(be, WFmt::kFp8,
           stacked(quant_params(wa, a.codes, a.scales, M, ya.as<uint16_t>(), wa.n),
                   quant_params(*wb, a.codes, a.scales, M, yb->as<uint16_t>(), wb->n)));
}

// ---- linear_bf16 ------------------------------------------------------------------------
void CudaBackend::do_linear_bf16(const Tensor& x, const Tensor& w, const Tensor& y) {
  if (x.size(0) == 0 || w.size(0) == 0) return;
  if (w.size(1) == 0) return fill_zero(y);
  bf16_gemm(*this, x, w, y.data(), y.dtype() == DType::kF32);
}

void CudaBackend::do_linear_bf16_pair(const Tensor& x, const Tensor& wa, const Tensor& ya, const Tensor& wb,
                                      const Tensor& yb) {
  if (x.size(0) == 0) return;
  if (simple_path() || !bf16_fast_ok(x, wa) || !bf16_fast_ok(x, wb) || ya.dtype() != yb.dtype() ||
      !gemm_pair_stacks(wa.size(0), wb.size(0)) || wa.size(1) == 0 ||
      wa.size(0) + wb.size(0) >= (int64_t(1) << 30)) {
    Backend::do_linear_bf16_pair(x, wa, ya, wb, yb);
    return;
  }
  const bool f32 = ya.dtype() == DType::kF32;
  run_gemm(*this, WFmt::kBf16, stacked(bf16_params(x, wa, ya.data(), f32), bf16_params(x, wb, yb.data(), f32)));
}

// ---- grouped_linear (spec §5.6) -------------------------------------------------------
namespace {
// Fast path: 64-wide stages, each CTA's 128 rows inside one 128-row scale block.
bool grouped_fast_ok(const Tensor& x, const QuantLinear& w, int64_t groups) {
  const int64_t G = groups, R = w.n / groups, C = w.k;
  return !simple_path() && C % 64 == 0 && (G == 1 || R % 128 == 0) && (C + 127) / 128 <= lk::kMaxScaleBlocks &&
         w.n < (int64_t(1) << 30) && G * C < (int64_t(1) << 30) && aligned(x.data(), 16) &&
         aligned(w.weight.data(), 16);
}

lk::GemmParams grouped_params(const Tensor& x, const QuantLinear& w, int64_t groups, const Tensor& y) {
  const int64_t G = groups, R = w.n / groups, C = w.k;
  lk::GemmParams p{};
  p.w0 = p.w1 = w.weight.as<uint8_t>();
  p.s0 = p.s1 = w.scale.as<uint8_t>();
  p.w_row_bytes = C;
  p.s_row_stride = (C + 127) / 128;
  p.n = int(R);
  p.n_split = int(R);
  p.k = int(C);
  p.groups = int(G);
  p.a = x.as<uint8_t>();
  p.a_row_bytes = 2 * G * C;
  p.a_group_bytes = 2 * C;
  p.m = int(x.size(0));
  p.y = y.data();
  p.ldy = G * R;
  return p;
}

}  // namespace

void CudaBackend::do_grouped_linear(const Tensor& x, const QuantLinear& w, int64_t groups, const Tensor& y) {
  const int64_t M = x.size(0), G = groups, R = w.n / groups, C = w.k;
  if (M == 0 || w.n == 0) return;
  if (C == 0) return fill_zero(y);
  if (!grouped_fast_ok(x, w, groups)) {
    lk::simple_grouped_kernel<<<blocks_for_warps(M * w.n, kSimpleBlocks), 256, 0, stream()>>>(
        x.as<uint16_t>(), w.weight.as<uint8_t>(), w.scale.as<uint8_t>(), M, G, R, C, y.as<uint16_t>());
    check_launch(stream());
    return;
  }
  run_gemm(*this, WFmt::kFp8Bf16, grouped_params(x, w, groups, y));
}

// wo_a then wo_b: where the grouped GEMM's fold forms whole 128-column blocks of z's rows
// (its last CTAs at 1-16 rows on bench-1g, split_fold_kernel at 17-128), it writes z's
// FP8 codes for wb's GEMM as well: act_quant's launch leaves the layer's chain.
void CudaBackend::do_grouped_linear_linear(const Tensor& x, const QuantLinear& wa, int64_t groups, const Tensor& z,
                                           const QuantLinear& wb, const Tensor& y) {
  const int64_t M = x.size(0);
  // (Groups of whole 128-column tiles follow from the contract, wb.k = wa.n a multiple of
  // 128, and the fast path's R % 128 where G > 1; run_gemm checks it.)
  if (M == 0 || wa.n == 0 || wa.k == 0 || !fold_quant_enabled() || !grouped_fast_ok(x, wa, groups) ||
      !linears_take_quantized_rows(wb, nullptr) || !aligned(z.data(), 16)) {
    Backend::do_grouped_linear_linear(x, wa, groups, z, wb, y);
    return;
  }
  const QuantizedRows q = linear_activation_scratch(*this, M, wa.n);
  lk::GemmParams p = grouped_params(x, wa, groups, z);
  p.yq = q.codes;
  p.ys = q.scales;
  p.ldq = wa.n;
  if (!run_gemm(*this, WFmt::kFp8Bf16, p)) quantize_rows(*this, z.as<uint16_t>(), wa.n, M, wa.n, q.codes, q.scales, false);
  linears_on_quantized_rows(*this, q, M, wb, y, nullptr, nullptr);
}

// ---- expert_ffn: the shared expert (spec §6.2) -------------------------------------------
void CudaBackend::do_expert_ffn(const Tensor& x, const ExpertWeights& w, const Tensor& row_weight, float limit,
                                const Tensor& y) {
  const int64_t R = x.size(0), D = w.w1.k, I = w.w1.n;
  if (R == 0) return;
  DSV4_CHECK(D % 128 == 0 && I % 128 == 0 && D > 0 && I > 0,
             "expert_ffn: D={} and I={} must be positive multiples of 128 (activation blocks)", D, I);
  const float* rw = row_weight.ndim() > 0 ? row_weight.as<float>() : nullptr;
  uint8_t* xq = scratch_as<uint8_t>(*this, "ffn.xq", R * D);
  float* xs = scratch_as<float>(*this, "ffn.xs", R * (D / 128));
  uint16_t* gu = scratch_as<uint16_t>(*this, "ffn.gu", R * 2 * I);
  uint8_t* hq = scratch_as<uint8_t>(*this, "ffn.hq", R * I);
  float* hs = scratch_as<float>(*this, "ffn.hs", R * (I / 128));
  const bool fast = !simple_path() && quant_fast_ok(w.w1) && quant_fast_ok(w.w3) && quant_fast_ok(w.w2) &&
                    w.w1.format == w.w3.format && 2 * I < (int64_t(1) << 30);
  const bool split13 = fast && fp4_gemm_path(w.w1), split2 = fp4_gemm_path(w.w2);
  quantize_rows(*this, x.as<uint16_t>(), D, R, D, xq, xs, split13);
  if (!fast) {
    quant_gemm(*this, w.w1, xq, xs, R, gu, 2 * I, false);      // simple kernels when simple_path();
    quant_gemm(*this, w.w3, xq, xs, R, gu + I, 2 * I, false);  // else per-weight fallback
    uint16_t* h = scratch_as<uint16_t>(*this, "ffn.h", R * I);
    lk::simple_swiglu_kernel<<<unsigned(std::min<int64_t>((R * I + 255) / 256, kSimpleBlocks)), 256, 0, stream()>>>(
        gu, rw, R, I, limit, h);
    check_launch(stream());
    quantize_rows(*this, h, I, R, I, hq, hs, split2);
    quant_gemm(*this, w.w2, hq, hs, R, y.as<uint16_t>(), D, split2);
    return;
  }
  // gate | up as one GEMM over the stacked rows [w1; w3] (I % 128 == 0: a CTA reads one of them).
  lk::GemmParams p{};
  const bool fp4 = w.w1.format == QuantLinear::Format::kFp4Group32;
  p.w0 = w.w1.weight.as<uint8_t>();
  p.s0 = w.w1.scale.as<uint8_t>();
  p.w1 = w.w3.weight.as<uint8_t>();
  p.s1 = w.w3.scale.as<uint8_t>();
  p.w_row_bytes = fp4 ? D / 2 : D;
  p.s_row_stride = fp4 ? D / 32 : (D + 127) / 128;
  p.n = int(2 * I);
  p.n_split = int(I);
  p.k = int(D);
  p.groups = 1;
  p.a = xq;
  p.a_row_bytes = D;
  p.a_scale = xs;
  p.a_scale_stride = D / 128;
  p.m = int(R);
  p.y = gu;
  p.ldy = 2 * I;
  run_gemm(*this, quant_fmt(w.w1), p);
  swiglu_quantize(*this, gu, R, I, nullptr, rw, nullptr, limit, hq, hs, split2);
  quant_gemm(*this, w.w2, hq, hs, R, y.as<uint16_t>(), D, split2);
}

// ---- routed_experts (spec §6.2) ---------------------------------------------------------
void CudaBackend::do_routed_experts(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                    const std::vector<ExpertWeights>& experts, int64_t expert_begin,
                                    int64_t expert_end, float limit, const Tensor& out) {
  const int64_t R = x.size(0), D = x.size(1), k = ids.size(1), P = R * k;
  const int64_t num_local = expert_end - expert_begin;
  if (P == 0 || D == 0) return;
  if (num_local == 0) return fill_zero(out);
  const ExpertWeights& first = experts[size_t(expert_begin)];
  const int64_t I = first.w1.n;
  const auto fmt13 = first.w1.format, fmt2 = first.w2.format;
  for (int64_t e = expert_begin; e < expert_end; ++e) {
    const ExpertWeights& ew = experts[size_t(e)];
    DSV4_CHECK(ew.w1.n == I && ew.w3.n == I && ew.w1.k == D && ew.w3.k == D && ew.w2.n == D && ew.w2.k == I &&
                   ew.w1.format == fmt13 && ew.w3.format == fmt13 && ew.w2.format == fmt2,
               "routed_experts: expert {} differs in shape or format from expert {} (x has D={})", e, expert_begin,
               D);
  }
  DSV4_CHECK(D % 128 == 0 && I % 128 == 0 && I > 0, "routed_experts: D={} and I={} must be multiples of 128", D, I);
  DSV4_CHECK(P < (int64_t(1) << 30) && expert_end < (int64_t(1) << 30), "routed_experts: {} pairs too many", P);
  const int* id = ids.as<int32_t>();
  uint16_t* o = out.as<uint16_t>();
  const cudaStream_t s = stream();

  const int vec16 = (D % 8 == 0 && aligned(o, 16)) ? 1 : 0;
  uint8_t* xq = scratch_as<uint8_t>(*this, "moe.xq", R * D);
  float* xs = scratch_as<float>(*this, "moe.xs", R * (D / 128));
  uint8_t* hq = scratch_as<uint8_t>(*this, "moe.hq", P * I);
  float* hs = scratch_as<float>(*this, "moe.hs", P * (I / 128));
  const bool fp4_13 = fmt13 == QuantLinear::Format::kFp4Group32, fp4_2 = fmt2 == QuantLinear::Format::kFp4Group32;
  // Outputs of pairs routed to no local expert zeroed, x quantized (split pairs: the FP4 GEMM's layout).
  auto zero_nonlocal_and_quantize = [&](bool split_pairs) {
    lk::zero_nonlocal_kernel<<<blocks_for_warps(P, kSimpleBlocks), 256, 0, s>>>(id, P, int(expert_begin),
                                                                              int(expert_end), o, D, vec16);
    check_launch(s);
    quantize_rows(*this, x.as<uint16_t>(), D, R, D, xq, xs, split_pairs);
  };

  // Tile rows per expert from the average load (any choice gives the same bits).
  const int64_t avg = (P + num_local - 1) / num_local;
  const int nt = avg <= 8 ? 1 : avg <= 16 ? 2 : 4;
  // FP4 with 8-row tiles: 16-row tiles instead, each decoded once (shared_decode_wanted).
  const int row_groups = nt == 1 && fp4_13 && fp4_2 && shared_decode_wanted(avg) ? 2 : 1;
  const int64_t bm = 8 * nt * row_groups;
  const int64_t max_tiles = expert_max_tiles(P, num_local, bm);
  bool fast = !simple_path() && num_local <= 2048 && max_tiles <= 65535 && 2 * I < (int64_t(1) << 30);
  for (int64_t e = expert_begin; fast && e < expert_end; ++e) {
    const ExpertWeights& ew = experts[size_t(e)];
    fast = quant_fast_ok(ew.w1) && quant_fast_ok(ew.w3) && quant_fast_ok(ew.w2);
  }

  if (!fast) {
    zero_nonlocal_and_quantize(false);  // the simple kernels read element order
    // Simple: one warp per (pair, output); expert tables in chunks of global ids.
    uint16_t* h = scratch_as<uint16_t>(*this, "moe.h", P * I);
    auto table = std::make_unique<lk::ExpertTable>();
    for (int64_t c0 = expert_begin; c0 < expert_end; c0 += lk::kMaxTableExperts) {
      const int64_t c1 = std::min<int64_t>(expert_end, c0 + lk::kMaxTableExperts);
      std::memset(table.get(), 0, sizeof(lk::ExpertTable));
      for (int64_t e = c0; e < c1; ++e) {
        const ExpertWeights& ew = experts[size_t(e)];
        table->p[e - c0][0] = ew.w1.weight.as<uint8_t>();
        table->p[e - c0][1] = ew.w1.scale.as<uint8_t>();
        table->p[e - c0][2] = ew.w3.weight.as<uint8_t>();
        table->p[e - c0][3] = ew.w3.scale.as<uint8_t>();
      }
      lk::simple_expert_gateup_kernel<<<blocks_for_warps(P * I, kSimpleBlocks), 256, 0, s>>>(
          id, P, int(k), int(c0), int(c1), *table, fp4_13 ? 1 : 0, xq, xs, D, I, limit, weights.as<float>(), h);
      check_launch(s);
    }
    quantize_rows(*this, h, I, P, I, hq, hs, false);  // rows of non-local pairs are quantized too, and never read
    for (int64_t c0 = expert_begin; c0 < expert_end; c0 += lk::kMaxTableExperts) {
      const int64_t c1 = std::min<int64_t>(expert_end, c0 + lk::kMaxTableExperts);
      std::memset(table.get(), 0, sizeof(lk::ExpertTable));
      for (int64_t e = c0; e < c1; ++e) {
        table->p[e - c0][0] = experts[size_t(e)].w2.weight.as<uint8_t>();
        table->p[e - c0][1] = experts[size_t(e)].w2.scale.as<uint8_t>();
      }
      lk::simple_expert_down_kernel<<<blocks_for_warps(P * D, kSimpleBlocks), 256, 0, s>>>(
          id, P, int(c0), int(c1), *table, fp4_2 ? 1 : 0, hq, hs, I, D, o);
      check_launch(s);
    }
    return;
  }

  // Fast: device counting sort -> per-expert tiles -> gate/up GEMM -> SwiGLU+quant -> w2 GEMM.
  int* pair_list = scratch_as<int>(*this, "moe.pairs", P);
  int* token_rows = scratch_as<int>(*this, "moe.tokens", P);
  int4* tiles = scratch_as<int4>(*this, "moe.tiles", max_tiles);
  int* counts = scratch_as<int>(*this, "moe.counts", 2);  // {tiles, compact rows}
  uint16_t* gu = scratch_as<uint16_t>(*this, "moe.gu", P * 2 * I);
  // Up to 64 rows one launch (moe_prep_one_launch_rows): the tile list (block 0), x
  // quantized (split pairs for the FP4 GEMM), the non-local pairs' outputs zeroed.
  // Beyond, x quantized first, then the tile list in block 0 and the zeros in the other
  // blocks (prep_zeroes_nonlocal; or three launches). Same bits either way.
  const bool one_launch = R <= moe_prep_one_launch_rows(), zero_in_prep = !one_launch && prep_zeroes_nonlocal();
  if (zero_in_prep) quantize_rows(*this, x.as<uint16_t>(), D, R, D, xq, xs, fp4_13);
  else if (!one_launch) zero_nonlocal_and_quantize(fp4_13);
  lk::GemmParams p{};
  p.w_row_bytes = fp4_13 ? D / 2 : D;
  p.s_row_stride = fp4_13 ? D / 32 : (D + 127) / 128;
  p.n = int(2 * I);
  p.n_split = int(I);
  p.k = int(D);
  p.a = xq;
  p.a_row_bytes = D;
  p.a_scale = xs;
  p.a_scale_stride = D / 128;
  p.in_rows = token_rows;
  p.y = gu;
  p.ldy = 2 * I;
  p.tiles = tiles;
  p.num_tiles = counts;
  lk::GemmParams q{};
  q.w_row_bytes = fp4_2 ? I / 2 : I;
  q.s_row_stride = fp4_2 ? I / 32 : (I + 127) / 128;
  q.n = int(D);
  q.n_split = int(D);
  q.k = int(I);
  q.a = hq;
  q.a_row_bytes = I;
  q.a_scale = hs;
  q.a_scale_stride = I / 128;
  q.y = o;
  q.ldy = D;
  q.out_rows = pair_list;
  q.tiles = tiles;
  q.num_tiles = counts;
  auto gate_up_entries = [&](int64_t e, const uint8_t** ptr) {
    const ExpertWeights& ew = experts[size_t(expert_begin + e)];
    ptr[0] = ew.w1.weight.as<uint8_t>();
    ptr[1] = ew.w1.scale.as<uint8_t>();
    ptr[2] = ew.w3.weight.as<uint8_t>();
    ptr[3] = ew.w3.scale.as<uint8_t>();
  };
  auto down_entries = [&](int64_t e, const uint8_t** ptr) {
    const ExpertWeights& ew = experts[size_t(expert_begin + e)];
    ptr[0] = ptr[2] = ew.w2.weight.as<uint8_t>();
    ptr[1] = ptr[3] = ew.w2.scale.as<uint8_t>();
  };
  // The gate/up and down GEMMs as one launch where it applies (fused_experts_mode):
  // FP4 weights by TMA in 8-row tiles, both GEMMs walking 2+ K slices, one table, and
  // rows of h scales that are whole 32-byte sectors (I a multiple of 1024: the down tiles
  // read them through L1, which then never holds a row another tile writes later).
  lk::FusedExpertArgs f{};
  std::unique_ptr<lk::ExpertTable> gate_up_table, down_table;
  const int fused_mode = fused_experts_mode();
  // (The automatic rule's row bound is tested here first, so the tables below are built
  // only where fused_experts_auto can take the fused step.)
  bool fused = (fused_mode == 1 || (fused_mode == -1 && R <= kFusedExpertsAutoRows)) && fp4_13 && fp4_2 &&
               nt == 1 && row_groups == 1 && I % 1024 == 0 && num_local <= lk::kMaxTableExperts;
  if (fused) {
    f.gate_up = p;
    f.down = q;
    plan_expert_gemm(*this, f.gate_up, P, max_tiles);
    plan_expert_gemm(*this, f.down, P, max_tiles);
    gate_up_table = std::make_unique<lk::ExpertTable>();
    down_table = std::make_unique<lk::ExpertTable>();
    for (int64_t e = 0; e < num_local; ++e) {
      gate_up_entries(e, gate_up_table->p[e]);
      down_entries(e, down_table->p[e]);
    }
    fused = f.gate_up.split == 1 && f.gate_up.slices > 1 && f.down.split == 1 && f.down.slices > 1 &&
            expert_bulk_copies(f.gate_up, *gate_up_table, num_local) &&
            expert_bulk_copies(f.down, *down_table, num_local) &&
            (fused_mode == 1 ||
             fused_experts_auto(R, int64_t(f.gate_up.tiles_per_group) * max_tiles, fused_expert_slots(*this)));
  }
  // Where both GEMMs split their K slices over clusters of one size instead (1 row at
  // bench-1g), the split fused step (split_fused_experts_enabled) or else the two launches
  // chained by ready flags (ready_flag_experts_enabled), with the cluster launches' TMA
  // choice; only where the rule above built the tables, so DSV4_CUDA_FUSED_EXPERTS=0 turns
  // every fused form off.
  bool split_fused = false, ready_flags = false, split_tma = false;
  if (!fused && gate_up_table && (split_fused_experts_enabled() || ready_flag_experts_enabled())) {
    const int64_t S = f.gate_up.split;
    split_tma = expert_bulk_copies(f.gate_up, *gate_up_table, num_local) &&
                expert_bulk_copies(f.down, *down_table, num_local);
    const bool split_alike = S > 1 && f.down.split == S && expert_cluster_fold(*this, split_tma, S);
    split_fused = split_alike && split_fused_experts_enabled() && split_fused_clusters_fit(*this, split_tma, S);
    ready_flags = split_alike && !split_fused && ready_flag_experts_enabled() &&
                  ready_flag_clusters_fit(*this, split_tma, S);
  }
  // (FusedExpertArgs::sync)
  const int64_t fused_sync_ints = fused || split_fused || ready_flags ? 1 + 2 * max_tiles : 0;
  int* fused_sync = fused_sync_ints > 0 ? scratch_as<int>(*this, "moe.fused_sync", fused_sync_ints) : nullptr;
  const lk::MoePrepArgs prep{.ids = id, .num_pairs = int(P), .k = int(k), .expert_begin = int(expert_begin),
                             .num_local = int(num_local), .bm = int(bm), .max_tiles = int(max_tiles),
                             .pair_list = pair_list, .token_rows = token_rows, .tiles = tiles, .num_tiles = counts,
                             .num_rows = counts + 1, .x = x.as<uint16_t>(),
                             .rows = one_launch ? R : 0, .d = D, .q = xq, .scale = xs,
                             .split_pairs = fp4_13 ? 1 : 0, .out = o, .vec16 = vec16, .fused_sync = fused_sync,
                             .fused_sync_ints = int(fused_sync_ints),
                             .warp_list = P <= lk::kExpertPrepWarpPairs && moe_prep_warp_enabled() ? 1 : 0};
  const int64_t warp_items = (one_launch ? R * (D / 128) : 0) + P;  // (moe_prep_kernel's items: quantization, zeros)
  const int prep_threads = moe_prep_threads(), prep_warps = prep_threads / 32;
  const unsigned extra_blocks = one_launch || zero_in_prep
                                    ? unsigned(std::clamp<int64_t>((warp_items + prep_warps - 1) / prep_warps, 1, 1024))
                                    : 0;
  lk::moe_prep_kernel<<<1 + extra_blocks, unsigned(prep_threads), size_t(16 * num_local), s>>>(prep);
  check_launch(s);
  if (prep.warp_list) g_prep_warp_launches.fetch_add(1, std::memory_order_relaxed);

  if (fused || split_fused || ready_flags) {
    f.gate_up.chunk_end = f.down.chunk_end = int(num_local);
    f.gate_up_tiles = f.gate_up.tiles_per_group;
    f.down_tiles = f.down.tiles_per_group;
    f.max_tiles = int(max_tiles);
    f.sync = fused_sync;
    f.inter = I;
    f.rw = weights.as<float>();
    f.rw_index = pair_list;
    f.limit = limit;
    f.hq = hq;
    f.hs = hs;
    f.split_pairs = 1;
    const int64_t items = int64_t(f.gate_up_tiles + f.down_tiles) * max_tiles;  // (a CTA or a cluster each)
    DSV4_CHECK(items * f.gate_up.split < (int64_t(1) << 31), "routed_experts: {} fused expert items too many", items);
    if (split_fused || ready_flags) {
      // As run_expert_gemm sets them for the split cluster launches: whole scale groups a
      // slice where enabled; the down items' first weight stages before their wait, which
      // here is their list tile's ready flag (the kernel needs that wait: it reads h after it).
      for (lk::GemmParams* g : {&f.gate_up, &f.down}) set_split_scale_groups(*g, split_scale_groups_enabled());
      f.gate_up.weights_before_wait = 0;
      // (the ready-flag down launch may take its weights after its flag instead: the early
      // weights' switch, for A/B runs)
      f.down.weights_before_wait = split_fused || expert_early_weights(*this, 0) ? 1 : 0;
      g_expert_cluster_fold_launches.fetch_add(2, std::memory_order_relaxed);
      if (split_tma) g_tma_launches.fetch_add(2, std::memory_order_relaxed);
      if (ready_flags) {
        if (split_tma) launch_ready_flag_experts<true>(*this, f, *gate_up_table, *down_table);
        else launch_ready_flag_experts<false>(*this, f, *gate_up_table, *down_table);
        g_ready_flag_expert_launches.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      if (split_tma) launch_split_fused_experts<true>(*this, f, *gate_up_table, *down_table, items);
      else launch_split_fused_experts<false>(*this, f, *gate_up_table, *down_table, items);
      g_split_fused_expert_launches.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    launch_fused_experts(*this, f, *gate_up_table, *down_table, items);
    g_fused_expert_launches.fetch_add(1, std::memory_order_relaxed);
    g_tma_launches.fetch_add(2, std::memory_order_relaxed);
    return;
  }

  run_expert_gemm(*this, fp4_13 ? WFmt::kFp4 : WFmt::kFp8, p, num_local, P, max_tiles, nt, row_groups,
                  gate_up_entries);

  const unsigned swiglu_blocks =
      swiglu_quantize(*this, gu, P, I, counts + 1, weights.as<float>(), pair_list, limit, hq, hs, fp4_2);

  // The down GEMM's tile list comes from moe_prep, two launches back: its first weight
  // stages go out before its wait for SwiGLU (GemmParams::weights_before_wait). This holds
  // while every kernel waits for its predecessor before it releases its dependents
  // (grid_dependency.cuh), so that SwiGLU's release follows the gate/up GEMM's end.
  q.weights_before_wait = expert_early_weights(*this, swiglu_blocks) ? 1 : 0;
  run_expert_gemm(*this, fp4_2 ? WFmt::kFp4 : WFmt::kFp8, q, num_local, P, max_tiles, nt, row_groups,
                  down_entries);
}

// ---- router (spec §6.1) ----------------------------------------------------------------
// The router's GEMM and select as one launch (router_gemm_select_kernel) where run_gemm
// would split the K slices over CTAs of 8- or 16-row tiles and leave or fold the partials:
// the same slices in the same order, folded by the select's code, so the same bits as
// the two launches. False (nothing launched) where it does not apply.
template <int NT>
void launch_router_gemm_select(CudaBackend& be, const lk::GemmParams& p, const lk::RouterSelectArgs& r, dim3 grid) {
  constexpr int smem = lk::gemm_smem_bytes<WFmt::kBf16, NT>();
  static std::atomic<uint64_t> done{0};
  allow_smem(lk::router_gemm_select_kernel<NT>, smem, be.device_index(), done);
  lk::router_gemm_select_kernel<NT><<<grid, lk::kThreads, smem, be.stream()>>>(p, r);
  check_launch(be.stream());
}

bool router_gemm_select(CudaBackend& be, lk::GemmParams p, lk::RouterSelectArgs r) {
  if (p.m > router_one_launch_rows()) return false;
  const int64_t stages = p.k / 64, cols = p.n;
  p.tiles_per_group = (p.n + lk::kTileN - 1) / lk::kTileN;
  const int64_t n_tiles = p.tiles_per_group;
  p.slices = gemm_slices(n_tiles, stages, 1, false);
  const int nt = nt_for_rows(p.m);
  if (p.groups != 1 || nt > 2 || wide_gemm_rows(be, WFmt::kBf16, p, n_tiles) > 0) return false;
  // run_gemm's split rule (one row tile here), and the select's shared memory inside the GEMM's.
  const int64_t select_bytes = (3 * int64_t(r.num_experts) + 2 * r.k) * int64_t(sizeof(float));
  const int64_t smem = nt == 1 ? lk::gemm_smem_bytes<WFmt::kBf16, 1>() : lk::gemm_smem_bytes<WFmt::kBf16, 2>();
  if (p.slices < 2 || n_tiles >= be.properties().multiProcessorCount ||
      int64_t(p.slices) * p.m * cols * 4 > kMaxPartialBytes || select_bytes > smem)
    return false;
  p.split = p.slices;
  bind_split(be, p, p.m, cols, n_tiles, /*last_cta_fold=*/false);
  bool fresh = false;
  r.sync = static_cast<int*>(scratch_on(be, "router.sync", 2 * sizeof(int), &fresh));
  if (fresh) DSV4_CUDA_CHECK(cudaMemsetAsync(r.sync, 0, 2 * sizeof(int), be.stream()));
  const dim3 grid(unsigned(n_tiles), 1u, unsigned(p.split));
  if (nt == 1) launch_router_gemm_select<1>(be, p, r, grid);
  else launch_router_gemm_select<2>(be, p, r, grid);
  g_router_one_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void CudaBackend::do_router(const Tensor& x, const Tensor& gate, const Tensor& bias, const Tensor& tid2eid,
                            const BatchView& batch, const RouterConfig& config, const Tensor& weights,
                            const Tensor& ids) {
  const int64_t T = x.size(0), E = gate.size(0), k = config.topk;
  if (T == 0) return;
  DSV4_CHECK((3 * E + 2 * k) * int64_t(sizeof(float)) <= 48 * 1024,
             "router: {} experts and top-{} exceed the 48 KB of shared memory the select kernel holds them in", E, k);
  const bool hash = tid2eid.ndim() > 0;
  const int scoring = config.scoring == ScoringFunc::kSqrtSoftplus ? 0 : config.scoring == ScoringFunc::kSigmoid ? 1 : 2;
  const int rank_mode = router_rank_mode();  // (the one launch folds: the rounds unless forced)
  const lk::RouterSelectArgs select_args{.sync = nullptr, .num_experts = int(E), .k = int(k), .scoring = scoring,
                                         .normalize = config.normalize ? 1 : 0, .route_scale = config.route_scale,
                                         .bias = hash ? nullptr : bias.as<float>(),
                                         .tid2eid = hash ? tid2eid.as<int64_t>() : nullptr,
                                         .token_ids = batch.token_ids, .positions = batch.positions,
                                         .weights = weights.as<float>(), .ids = ids.as<int32_t>(),
                                         .by_rank = rank_mode == 1 ? 1 : 0};
  if (gate.size(1) > 0 && !simple_path() && bf16_fast_ok(x, gate) &&
      router_gemm_select(*this, bf16_params(x, gate, nullptr, true), select_args))
    return;
  float* logits = scratch_as<float>(*this, "router.logits", T * E);
  LeftPartials left;
  if (gate.size(1) == 0) DSV4_CUDA_CHECK(cudaMemsetAsync(logits, 0, size_t(T * E) * sizeof(float), stream()));
  else if (router_fold_enabled() && !simple_path() && bf16_fast_ok(x, gate))
    run_gemm(*this, WFmt::kBf16, bf16_params(x, gate, logits, true), &left);
  else bf16_gemm(*this, x, gate, logits, true);
  if (left.split > 0) g_router_folds.fetch_add(1, std::memory_order_relaxed);
  const bool by_rank = rank_mode == 1 || (rank_mode < 0 && left.split == 0);
  const unsigned threads =
      left.split > 0 || by_rank ? unsigned(std::clamp<int64_t>((E + 31) / 32 * 32, 32, 256)) : 32u;
  const auto select = router_early() ? lk::router_select_kernel<true> : lk::router_select_kernel<false>;
  select<<<unsigned(T), threads, size_t(3 * E + 2 * k) * sizeof(float), stream()>>>(
      left.split > 0 ? left.partial : logits, left.split, left.rows, int(E), int(k), scoring,
      config.normalize ? 1 : 0, config.route_scale,
      hash ? nullptr : bias.as<float>(), hash ? tid2eid.as<int64_t>() : nullptr, batch.token_ids, batch.positions,
      weights.as<float>(), ids.as<int32_t>(), by_rank ? 1 : 0);
  check_launch(stream());
}

}  // namespace dsv4::ops
