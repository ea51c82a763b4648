// CUDA attention family (spec §5.2-§5.8): compress, indexer_q, indexer_topk,
// sparse_attention, window_commit. Design, roofline arithmetic and register
// counts: docs/design/cuda-attention.md.
//
// Cached rows are the lossless records of ops/kv_format.h: a KV row is e4m3 nope
// values + bf16 rope values + one UE8M0 byte per 64 nope values (584 B at
// Dh = 512), an indexer row packed e2m1 + one UE8M0 byte per 32 (68 B at Di = 128).
// Encoders take the block exponent of ref::fp8_block_exponent / fp4_block_exponent
// from the values they are given (pre-simulation values in the compressor, which
// reproduces the reference's simulation exactly; already simulated bf16 values in
// window_commit, where the recomputed exponent can be one smaller than the one
// the simulation used, e.g. when a block's amax rounded down to 224 * 2^e, and the
// codes then are the simulated codes times 2: the decoded values are identical).
//
// Two implementations of attention, indexer scoring/top-k and the compressor:
//   fast    (default) tensor-core (mma.sync bf16) attention and indexer scoring,
//           a closed-form parallel compressor, a radix-select top-k;
//   simple  (DSV4_CUDA_KERNELS=simple, read once) scalar kernels that follow the
//           CPU reference loop by loop (same key order, same fp32 summation order
//           where it is reproducible), a token-by-token compressor state machine,
//           and a CUB segmented radix sort for the top-k.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include <cub/device/device_segmented_radix_sort.cuh>

#include "core/dtype.h"
#include "core/scalar_math.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_hooks.h"
#include "ops/cuda/attention_split.h"
#include "ops/cuda/block_sum.cuh"
#include "ops/cuda/cluster.cuh"
#include "ops/cuda/compress_emit_plan.h"
#include "ops/cuda/cta_probe.cuh"
#include "ops/cuda/e2m1_bf16.h"
#include "ops/cuda/e4m3_cast.cuh"
#include "ops/cuda/grid_dependency.cuh"
#include "ops/cuda/mismatch_count.cuh"
#include "ops/cuda/wgmma.cuh"
#include "ops/attention_order.h"
#include "ops/kv_format.h"

namespace dsv4::ops {

using core::Tensor;

namespace {

// ---- kernel selection ---------------------------------------------------------
std::atomic<int> g_kernel_mode{-1};  // -1 unread, 0 fast, 1 simple

bool use_simple_kernels() {
  int mode = g_kernel_mode.load(std::memory_order_relaxed);
  if (mode < 0) {
    int want = env_is("DSV4_CUDA_KERNELS", "simple") ? 1 : 0;
    int expected = -1;
    g_kernel_mode.compare_exchange_strong(expected, want);
    mode = g_kernel_mode.load();
  }
  return mode == 1;
}

}  // namespace

// Test hook (tests/ops/cuda_attention_test.cpp declares it): selects the simple
// (true) or fast (false) kernels of this file, overriding DSV4_CUDA_KERNELS.
void cuda_attention_use_simple_kernels(bool simple) { g_kernel_mode.store(simple ? 1 : 0); }

namespace {
std::atomic<bool> g_split_disabled{false};
bool attention_split_disabled() { return g_split_disabled.load(std::memory_order_relaxed); }
}  // namespace

// Test hook: false keeps every row of the fast sparse attention in one CTA, so a
// test can check that spreading a row's key segments over CTAs changes no bit.
void cuda_attention_split_keys(bool enabled) { g_split_disabled.store(!enabled); }

namespace {
std::atomic<int> g_wgmma_forced{-1};
std::atomic<int64_t> g_wgmma_launches{0};
std::atomic<int64_t> g_wgmma_split_launches{0};
// The wgmma sparse attention (Dh 512, 64 heads): on unless DSV4_CUDA_ATTN_WGMMA=0 or a
// test forces it off (faster than attention_mma_kernel at 4 to 256 rows of bench-1g,
// nineteenth session, docs/BENCHMARKS.md).
bool attention_wgmma_wanted() {
  const int f = g_wgmma_forced.load(std::memory_order_relaxed);
  return f >= 0 ? f == 1 : !env_is("DSV4_CUDA_ATTN_WGMMA", "0");
}
// Its launches that spread rows over CTAs (few rows): on unless DSV4_CUDA_ATTN_WGMMA_SPLIT=0.
bool attention_wgmma_split_wanted() { return !env_is("DSV4_CUDA_ATTN_WGMMA_SPLIT", "0"); }

// The wgmma kernel's pair form (a row's dims over a cluster of two CTAs) for a launch of
// T rows: DSV4_CUDA_ATTN_PAIR=auto (the default: where attention_pair_pays, ops/cuda/
// attention_split.h, passed as `pays`), off, all, N (1 to N rows) or A-B (A to B rows) for
// A/B runs; a test hook may force it on (1) or off (0) for every T. The same bits either way.
std::atomic<int> g_forced_pair{-1};
std::atomic<int64_t> g_wgmma_pair_launches{0};
bool attention_pair_wanted(int64_t T, bool pays) {
  const int forced = g_forced_pair.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  struct Rows {
    int64_t lo, hi;  // hi < 0: auto
  };
  static const Rows rows = [] {
    const char* v = std::getenv("DSV4_CUDA_ATTN_PAIR");
    const std::string s = v != nullptr ? v : "auto";
    if (s == "off") return Rows{1, 0};
    if (s == "auto" || s.empty()) return Rows{1, -1};
    if (s == "all") return Rows{1, INT64_MAX};
    long long lo = 1, hi = 0;
    char tail = 0;
    const bool range = std::sscanf(s.c_str(), "%lld-%lld%c", &lo, &hi, &tail) == 2;
    const bool one = !range && std::sscanf(s.c_str(), "%lld%c", &hi, &tail) == 1;
    DSV4_CHECK((range || one) && lo >= 1 && hi >= lo,
               "DSV4_CUDA_ATTN_PAIR: expected off, auto, all, N or A-B (rows, 1 <= A <= B), got '{}'", s);
    return Rows{range ? lo : 1, hi};
  }();
  if (rows.hi < 0) return pays;
  return T >= rows.lo && T <= rows.hi;
}

// attention_split_ctas (ops/cuda/attention_split.h), or n = min(N, segs) under
// DSV4_CUDA_ATTN_SPLIT_CTAS=N (A/B runs) or a test's cuda_attention_force_split_ctas(N).
std::atomic<int> g_forced_split_ctas{0};
int split_ctas(int64_t row_ctas, int64_t segs, int num_sms) {
  static const int from_env = int(env_integer("DSV4_CUDA_ATTN_SPLIT_CTAS", 0, 0, 1024));
  const int test_forced = g_forced_split_ctas.load(std::memory_order_relaxed);
  const int forced = test_forced > 0 ? test_forced : from_env;
  if (forced > 0) return int(std::min<int64_t>(forced, segs));
  return attention_split_ctas(row_ctas, segs, num_sms);
}

// The attention kernels' early form (their kEarly): DSV4_CUDA_ATTN_EARLY=0 keeps the
// late one (A/B runs); a test hook may force either. The same bits.
std::atomic<int> g_forced_attn_early{-1};
bool attention_early() {
  static const bool from_env = !env_is("DSV4_CUDA_ATTN_EARLY", "0");
  const int forced = g_forced_attn_early.load(std::memory_order_relaxed);
  return forced >= 0 ? forced == 1 : from_env;
}

// The wgmma kernel's register fold (its kFoldRegs) for one CTA a row:
// on by default, DSV4_CUDA_ATTN_FOLD_REGS=0 keeps the fold in local memory (A/B runs; on an
// H100 the register fold measured -1.3 to -1.4% a step at 256 rows, -0.5 to -0.6% at 128,
// docs/BENCHMARKS.md, hundred-fifth session); a test hook may force it on (1) or off (0).
// The same bits.
std::atomic<int> g_forced_fold_regs{-1};
std::atomic<int64_t> g_wgmma_fold_regs_launches{0};
bool attention_fold_regs() {
  static const bool from_env = !env_is("DSV4_CUDA_ATTN_FOLD_REGS", "0");
  const int forced = g_forced_fold_regs.load(std::memory_order_relaxed);
  return forced >= 0 ? forced == 1 : from_env;
}

// DSV4_CUDA_ATTN_SPLIT_ZERO_FOLD=1: the wgmma split's CTAs that leave a partial a
// segment zero their fold state all the same, as before the fortieth session (A/B runs).
bool split_zero_fold() {
  static const bool on = env_is("DSV4_CUDA_ATTN_SPLIT_ZERO_FOLD", "1");
  return on;
}

// The most partial bytes a split launch may write (and its combine read): 64 MiB, or
// DSV4_CUDA_ATTN_SPLIT_MAX_MB=N (A/B runs). A partial a segment, bench-1g's CSA rows
// exceeded it from 49 rows (80 MiB at 64), and raising it gained nothing: at 64 rows
// the split launch took 67 µs instead of 109 but its combine 30 (ncu), and at 96 the
// step lost 2% (docs/BENCHMARKS.md, twenty-seventh session). The wgmma kernel's lead
// fold halves those partials (40 MiB at 64 rows).
size_t split_max_partial_bytes() {
  static const size_t bytes = size_t(env_integer("DSV4_CUDA_ATTN_SPLIT_MAX_MB", 64, 1, int64_t(1) << 20)) << 20;
  return bytes;
}

// Where the wgmma kernel's split takes the lead fold: only splits over two CTAs (the
// default, DSV4_CUDA_ATTN_LEAD_FOLD=2), every split (=all) or none (=off, a partial a
// segment). On bench-1g, H200 (docs/BENCHMARKS.md, twenty-seventh session): against
// none, every split -0.6% a step at 64 rows (2 CTAs) but +0.3% at 16 and +0.2% at 32
// (5 and 4 CTAs, where the lead CTA's register fold is no cheaper than a store); 2 keeps
// the gain at 64 alone.
std::atomic<int> g_forced_lead_fold{-1};
bool lead_fold_wanted(int nsplit) {
  const int forced = g_forced_lead_fold.load(std::memory_order_relaxed);
  if (forced >= 0) return forced == 1;
  enum class LeadFold { kTwoCtas, kAll, kOff };
  static const LeadFold mode = [] {
    const char* v = std::getenv("DSV4_CUDA_ATTN_LEAD_FOLD");
    if (v == nullptr || *v == '\0' || std::string(v) == "2") return LeadFold::kTwoCtas;
    if (std::string(v) == "all") return LeadFold::kAll;
    DSV4_CHECK(std::string(v) == "off", "DSV4_CUDA_ATTN_LEAD_FOLD: expected all, 2 or off, got '{}'", v);
    return LeadFold::kOff;
  }();
  return mode == LeadFold::kAll || (mode == LeadFold::kTwoCtas && nsplit == 2);
}
}  // namespace

// Test hooks: -1 follows DSV4_CUDA_ATTN_WGMMA (default on), 0 / 1 force the wgmma sparse attention
// off / on; its launches so far, and those of them that split rows over CTAs; n > 0 splits a
// row over min(n, segments) CTAs where a split is taken (0: the cost model's choice).
void cuda_attention_force_split_ctas(int n) { g_forced_split_ctas.store(std::max(n, 0)); }
// Test hook: -1 follows DSV4_CUDA_ATTN_LEAD_FOLD, 0 / 1 force the wgmma split's lead fold off / on.
void cuda_attention_force_lead_fold(int mode) { g_forced_lead_fold.store(mode); }
void cuda_attention_force_early(int mode) { g_forced_attn_early.store(mode); }
// Test hook: -1 follows DSV4_CUDA_ATTN_FOLD_REGS, 0 / 1 force the register fold off / on; its launches so far.
void cuda_attention_force_fold_regs(int mode) { g_forced_fold_regs.store(mode); }
int64_t cuda_attention_wgmma_fold_regs_launches() { return g_wgmma_fold_regs_launches.load(); }
void cuda_attention_use_wgmma(int mode) { g_wgmma_forced.store(mode); }
// Test hook: -1 follows DSV4_CUDA_ATTN_PAIR, 0 / 1 force the wgmma kernel's pair form off / on;
// its launches so far.
void cuda_attention_force_pair(int mode) { g_forced_pair.store(mode); }
int64_t cuda_attention_wgmma_pair_launches() { return g_wgmma_pair_launches.load(); }
int64_t cuda_attention_wgmma_launches() { return g_wgmma_launches.load(); }
int64_t cuda_attention_wgmma_split_launches() { return g_wgmma_split_launches.load(); }

namespace {

// ---- shared helpers ------------------------------------------------------------
constexpr int kRope = int(kFp8KvRopeDim);  // rope dims of a cached KV record (the CUDA caches are allocated with it)
constexpr float kFp8MaxInv = 1.0f / 448.0f;
constexpr float kFp4MaxInv = 1.0f / 6.0f;
constexpr float kFp4AmaxFloor = 6.0f * 1.1754943508222875e-38f;  // 6 * 2^-126, as ref::fp4_block_exponent
constexpr unsigned kFull = 0xffffffffu;


template <typename K>
void allow_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

__device__ __forceinline__ float bf2f(uint16_t h) { return core::bf16_to_float(h); }
__device__ __forceinline__ uint16_t f2bf(float x) { return core::float_to_bf16(x); }
__device__ __forceinline__ float round_bf(float x) { return core::round_bf16(x); }
// The reference's exp (core::exp_f32_via_f64).
__device__ __forceinline__ float exp_ref(float x) { return core::exp_f32_via_f64(x); }

__device__ __forceinline__ void rope_cos_sin(int64_t pos, float inv_freq, float* c, float* s) {
  const float angle = __fmul_rn(float(pos), inv_freq);
  *c = float(cos(double(angle)));
  *s = float(sin(double(angle)));
}
// RoPE of one pair of bf16-valued floats (spec §2.3); results rounded to bf16.
__device__ __forceinline__ void rope_pair_f(float* a, float* b, float c, float s) {
  const float x = *a, y = *b;
  *a = round_bf(__fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s)));
  *b = round_bf(__fadd_rn(__fmul_rn(x, s), __fmul_rn(y, c)));
}

// core::e2m1_to_float without its lookup table (a run-time index into a local
// array would live in local memory): magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6.
__device__ __forceinline__ float e2m1_value(uint32_t nibble) {
  const uint32_t m = nibble & 7u, e = m >> 1, frac = m & 1u;
  const float mag = e == 0 ? 0.5f * float(frac) : (1.0f + 0.5f * float(frac)) * core::pow2_float(int(e) - 1);
  return (nibble & 8u) ? -mag : mag;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// ---- record codecs -------------------------------------------------------------
// KV record (kv_format.h) of one row from its values v[0, Dh) (fp32 holding the
// values to store; the rope part must be bf16-exact). One warp.
__device__ void warp_encode_kv_record(const float* v, int Dh, int row_bytes, uint8_t* dst) {
  const int lane = threadIdx.x & 31, nope = Dh - kRope, scale_off = nope + 2 * kRope;
  for (int b = 0; b < nope / 64; ++b) {
    const float x0 = v[b * 64 + 2 * lane], x1 = v[b * 64 + 2 * lane + 1];
    const float amax = warp_max(fmaxf(fabsf(x0), fabsf(x1)));
    const int e = core::ceil_log2_bits(__fmul_rn(fmaxf(amax, 1e-4f), kFp8MaxInv));
    const float inv = core::pow2_float(-e);
    // Clamped first as std::clamp (a NaN stays NaN), then the hardware cast: the reference cast's bits.
    const uint32_t codes = e4m3x2_sat(core::clamp_f32(__fmul_rn(x0, inv), -448.0f, 448.0f),
                                      core::clamp_f32(__fmul_rn(x1, inv), -448.0f, 448.0f));
    *reinterpret_cast<uint16_t*>(dst + b * 64 + 2 * lane) = uint16_t(codes);
    if (lane == 0) dst[scale_off + b] = core::e8m0_from_exponent(e);
  }
  for (int i = lane; i < kRope / 2; i += 32) {
    const uint32_t pair = uint32_t(f2bf(v[nope + 2 * i])) | (uint32_t(f2bf(v[nope + 2 * i + 1])) << 16);
    *reinterpret_cast<uint32_t*>(dst + nope + 4 * i) = pair;
  }
  for (int i = scale_off + nope / 64 + lane; i < row_bytes; i += 32) dst[i] = 0;
}

// Indexer K record from its (post-Hadamard, bf16-exact) values v[0, Di). One warp.
__device__ void warp_encode_index_record(const float* v, int Di, uint8_t* dst) {
  const int lane = threadIdx.x & 31;
  for (int b = 0; b < Di / 32; ++b) {
    const float x = v[b * 32 + lane];
    const float amax = warp_max(fabsf(x));
    const int e = core::ceil_log2_bits(__fmul_rn(fmaxf(amax, kFp4AmaxFloor), kFp4MaxInv));
    const float inv = core::pow2_float(-e);
    const uint8_t code = core::float_to_e2m1(core::clamp_f32(__fmul_rn(x, inv), -6.0f, 6.0f));
    const uint8_t hi = uint8_t(__shfl_down_sync(kFull, uint32_t(code), 1));
    if ((lane & 1) == 0) dst[(b * 32 + lane) / 2] = uint8_t(code | (hi << 4));  // low nibble = even element
    if (lane == 0) dst[Di / 2 + b] = core::e8m0_from_exponent(e);
  }
}

// Element i of a KV record as fp32 (exact: e4m3 * 2^e, or the bf16 rope value).
__device__ __forceinline__ float kv_record_value(const uint8_t* rec, int Dh, int i) {
  const int nope = Dh - kRope;
  if (i < nope) return __fmul_rn(core::e4m3_to_float(rec[i]), core::e8m0_to_float(rec[nope + 2 * kRope + i / 64]));
  return bf2f(*reinterpret_cast<const uint16_t*>(rec + nope + 2 * (i - nope)));
}

// Element i of an indexer record as fp32 (exact).
__device__ __forceinline__ float index_record_value(const uint8_t* rec, int Di, int i) {
  const uint8_t byte = rec[i / 2];
  const uint8_t nib = (i & 1) ? uint8_t(byte >> 4) : uint8_t(byte & 15);
  return __fmul_rn(e2m1_value(nib), core::e8m0_to_float(rec[Di / 2 + i / 32]));
}

// Compressed row j of sequence s: its record, or null where the block table has
// no valid page for it (the CPU reference throws there).
__device__ __forceinline__ const uint8_t* paged_record(const uint8_t* rows, int64_t num_pages, int64_t per_page,
                                                       int64_t row_bytes, const int32_t* block_table,
                                                       int32_t max_blocks, int32_t s, int64_t j) {
  if (j < 0) return nullptr;
  const int64_t blk = j / per_page;
  if (blk >= max_blocks) return nullptr;
  const int32_t page = block_table[int64_t(s) * max_blocks + blk];
  if (page < 0 || page >= num_pages) return nullptr;
  return rows + (int64_t(page) * per_page + j % per_page) * row_bytes;
}

// ---- inline PTX ----------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// D = A(16x16 bf16, row) * B(16x8 bf16, col) + D, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
// Two fp32 -> one register of two bf16 (low half = lo, the lower column).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return uint32_t(f2bf(lo)) | (uint32_t(f2bf(hi)) << 16);
}

// ================================================================================
// window_commit: the last min(W, len) rows of each sequence into its ring.
// One warp per token row (rows not among the last W of their sequence exit).
// Roofline: T*Dh*2 bytes read, <= T*584 written; launch-bound at decode.
// ================================================================================
struct WindowCommitArgs {
  const uint16_t* kv;
  const int32_t *token_seq, *seq_begin, *seq_len, *seq_start_pos, *seq_slot;
  uint8_t* window;
  int64_t T, W, Dh, row_bytes;
};

__global__ void window_commit_kernel(WindowCommitArgs a) {
  wait_for_predecessor();
  extern __shared__ float wc_buf[];  // [warps][Dh]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = blockIdx.x * int64_t(blockDim.x >> 5) + warp;
  if (t >= a.T) return;
  const int32_t s = a.token_seq[t];
  if (s < 0) return;
  const int64_t i = t - a.seq_begin[s], len = a.seq_len[s];
  if (i < 0 || i >= len || i < len - a.W) return;
  const int64_t pos = int64_t(a.seq_start_pos[s]) + i;
  float* v = wc_buf + warp * a.Dh;
  for (int64_t k = lane; k < a.Dh; k += 32) v[k] = bf2f(a.kv[t * a.Dh + k]);
  __syncwarp();
  uint8_t* dst = a.window + (int64_t(a.seq_slot[s]) * a.W + pos % a.W) * a.row_bytes;
  warp_encode_kv_record(v, int(a.Dh), int(a.row_bytes), dst);
}

// ================================================================================
// indexer_q: RoPE of the last rd dims, Hadamard, FP4 simulation, per (token, head).
// One warp per head; lane l owns values [l*EPL, (l+1)*EPL). The Hadamard runs in
// double in the reference's butterfly order (exact for bf16 inputs).
// Roofline: 2*T*Hi*Di*2 bytes (4 MB at T = 256): bandwidth-bound.
// ================================================================================
template <int EPL>
__global__ void indexer_q_kernel(uint16_t* __restrict__ q, int64_t rows /* T*Hi */, int64_t Hi,
                                 const int32_t* __restrict__ positions, const float* __restrict__ inv_freq, int rd) {
  constexpr int Di = 32 * EPL;
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps exit together
  // This lane's RoPE angles before the dependency wait: they depend only on the
  // position (step metadata uploaded before the step) and inv_freq (a weight), which
  // no kernel writes, so their double-precision cos and sin run under the
  // predecessor's tail (the GEMM of the wq_b / index_wq_b pair releases this launch
  // after its main loop).
  const int32_t pos = positions[row / Hi];
  float rc[EPL / 2], rs[EPL / 2];
#pragma unroll
  for (int k = 0; k < EPL; k += 2) {
    const int d = lane * EPL + k;
    rc[k / 2] = 1.0f, rs[k / 2] = 0.0f;
    if (pos >= 0 && d >= Di - rd) rope_cos_sin(pos, inv_freq[(d - (Di - rd)) / 2], &rc[k / 2], &rs[k / 2]);
  }
  wait_for_predecessor();
  uint16_t* v = q + row * Di + lane * EPL;
  float x[EPL];
#pragma unroll
  for (int k = 0; k < EPL; ++k) x[k] = bf2f(v[k]);
  if (pos >= 0) {
#pragma unroll
    for (int k = 0; k < EPL; k += 2) {
      const int d = lane * EPL + k;
      if (d >= Di - rd) rope_pair_f(&x[k], &x[k + 1], rc[k / 2], rs[k / 2]);
    }
  }
  double h[EPL];
#pragma unroll
  for (int k = 0; k < EPL; ++k) h[k] = double(x[k]);
  // Butterflies over strides 1, 2, 4, ...: v[j] = a + b, v[j + s] = a - b for j with bit s clear.
#pragma unroll
  for (int s = 1; s < EPL; s <<= 1) {
#pragma unroll
    for (int k = 0; k < EPL; ++k)
      if ((k & s) == 0) {
        const double a = h[k], b = h[k + s];
        h[k] = a + b;
        h[k + s] = a - b;
      }
  }
#pragma unroll
  for (int ls = 1; ls < 32; ls <<= 1) {  // stride ls * EPL: partner lane = lane ^ ls
    const bool upper = (lane & ls) != 0;
#pragma unroll
    for (int k = 0; k < EPL; ++k) {
      const double other = __shfl_xor_sync(kFull, h[k], ls);
      h[k] = upper ? other - h[k] : h[k] + other;
    }
  }
  const double scale = 1.0 / sqrt(double(Di));
#pragma unroll
  for (int k = 0; k < EPL; ++k) x[k] = round_bf(float(h[k] * scale));
  // FP4 simulation per 32 values = 32 / EPL lanes.
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < EPL; ++k) amax = fmaxf(amax, fabsf(x[k]));
#pragma unroll
  for (int o = 1; o < 32 / EPL; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, o));
  const int e = core::ceil_log2_bits(__fmul_rn(fmaxf(amax, kFp4AmaxFloor), kFp4MaxInv));
  const float inv = core::pow2_float(-e), sc = core::pow2_float(e);
#pragma unroll
  for (int k = 0; k < EPL; ++k) {
    const float qv = e2m1_value(core::float_to_e2m1(core::clamp_f32(__fmul_rn(x[k], inv), -6.0f, 6.0f)));
    v[k] = f2bf(__fmul_rn(qv, sc));
  }
}

// ================================================================================
// compress (spec §5.3). Both paths share the pooling arithmetic (pool_feature) and
// the row finish (compress_finish_row), so they agree bit for bit.
//   simple: one CTA per sequence runs the reference state machine token by token.
//   fast:   compress_emit_kernel pools every due row in parallel (one CTA per
//           emitting token) from this step's a/g rows and the state as it was
//           before the step; then compress_state_kernel writes the state the
//           token-by-token machine would leave (per column, no token loop).
// Roofline (decode, T = 256, CSA main d = 512): reads a, g 2 x 1 MB, writes the
// 2 state rows per token (8 KB); an emitting token reads 8 candidates x 512 x 2 f32
// and writes one 584 B row. HCA emissions read 128 x 512 x 2 f32 (512 KB) each.
// ================================================================================
struct CompressArgs {
  const float *a, *g, *ape;
  const uint16_t* norm;
  const float* inv_freq;
  float* kv_state;  // [slots, state_rows, width]
  float* score_state;
  uint8_t* rows;    // [pages, per_page, row_bytes]
  const int32_t *positions, *token_seq, *seq_begin, *seq_len, *seq_start_pos, *seq_slot, *block_table;
  int32_t max_blocks;
  int64_t T, m, d, width, state_rows, rd, num_pages, per_page, row_bytes;
  bool rotate;
  float eps;
};

constexpr int kCompressThreads = 256;
static_assert(kCompressThreads == 256, "the row norm's sum order (block_sum_squares) is that of 256 threads");
constexpr int kMaxCompressDim = 512;

// Softmax-weighted pooling of one feature over its candidates, in the reference's
// order: max, then the sum of exp, then the sum of kv * (exp / z). get(c, &kv, &score).
template <class Get>
__device__ __forceinline__ float pool_feature(int n, const Get& get) {
  float kv, sc;
  get(0, &kv, &sc);
  float mx = sc;
  for (int c = 1; c < n; ++c) {
    get(c, &kv, &sc);
    mx = fmaxf(mx, sc);
  }
  float z = 0.0f;
  for (int c = 0; c < n; ++c) {
    get(c, &kv, &sc);
    z = __fadd_rn(z, exp_ref(__fsub_rn(sc, mx)));
  }
  float acc = 0.0f;
  for (int c = 0; c < n; ++c) {
    get(c, &kv, &sc);
    acc = __fadd_rn(acc, __fmul_rn(kv, __fdiv_rn(exp_ref(__fsub_rn(sc, mx)), z)));
  }
  return acc;
}

struct CompressSmem {
  float pooled[kMaxCompressDim];
  float v[kMaxCompressDim];
  double h[kMaxCompressDim];
  float red[32];
};

// Finishes compressed row j (RMSNorm of bf16(pooled), RoPE at j*m, FP8 or
// Hadamard + FP4 simulation) and stores its record. Called by every thread of
// the block with sm.pooled filled; dst may be null (no valid page). site: the CTA
// probe's (kNone: no marks).
__device__ void compress_finish_row(CompressSmem& sm, const CompressArgs& a, int64_t j, uint8_t* dst,
                                    CtaProbeSite site = CtaProbeSite::kNone) {
  const int d = int(a.d), rd = int(a.rd);
  const int tid = threadIdx.x, nt = blockDim.x;
  // The norm's weights (read from HBM, behind the step's weight streams) and the RoPE
  // pair's cos and sin (double precision) first, so both run under the sum's barriers
  // (no gain measured, docs/BENCHMARKS.md, sixty-fourth session). Both callers run
  // kCompressThreads threads, and rd <= d <= kMaxCompressDim (do_compress checks).
  constexpr int kPer = kMaxCompressDim / kCompressThreads;
  float nw[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k)
    if (tid + k * kCompressThreads < d) nw[k] = bf2f(a.norm[tid + k * kCompressThreads]);
  float rc = 0.0f, rs = 0.0f;
  if (tid < rd / 2) rope_cos_sin(j * a.m, a.inv_freq[tid], &rc, &rs);
  for (int f = tid; f < d; f += nt) sm.v[f] = round_bf(sm.pooled[f]);
  __syncthreads();
  // ref::rms_norm_bf16's sum of squares (the row norm's order, block_sum_squares).
  // An order of its own here left a rare row a quantization step off the reference
  // (1 of 468 indexer rows in a tiny generation), enough to flip a near-tie top-k.
  const float ss = block_sum_squares(sm.v, d, sm.red);
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, float(d)), a.eps)));
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int f = tid + k * kCompressThreads;
    if (f < d) sm.v[f] = round_bf(__fmul_rn(nw[k], __fmul_rn(sm.v[f], r)));
  }
  __syncthreads();
  DSV4_CTA_PROBE(site, 9, a.ape);  // normed
  if (tid < rd / 2)  // spec §5.3: rotated at j*m, the window's first token
    rope_pair_f(&sm.v[d - rd + 2 * tid], &sm.v[d - rd + 2 * tid + 1], rc, rs);
  __syncthreads();
  DSV4_CTA_PROBE(site, 10, a.ape);  // roped
  if (!a.rotate) {
    if (tid < 32 && dst != nullptr) warp_encode_kv_record(sm.v, d, int(a.row_bytes), dst);
    return;
  }
  for (int f = tid; f < d; f += nt) sm.h[f] = double(sm.v[f]);
  __syncthreads();
  for (int s = 1; s < d; s <<= 1) {
    for (int i = tid; i < d / 2; i += nt) {
      const int k = (i / s) * 2 * s + (i % s);
      const double x = sm.h[k], y = sm.h[k + s];
      sm.h[k] = x + y;
      sm.h[k + s] = x - y;
    }
    __syncthreads();
  }
  const double scale = 1.0 / sqrt(double(d));
  for (int f = tid; f < d; f += nt) sm.v[f] = round_bf(float(sm.h[f] * scale));
  __syncthreads();
  if (tid < 32 && dst != nullptr) warp_encode_index_record(sm.v, d, dst);
}

__device__ __forceinline__ uint8_t* compress_dst(const CompressArgs& a, int32_t s, int64_t j) {
  return const_cast<uint8_t*>(
      paged_record(a.rows, a.num_pages, a.per_page, a.row_bytes, a.block_table, a.max_blocks, s, j));
}

// simple: the reference state machine, one CTA per sequence, tokens in order.
__global__ void __launch_bounds__(kCompressThreads) compress_simple_kernel(CompressArgs a) {
  wait_for_predecessor();
  __shared__ CompressSmem sm;
  const int32_t s = blockIdx.x;
  const int32_t len = a.seq_len[s];
  if (len <= 0) return;
  const int64_t m = a.m, d = a.d, width = a.width;
  const bool overlap = m == 4;
  float* kvs = a.kv_state + int64_t(a.seq_slot[s]) * a.state_rows * width;
  float* scs = a.score_state + int64_t(a.seq_slot[s]) * a.state_rows * width;
  const float neg_inf = -INFINITY;
  for (int32_t i = 0; i < len; ++i) {
    const int64_t t = a.seq_begin[s] + i, p = a.positions[t];
    const int64_t slot_row = overlap ? m + p % m : p % m;
    for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
      kvs[slot_row * width + c] = a.a[t * width + c];
      scs[slot_row * width + c] = __fadd_rn(a.g[t * width + c], a.ape[(p % m) * width + c]);
    }
    __syncthreads();
    if ((p + 1) % m != 0) continue;  // uniform over the block
    const int64_t j = p / m;
    for (int64_t f = threadIdx.x; f < d; f += blockDim.x) {
      if (overlap) {
        sm.pooled[f] = pool_feature(int(2 * m), [&](int c, float* kv, float* sc) {
          if (c < m) {  // previous window, first half (absent for row 0)
            *kv = j > 0 ? kvs[c * width + f] : 0.0f;
            *sc = j > 0 ? scs[c * width + f] : neg_inf;
          } else {  // current window, second half
            *kv = kvs[c * width + d + f];
            *sc = scs[c * width + d + f];
          }
        });
      } else {
        sm.pooled[f] = pool_feature(int(m), [&](int c, float* kv, float* sc) {
          *kv = kvs[c * width + f];
          *sc = scs[c * width + f];
        });
      }
    }
    __syncthreads();
    if (overlap) {  // the current window becomes the previous one
      for (int64_t c = threadIdx.x; c < m * width; c += blockDim.x) {
        kvs[c] = kvs[m * width + c];
        scs[c] = scs[m * width + c];
      }
    }
    __syncthreads();
    compress_finish_row(sm, a, j, compress_dst(a, s, j));
    __syncthreads();
  }
}

// fast (1/2): the rows this step completes. Position q of the sequence is this
// step's row begin + (q - start) if q >= start, else the state: for ratio 4 the
// current-window rows m + q % m hold positions of window start / m and rows 0..m-1
// the window before it; for ratio 128 row q % m.
// Grid (tokens, CTAs a row): CTA (t, k) pools token t's feature chunks k, k + gridDim.y,
// .. of e.features features (the launcher's: at most kPoolStage / candidates, so 32 at
// ratio 128; at ratio 4 the row's d over its CTAs), each staged in shared memory:
// every thread computes exps and quotients, a thread per feature runs the three
// chains in candidate order (max, sum of exps, sum of products), pool_feature's
// operations in its order: the same bits. With several
// CTAs a row each stores its features to scratch and the last of the token's CTAs to
// arrive (an acquire-release count, reset by that CTA for the next launch) finishes
// the row. Why: with a thread per feature waiting on a global load per candidate and
// pass (pool_feature's loop), a 16-row step whose rows complete windows (bench decode
// --position-spread 128) took 4.55 ms against 3.39 without; staged in one CTA a row an
// HCA row still took 271 us (graph trace, H200, sixty-third session), on the step's
// critical path whenever a sequence of the batch completes a 128-token window.
constexpr int kPoolStage = int(kCompressPoolStage);
constexpr int kPoolPerThread = kPoolStage / kCompressThreads;

struct CompressEmitSmem {
  CompressSmem row;
  float kv[kPoolStage];         // [candidate][feature of the chunk]: kv, then kv * e / z
  float sc[kPoolStage];         // score, then e = exp(score - max)
  float stat[kMaxCompressDim];  // per feature of the chunk: the max, then the sum of exps
};

struct CompressEmitPlan {
  int features = 0;         // a chunk's (compress_emit_shape; 0: one CTA a row, pool_feature from global memory)
  float* pooled = nullptr;  // [T, d] (several CTAs a row)
  int* arrivals = nullptr;  // [T], zero between launches
};

__global__ void __launch_bounds__(kCompressThreads) compress_emit_kernel(CompressArgs a, CompressEmitPlan e) {
  constexpr CtaProbeSite kSite = CtaProbeSite::kCompressEmit;
  DSV4_CTA_PROBE_SCOPE(kSite, a.ape);
  wait_for_predecessor();
  DSV4_CTA_PROBE(kSite, 1, a.ape);  // waited
  __shared__ CompressEmitSmem sm;
  __shared__ int s_last;
  const int64_t t = blockIdx.x;
  const int32_t s = a.token_seq[t];
  const int64_t p = a.positions[t], m = a.m, d = a.d, width = a.width;
  if (s < 0 || p < 0 || (p + 1) % m != 0) return;
  const int64_t j = p / m, start = a.seq_start_pos[s], begin = a.seq_begin[s];
  const bool overlap = m == 4;
  const float* kvs = a.kv_state + int64_t(a.seq_slot[s]) * a.state_rows * width;
  const float* scs = a.score_state + int64_t(a.seq_slot[s]) * a.state_rows * width;
  const int64_t window_start = (start / m) * m;  // first position of the state's current window
  auto value = [&](int64_t q, int64_t col, float* kv, float* sc) {
    if (q >= start) {
      const int64_t row = begin + (q - start);
      *kv = a.a[row * width + col];
      *sc = __fadd_rn(a.g[row * width + col], a.ape[(q % m) * width + col]);
    } else {
      const int64_t srow = overlap ? (q >= window_start ? m + q % m : q % m) : q % m;
      *kv = kvs[srow * width + col];
      *sc = scs[srow * width + col];
    }
  };
  const float neg_inf = -INFINITY;
  // Candidate c of feature f: ratio 4, the previous window's first half (absent for
  // row 0), then the current window's second half; otherwise the window.
  auto candidate = [&](int64_t c, int64_t f, float* kv, float* sc) {
    if (!overlap) {
      value(j * m + c, f, kv, sc);
    } else if (c >= m) {
      value(j * m + (c - m), d + f, kv, sc);
    } else if (j > 0) {
      value((j - 1) * m + c, f, kv, sc);
    } else {
      *kv = 0.0f;
      *sc = neg_inf;
    }
  };
  const int n = int(overlap ? 2 * m : m);
  const int tid = int(threadIdx.x), nt = int(blockDim.x);
  const int F = e.features;
  if (F == 0) {
    for (int64_t f = tid; f < d; f += nt)
      sm.row.pooled[f] = pool_feature(n, [&](int c, float* kv, float* sc) { candidate(c, f, kv, sc); });
  } else {
    const bool whole = gridDim.y == 1;  // this CTA pools every chunk and finishes the row
    for (int f0 = int(blockIdx.y) * F; f0 < int(d); f0 += int(gridDim.y) * F) {
      const int fc = std::min(F, int(d) - f0), elems = n * fc;
      float rkv[kPoolPerThread], rsc[kPoolPerThread];
#pragma unroll
      for (int k = 0; k < kPoolPerThread; ++k) {  // every load in flight, then the stores
        const int i = tid + k * kCompressThreads;
        if (i < elems) candidate(i / fc, f0 + i % fc, &rkv[k], &rsc[k]);
      }
      __syncthreads();  // (the previous chunk's products read)
#pragma unroll
      for (int k = 0; k < kPoolPerThread; ++k) {
        const int i = tid + k * kCompressThreads;
        if (i < elems) {
          sm.kv[i] = rkv[k];
          sm.sc[i] = rsc[k];
        }
      }
      __syncthreads();
      DSV4_CTA_PROBE(kSite, 2, a.ape);  // loaded
      for (int f = tid; f < fc; f += nt) {  // max, candidates in order
        float mx = sm.sc[f];
#pragma unroll 8
        for (int c = 1; c < n; ++c) mx = fmaxf(mx, sm.sc[c * fc + f]);
        sm.stat[f] = mx;
      }
      __syncthreads();
      DSV4_CTA_PROBE(kSite, 3, a.ape);  // max
      for (int i = tid; i < elems; i += nt) sm.sc[i] = exp_ref(__fsub_rn(sm.sc[i], sm.stat[i % fc]));
      __syncthreads();
      DSV4_CTA_PROBE(kSite, 4, a.ape);  // exps
      for (int f = tid; f < fc; f += nt) {  // the sum of exps, in order
        float z = 0.0f;
#pragma unroll 8
        for (int c = 0; c < n; ++c) z = __fadd_rn(z, sm.sc[c * fc + f]);
        sm.stat[f] = z;
      }
      __syncthreads();
      DSV4_CTA_PROBE(kSite, 5, a.ape);  // sum
      for (int i = tid; i < elems; i += nt) sm.kv[i] = __fmul_rn(sm.kv[i], __fdiv_rn(sm.sc[i], sm.stat[i % fc]));
      __syncthreads();
      float* const out = whole ? sm.row.pooled + f0 : e.pooled + t * d + f0;
      for (int f = tid; f < fc; f += nt) {  // the sum of products, in order
        float acc = 0.0f;
#pragma unroll 8
        for (int c = 0; c < n; ++c) acc = __fadd_rn(acc, sm.kv[c * fc + f]);
        out[f] = acc;
      }
    }
    DSV4_CTA_PROBE(kSite, 6, a.ape);  // pooled
    if (!whole) {
      __syncthreads();  // (every store of the CTA before thread 0's release)
      if (tid == 0) s_last = atom_add_acq_rel_gpu(e.arrivals + t, 1) == int(gridDim.y) - 1;
      __syncthreads();
      if (!s_last) return;
      DSV4_CTA_PROBE(kSite, 7, a.ape);  // arrived (the last)
      // The other CTAs' features, from L2 (this SM never held their lines).
      for (int64_t f = tid; f < d; f += nt) sm.row.pooled[f] = __ldcg(e.pooled + t * d + f);
      if (tid == 0) e.arrivals[t] = 0;  // (every CTA of the token has counted: the next launch starts from 0)
      DSV4_CTA_PROBE(kSite, 8, a.ape);  // gathered (thread 0's loads returned)
    }
  }
  __syncthreads();
  compress_finish_row(sm.row, a, j, compress_dst(a, s, j), kSite);
}

// fast (2/2): the state after the step, per column (runs after compress_emit_kernel,
// which reads the state as it was before the step). Current-window row of residue r:
// the last position q < start + len with q % m == r, if it is in this step: the step's
// last min(len, m) positions, whose residues are distinct. Ratio 4, previous-window
// rows: the window of the last emission in the step (old current rows for its positions
// before the step, read only then). Grid: (column blocks, sequences, z); ratio 128
// spreads those positions over z (launcher: z <= the step's longest sequence, so a
// decode step launches one CTA a column block and sequence, not 16).
__global__ void compress_state_kernel(CompressArgs a) {
  wait_for_predecessor();
  const int32_t s = blockIdx.y;
  const int32_t len = a.seq_len[s];
  if (len <= 0) return;
  const int64_t m = a.m, width = a.width;
  const bool overlap = m == 4;
  const int64_t start = a.seq_start_pos[s], begin = a.seq_begin[s], last = start + len - 1;
  float* kvs = a.kv_state + int64_t(a.seq_slot[s]) * a.state_rows * width;
  float* scs = a.score_state + int64_t(a.seq_slot[s]) * a.state_rows * width;
  // Largest q <= last with q % m == r (-1 if none).
  auto last_with_residue = [&](int64_t r) -> int64_t { return last < r ? -1 : last - ((last - r) % m); };
  auto step_value = [&](int64_t q, int64_t col, float* kv, float* sc) {
    const int64_t row = begin + (q - start);
    *kv = a.a[row * width + col];
    *sc = __fadd_rn(a.g[row * width + col], a.ape[(q % m) * width + col]);
  };
  if (!overlap) {
    const int64_t written = len < m ? len : m;  // the step's last `written` positions
    for (int64_t k = blockIdx.z; k < written; k += gridDim.z) {
      const int64_t q = last - k, r = q % m;
      for (int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; col < width;
           col += int64_t(gridDim.x) * blockDim.x) {
        float kv, sc;
        step_value(q, col, &kv, &sc);
        kvs[r * width + col] = kv;
        scs[r * width + col] = sc;
      }
    }
    return;
  }
  if (blockIdx.z != 0) return;
  const int64_t emit = last_with_residue(m - 1);  // last position that completed a row
  for (int64_t col = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; col < width;
       col += int64_t(gridDim.x) * blockDim.x) {
    if (emit >= start) {
      // Rows 0-3 become the emission's window: its positions in the step from a/g, the
      // others from the state's current window (rows 4-7), read before row 4 + r is
      // rewritten below (this thread's own column).
      const int64_t w0 = (emit / 4) * 4;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float kv, sc;
        if (w0 + r >= start) {
          step_value(w0 + r, col, &kv, &sc);
        } else {
          kv = kvs[(4 + r) * width + col];
          sc = scs[(4 + r) * width + col];
        }
        kvs[r * width + col] = kv;
        scs[r * width + col] = sc;
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t q = last_with_residue(r);
      if (q < start) continue;
      float kv, sc;
      step_value(q, col, &kv, &sc);
      kvs[(4 + r) * width + col] = kv;
      scs[(4 + r) * width + col] = sc;
    }
  }
}

// ================================================================================
// indexer_topk (spec §5.4). Scores are bf16 like the reference: per head
// bf16(q_h . k_j), ReLU, bf16(x * w_h), a sequential fp32 sum over the heads,
// bf16. A score is kept as a 16-bit key (order-preserving map of the bf16 bits),
// so top-k is a selection on 16-bit keys with ties to the lower row. The selected
// rows are written in ascending row order (the op's contract, backend.h).
//   simple: one CTA per token, one warp per row, fp32 dot products in the exact
//           cpu::dot_f32 order (scores equal the reference bit for bit), then a
//           CUB segmented radix sort of (key, ~row) per token, whose keep-th entry
//           is the threshold of an in-order pass over the rows.
//   fast:   tensor-core scoring (mma m16n8k16 bf16: heads x rows, K = Di), CTAs of
//           256 rows (fixed, so a row's score never depends on the batch) that also
//           build a 256-bin histogram of the keys' high bytes; then one CTA per
//           token finds the threshold key by two radix passes (high byte, low
//           byte) and takes the rows above it and the first ties, in row order.
//           (It bitonic-sorted the winners by score before: ~60% of a 13.6 µs
//           launch at batch 1 and 16, ncu, twenty-fifth session.)
// Roofline (decode, context 4096 -> 1024 rows/token, Hi = 64, Di = 128): 68 B +
// 16 KFLOP per row; T = 256: 17.8 MB, 4.3 GFLOP -> ~6 us of HBM, ~10 us of mma.sync.
// 1M context: 256K rows = 17 MB per token.
// ================================================================================
__device__ __forceinline__ uint16_t score_key(float score_bf16) {
  uint16_t b = f2bf(score_bf16);
  if (b == 0x8000u) b = 0;  // -0 == +0
  return (b & 0x8000u) ? uint16_t(~b) : uint16_t(b | 0x8000u);
}

__device__ __forceinline__ int64_t visible_rows(int32_t s, int32_t p, int64_t max_rows) {
  if (s < 0 || p < 0) return 0;
  const int64_t n = (int64_t(p) + 1) / 4;
  return n < max_rows ? n : max_rows;
}

struct TopkArgs {
  const uint16_t* q;        // [T, Hi, Di] (token offset applied)
  const uint16_t* weights;  // [T, Hi]
  float weight_scale;
  const uint8_t* rows;      // index rows [pages, 64, row_bytes]
  const int32_t *positions, *token_seq, *block_table;  // positions/token_seq with the token offset applied
  int32_t max_blocks;
  int64_t num_pages, row_bytes, Hi, Di, K, T /* tokens of this launch */, max_rows;
  int32_t* topk;            // [T, K] (offset applied)
  int score_pages;          // fast: 64-row pages a scoring CTA takes (1 to kScoreMaxPages)
  bool release_select;      // fast: the scoring CTAs let the selection launch before they end
  uint16_t* keys16;         // fast: [T, max_rows]
  uint32_t* hist;           // fast: [T, 256]
  uint64_t* keys64;         // simple: [T, max_rows]
  uint64_t* keys64_sorted;  // simple
  int* seg_begin;           // simple: [T]
  int* seg_end;
};

// simple scoring (also the fast path's fallback for shapes the mma kernel does not
// take): kComposite writes (key << 32 | ~row) for the CUB sort, else key16 + histogram.
template <int DI, bool kComposite>
__global__ void __launch_bounds__(256) index_score_simple_kernel(TopkArgs a) {
  wait_for_predecessor();
  constexpr int kB = DI / 16;  // values per lane and head
  extern __shared__ float qs[];  // [Hi][DI] fp32, then w[Hi]
  __shared__ uint32_t hist_s[256];
  const int64_t t = blockIdx.x;
  const int32_t s = a.token_seq[t], p = a.positions[t];
  const int64_t n = visible_rows(s, p, a.max_rows), Hi = a.Hi;
  if (n == 0) return;
  float* w = qs + Hi * DI;
  for (int64_t i = threadIdx.x; i < Hi * DI; i += blockDim.x) qs[i] = bf2f(a.q[t * Hi * DI + i]);
  for (int64_t h = threadIdx.x; h < Hi; h += blockDim.x)
    w[h] = round_bf(__fmul_rn(bf2f(a.weights[t * Hi + h]), a.weight_scale));
  if (!kComposite)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist_s[i] = 0;
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, u = lane & 15, half = lane >> 4;
  for (int64_t j = warp; j < n; j += blockDim.x >> 5) {
    const uint8_t* rec = paged_record(a.rows, a.num_pages, 64, a.row_bytes, a.block_table, a.max_blocks, s, j);
    float score = 0.0f;
    if (rec != nullptr) {
      float k[kB];
#pragma unroll
      for (int b = 0; b < kB; ++b) k[b] = index_record_value(rec, DI, 16 * b + u);
      float sum = 0.0f;
      for (int64_t hp = 0; hp < (Hi + 1) / 2; ++hp) {
        const int64_t h = 2 * hp + half;
        const bool real = h < Hi;
        const float* qh = qs + (real ? h : 0) * DI;
        float acc = 0.0f;
#pragma unroll
        for (int b = 0; b < kB; ++b) acc = __fadd_rn(acc, __fmul_rn(qh[16 * b + u], k[b]));
        acc = __fadd_rn(acc, __shfl_xor_sync(kFull, acc, 1));
        acc = __fadd_rn(acc, __shfl_xor_sync(kFull, acc, 2));
        acc = __fadd_rn(acc, __shfl_xor_sync(kFull, acc, 4));
        acc = __fadd_rn(acc, __shfl_xor_sync(kFull, acc, 8));
        const float logit = round_bf(acc);
        const float relu = logit < 0.0f ? 0.0f : logit;  // std::max(logit, 0.0f)
        const float c = real ? round_bf(__fmul_rn(relu, w[h])) : 0.0f;
        const float c_hi = __shfl_sync(kFull, c, 16);  // head 2hp + 1
        sum = __fadd_rn(sum, __shfl_sync(kFull, c, 0));
        if (2 * hp + 1 < Hi) sum = __fadd_rn(sum, c_hi);
      }
      score = round_bf(sum);
    }
    const uint16_t key = rec != nullptr ? score_key(score) : uint16_t(0);
    if (lane == 0) {
      if (kComposite) {
        a.keys64[t * a.max_rows + j] = (uint64_t(key) << 32) | uint64_t(~uint32_t(j));
      } else {
        a.keys16[t * a.max_rows + j] = key;
        atomicAdd(&hist_s[key >> 8], 1u);
      }
    }
  }
  if (!kComposite) {
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
      if (hist_s[i] != 0) atomicAdd(&a.hist[t * 256 + i], hist_s[i]);
  }
}

// fast scoring: grid (row chunks of score_pages x 64 rows, tokens), 4 warps; warp w
// owns heads [16w, 16w + 16) (A fragments in registers for the whole CTA), each page
// of 64 rows is staged by cp.async, decoded to bf16 and multiplied as 8 n-tiles. A
// row's score does not depend on its chunk, so the launcher sizes chunks to the grid.
constexpr int kScoreMaxPages = 4;
constexpr int kScoreDi = 128;
constexpr int kScoreHeads = 64;
constexpr int kQsStride = kScoreDi + 8;   // bf16
constexpr int kCStride = 72;              // fp32, contributions [head][row]
constexpr int kIndexRowBytes = kScoreDi / 2 + kScoreDi / 32;  // 68
constexpr int kPageBytes = 64 * kIndexRowBytes;               // 4352

struct ScoreSmem {
  uint16_t qs[kScoreHeads * kQsStride];
  uint16_t ks[64 * kQsStride];
  __align__(16) uint8_t raw[2][kPageBytes];
  float contrib[kScoreHeads * kCStride];
  float w[kScoreHeads];
  float e2m1[16];
  E2m1PairBits e2m1_pair[256];  // a byte's two e2m1 values before scaling (ops/cuda/e2m1_bf16.h)
  uint32_t hist[256];
};

// kEarly (DSV4_CUDA_SCORE_EARLY, default on; off for A/B runs): the tables and the
// page addresses (which no kernel writes) before the dependency wait; after it the
// query's and the first page's copies issued together, both by cp.async (the query's
// loads had to return before the page's copies were issued: two global round trips one
// after the other on every CTA); the head sum's 64 loads unrolled ahead of its adds.
// Why: the graph trace had a launch on the critical chain at 14.1 µs (16 rows, a page
// a CTA) and 27 µs (64 rows, four) against ~2 µs of bytes (thirty-ninth session). The
// same bits either way. Measured: 14.1 -> 12.7-13.3 µs a launch on the chain at 16 rows;
// the late form against it, two A/Bs (the second with the page addresses moved too):
// +0.2 / +0.4% a step at batch 1, 0.0 / +0.2% at 16, +0.1 / 0.0% at 64, +0.3 / +0.2% at 256.
template <bool kEarly>
__global__ void __launch_bounds__(128) index_score_mma_kernel(TopkArgs a) {
  extern __shared__ __align__(16) unsigned char score_smem_raw[];
  ScoreSmem& sm = *reinterpret_cast<ScoreSmem*>(score_smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  auto tables = [&] {
    if (tid < 16) sm.e2m1[tid] = e2m1_value(uint32_t(tid));
    for (int i = tid; i < 256; i += blockDim.x) {
      sm.hist[i] = 0;
      sm.e2m1_pair[i] = e2m1_pair_bits(uint32_t(i));
    }
  };
  if constexpr (kEarly) tables();
  // The step's metadata (positions, sequences, block table: uploaded before the step, no
  // kernel writes them) before the wait in the early form: the page addresses are two
  // dependent global loads that ncu put at the head of a 16-row launch's stalls.
  if constexpr (!kEarly) wait_for_predecessor();
  const int64_t chunk_rows = int64_t(64) * a.score_pages;
  const int64_t t = blockIdx.y, chunk0 = int64_t(blockIdx.x) * chunk_rows;
  const int32_t s = a.token_seq[t], p = a.positions[t];
  const int64_t n = visible_rows(s, p, a.max_rows);
  if (chunk0 >= n) return;
  const int64_t Hi = a.Hi;
  const int64_t rows_here = (n - chunk0) < chunk_rows ? (n - chunk0) : chunk_rows;
  const int pages = int((rows_here + 63) / 64);
  const uint8_t* page_src[kScoreMaxPages];  // a page's records, or null (outside the table)
#pragma unroll
  for (int pg = 0; pg < kScoreMaxPages; ++pg) {
    const int64_t blk = (chunk0 >> 6) + pg;
    const int32_t page = pg < pages && blk < a.max_blocks ? a.block_table[int64_t(s) * a.max_blocks + blk] : -1;
    page_src[pg] = page >= 0 && page < a.num_pages ? a.rows + int64_t(page) * kPageBytes : nullptr;
  }
  auto page_ptr = [&](int pg) -> const uint8_t* {  // (selects: page_src stays in registers)
    const uint8_t* src = page_src[0];
#pragma unroll
    for (int i = 1; i < kScoreMaxPages; ++i) src = pg == i ? page_src[i] : src;
    return src;
  };
  if constexpr (kEarly) wait_for_predecessor();
  auto issue = [&](int pg) {
    const uint8_t* src = page_ptr(pg);
    if (src != nullptr)
      for (int i = tid; i < kPageBytes / 16; i += blockDim.x) cp_async16(&sm.raw[pg & 1][16 * i], src + 16 * i);
    cp_async_commit();
  };
  if constexpr (kEarly) {
    // The query (zero rows for heads >= Hi) as the first copy group, page 0 as the second.
    for (int i = tid; i < kScoreHeads * (kScoreDi / 8); i += blockDim.x) {
      const int h = i / (kScoreDi / 8), c = (i % (kScoreDi / 8)) * 8;
      if (h < Hi) cp_async16(&sm.qs[h * kQsStride + c], a.q + (t * Hi + h) * kScoreDi + c);
      else *reinterpret_cast<uint4*>(&sm.qs[h * kQsStride + c]) = make_uint4(0, 0, 0, 0);
    }
    cp_async_commit();
    issue(0);
    for (int h = tid; h < kScoreHeads; h += blockDim.x)
      sm.w[h] = h < Hi ? round_bf(__fmul_rn(bf2f(a.weights[t * Hi + h]), a.weight_scale)) : 0.0f;
    cp_async_wait<1>();  // the query's group
  } else {
    // Query (zero rows for heads >= Hi), weights, tables.
    for (int i = tid; i < kScoreHeads * (kScoreDi / 8); i += blockDim.x) {
      const int h = i / (kScoreDi / 8), c = (i % (kScoreDi / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (h < Hi) v = *reinterpret_cast<const uint4*>(a.q + (t * Hi + h) * kScoreDi + c);
      *reinterpret_cast<uint4*>(&sm.qs[h * kQsStride + c]) = v;
    }
    for (int h = tid; h < kScoreHeads; h += blockDim.x)
      sm.w[h] = h < Hi ? round_bf(__fmul_rn(bf2f(a.weights[t * Hi + h]), a.weight_scale)) : 0.0f;
    tables();
    issue(0);
  }
  __syncthreads();
  uint32_t afrag[kScoreDi / 16][4];
#pragma unroll
  for (int ks = 0; ks < kScoreDi / 16; ++ks) {
    const uint16_t* q0 = &sm.qs[(warp * 16 + g) * kQsStride + ks * 16 + 2 * tig];
    afrag[ks][0] = lds32(q0);
    afrag[ks][1] = lds32(q0 + 8 * kQsStride);
    afrag[ks][2] = lds32(q0 + 8);
    afrag[ks][3] = lds32(q0 + 8 * kQsStride + 8);
  }
  for (int pg = 0; pg < pages; ++pg) {
    if (pg + 1 < pages) {
      issue(pg + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bool valid_page = page_ptr(pg) != nullptr;
    const int64_t row0 = chunk0 + int64_t(pg) * 64;
    {  // decode: thread -> (row tid / 2, half tid % 2: 64 values)
      const int r = tid >> 1, hf = tid & 1;
      uint16_t* out = &sm.ks[r * kQsStride + hf * 64];
      if (valid_page && row0 + r < n) {
        const uint8_t* rec = &sm.raw[pg & 1][r * kIndexRowBytes];
        const uint32_t e0 = rec[kScoreDi / 2 + 2 * hf], e1 = rec[kScoreDi / 2 + 2 * hf + 1];
        // 8 values from 4 packed bytes at a time; pair(byte, c) is a byte's two values as bf16.
        auto decode = [&](auto&& pair) {
#pragma unroll
          for (int c = 0; c < 8; ++c) {
            const uint32_t packed = *reinterpret_cast<const uint32_t*>(rec + hf * 32 + 4 * c);
            uint32_t ow[4];
#pragma unroll
            for (int b = 0; b < 4; ++b) ow[b] = pair((packed >> (8 * b)) & 0xffu, c);
            *reinterpret_cast<uint4*>(out + 8 * c) = make_uint4(ow[0], ow[1], ow[2], ow[3]);
          }
        };
        if (e2m1_scale_in_range(e0) && e2m1_scale_in_range(e1)) {  // the integer decode (e2m1_bf16.h)
          const uint32_t add0 = e2m1_scale_add(e0), add1 = e2m1_scale_add(e1);
          decode([&](uint32_t byte, int c) { return e2m1_pair_scaled(sm.e2m1_pair[byte], c < 4 ? add0 : add1); });
        } else {  // a scale at the edge of the range (subnormal or overflowing products, NaN)
          const float s0 = core::e8m0_to_float(uint8_t(e0)), s1 = core::e8m0_to_float(uint8_t(e1));
          decode([&](uint32_t byte, int c) {
            const float sc = c < 4 ? s0 : s1;
            return pack_bf16(__fmul_rn(sm.e2m1[byte & 15], sc), __fmul_rn(sm.e2m1[byte >> 4], sc));
          });
        }
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c) *reinterpret_cast<uint4*>(out + 8 * c) = make_uint4(0, 0, 0, 0);
      }
    }
    __syncthreads();
    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kScoreDi / 16; ++ks) {
        const uint16_t* k0 = &sm.ks[(nt * 8 + g) * kQsStride + ks * 16 + 2 * tig];
        mma_bf16(acc[nt], afrag[ks], lds32(k0), lds32(k0 + 8));
      }
    }
    // Per-head contributions bf16(relu(bf16(logit)) * w_h) -> contrib[h][row].
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int h = warp * 16 + g + 8 * hh;
        float c2[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float logit = round_bf(acc[nt][2 * hh + e]);
          const float relu = logit < 0.0f ? 0.0f : logit;
          c2[e] = round_bf(__fmul_rn(relu, sm.w[h]));
        }
        *reinterpret_cast<float2*>(&sm.contrib[h * kCStride + nt * 8 + 2 * tig]) = make_float2(c2[0], c2[1]);
      }
    __syncthreads();
    if (tid < 64 && row0 + tid < n) {
      uint16_t key = 0;
      if (valid_page) {
        float sum = 0.0f;
        if constexpr (kEarly) {
          float c[kScoreHeads];
#pragma unroll
          for (int h = 0; h < kScoreHeads; ++h) c[h] = sm.contrib[h * kCStride + tid];
#pragma unroll
          for (int h = 0; h < kScoreHeads; ++h)
            if (h < Hi) sum = __fadd_rn(sum, c[h]);
        } else {
          for (int64_t h = 0; h < Hi; ++h) sum = __fadd_rn(sum, sm.contrib[h * kCStride + tid]);
        }
        key = score_key(round_bf(sum));
      }
      a.keys16[t * a.max_rows + row0 + tid] = key;
      atomicAdd(&sm.hist[key >> 8], 1u);
    }
    // The next iteration's first barrier orders these reads before ks/contrib are rewritten.
  }
  // The selection's launch and prologue under this grid's tail (its wait still returns
  // only once this grid has finished): with topk_select_kernel's early form.
  if (a.release_select) allow_dependents_to_launch();
  __syncthreads();
  for (int i = tid; i < 256; i += blockDim.x)
    if (sm.hist[i] != 0) atomicAdd(&a.hist[t * 256 + i], sm.hist[i]);
}

// fast selection: one CTA per token.
constexpr int kSelectThreads = 512;

// Warp-wide (every lane gets the answer): the highest bin b of a 256-bin histogram with
// hist[b] + hist[b + 1] + ... + hist[255] >= want, and above = hist[b + 1] + ... + hist[255];
// b = 0 with above = the whole sum when no bin reaches want. Lane l sums bins 255 - 8l
// down to 248 - 8l, a shuffle scan finds the lane whose bins reach want, and that lane
// walks its 8 bins. (One thread walking the 256 bins, a dependent shared-memory load
// per bin, twice per token, was a serial tail of every selection.)
__device__ __forceinline__ void find_top_bin(const uint32_t* hist, int64_t want, int lane, int& bin,
                                             int64_t& above) {
  long long own = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) own += hist[255 - 8 * lane - i];
  long long incl = own;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long v = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += v;
  }
  const unsigned hit = __ballot_sync(kFull, incl >= want);
  if (hit == 0) {
    bin = 0;
    above = __shfl_sync(kFull, incl, 31);
    return;
  }
  const int owner = __ffs(int(hit)) - 1;
  long long acc = incl - own;  // the bins above this lane's
  int b = 0;
  if (lane == owner) {
    for (int i = 0; i < 8; ++i) {
      const int bb = 255 - 8 * lane - i;
      if (acc + hist[bb] >= want) {
        b = bb;
        break;
      }
      acc += hist[bb];
    }
  }
  bin = __shfl_sync(kFull, b, owner);
  above = __shfl_sync(kFull, acc, owner);
}

// The selected rows of one token in ascending row order, by the whole block: row j < n
// is taken if kind(j) == 1, or if kind(j) == 2 (a tie) and fewer than ties_wanted
// ties precede it; taken rows go to out[0], out[1], ... A chunk of blockDim rows at a
// time: each warp counts its rows of both kinds by ballot, each thread its place from
// the counts of the warps before it (two buffers of counts: one barrier a chunk).
// counts: shared [2][2][32].
template <typename Kind>
__device__ void take_rows_in_order(int64_t n, int64_t ties_wanted, Kind&& kind, int32_t* out,
                                      int (*counts)[2][32]) {
  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31, warps = int(blockDim.x) >> 5;
  const unsigned lower = (1u << lane) - 1u;
  int64_t sure_before = 0, ties_before = 0;  // in the chunks done
  int buf = 0;
  for (int64_t base = 0; base < n; base += blockDim.x, buf ^= 1) {
    const int64_t j = base + tid;
    const int k = j < n ? kind(j) : 0;
    const unsigned sure = __ballot_sync(kFull, k == 1), tie = __ballot_sync(kFull, k == 2);
    if (lane == 0) {
      counts[buf][0][warp] = __popc(sure);
      counts[buf][1][warp] = __popc(tie);
    }
    __syncthreads();
    int64_t s_rank = sure_before + __popc(sure & lower), t_rank = ties_before + __popc(tie & lower);
    for (int w = 0; w < warps; ++w) {
      const int cs = counts[buf][0][w], ct = counts[buf][1][w];
      if (w < warp) s_rank += cs, t_rank += ct;
      sure_before += cs;
      ties_before += ct;
    }
    if (k == 1 || (k == 2 && t_rank < ties_wanted)) out[s_rank + min(t_rank, ties_wanted)] = int32_t(j);
  }
}

// kEarly (DSV4_CUDA_SELECT_EARLY, default on; off for A/B runs): the row count (step
// metadata, which no kernel writes) before the dependency wait, and the token's first
// kSelectHeld x 512 keys loaded once into registers right after it, in flight with the
// histogram's loads; the low-byte pass and the in-order pass read them there instead of
// loading every key twice more (two more global round trips on a one-CTA-a-token chain:
// 7-8 µs a launch on the critical chain at 16 and 64 rows, thirty-ninth session); and the
// scoring CTAs let it launch before they end (TopkArgs::release_select). The same
// selection either way. Measured: -0.2% a step at batch 1, -0.1% at 16 and 64.
constexpr int kSelectHeld = 2;  // 1024 rows: a 4K context's indexer rows
template <bool kEarly>
__global__ void __launch_bounds__(kSelectThreads) topk_select_kernel(TopkArgs a) {
  if constexpr (!kEarly) wait_for_predecessor();
  __shared__ uint32_t hist_s[256];
  __shared__ int s_bin, s_need;
  __shared__ int counts[2][2][32];
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t n = visible_rows(a.token_seq[t], a.positions[t], a.max_rows);
  if constexpr (kEarly) wait_for_predecessor();
  const int64_t K = a.K;
  const int64_t keep = n < K ? n : K;
  int32_t* out = a.topk + t * K;
  const uint16_t* keys = a.keys16 + t * a.max_rows;
  // Key of row j = c * kSelectThreads + tid (chunk c): from the registers or memory.
  uint16_t held[kSelectHeld];
#pragma unroll
  for (int c = 0; c < kSelectHeld; ++c) {
    const int64_t j = int64_t(c) * kSelectThreads + tid;
    held[c] = kEarly && j < n ? keys[j] : uint16_t(0);
  }
  auto key_at = [&](int64_t j) -> int {
    if constexpr (kEarly) {
      const int64_t c = (j - tid) / kSelectThreads;
      if (c < kSelectHeld) {
        uint16_t k = held[0];
#pragma unroll
        for (int i = 1; i < kSelectHeld; ++i) k = c == i ? held[i] : k;
        return k;
      }
    }
    return keys[j];
  };
  for (int64_t i = keep + tid; i < K; i += blockDim.x) out[i] = -1;
  // 1. High byte: the bin holding the keep-th largest key. The row is left zero for the
  // next scoring launch (each thread clears what it read; do_indexer_topk zeroes the
  // buffer only when it allocates it).
  for (int i = tid; i < 256; i += blockDim.x) {
    hist_s[i] = a.hist[t * 256 + i];
    a.hist[t * 256 + i] = 0;
  }
  if (keep == 0) return;
  __syncthreads();
  if (tid < 32) {
    int bin = 0;
    int64_t above = 0;
    find_top_bin(hist_s, keep, tid, bin, above);
    if (tid == 0) {
      s_bin = bin;
      s_need = int(keep - above);  // still needed from the bin
    }
  }
  __syncthreads();
  const int hi_bin = s_bin;
  __syncthreads();
  for (int i = tid; i < 256; i += blockDim.x) hist_s[i] = 0;
  __syncthreads();
  // 2. The bin's keys by low byte.
  for (int64_t j = tid; j < n; j += blockDim.x) {
    const int key = key_at(j);
    if ((key >> 8) == hi_bin) atomicAdd(&hist_s[key & 255], 1u);
  }
  __syncthreads();
  if (tid < 32) {
    const int want = s_need;
    int bin = 0;
    int64_t above = 0;
    find_top_bin(hist_s, want, tid, bin, above);
    __syncwarp();  // every lane has read s_need
    if (tid == 0) {
      s_bin = (hi_bin << 8) | bin;  // the threshold key
      s_need = int(want - above);   // rows with exactly the threshold key still needed, lowest rows first
    }
  }
  __syncthreads();
  const int thr = s_bin, need_eq = s_need;
  // 3. In row order: every key above the threshold, and the first need_eq rows holding it.
  take_rows_in_order(n, need_eq, [&](int64_t j) { const int key = key_at(j); return key > thr ? 1 : key == thr ? 2 : 0; },
                     out, counts);
}

// simple selection: CUB segmented sort of the composite keys, then extraction.
__global__ void topk_segments_kernel(TopkArgs a) {
  wait_for_predecessor();
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < a.T; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = visible_rows(a.token_seq[t], a.positions[t], a.max_rows);
    a.seg_begin[t] = int(t * a.max_rows);
    a.seg_end[t] = int(t * a.max_rows + n);
  }
}

__global__ void __launch_bounds__(256) topk_extract_kernel(TopkArgs a) {
  wait_for_predecessor();
  __shared__ int counts[2][2][32];
  const int64_t t = blockIdx.x;
  const int64_t n = visible_rows(a.token_seq[t], a.positions[t], a.max_rows);
  const int64_t keep = n < a.K ? n : a.K;
  int32_t* out = a.topk + t * a.K;
  for (int64_t i = keep + threadIdx.x; i < a.K; i += blockDim.x) out[i] = -1;
  if (keep == 0) return;
  // The composite keys are distinct (each holds its row): the keep largest are those
  // at or above the keep-th of the sorted ones.
  const uint64_t* composite = a.keys64 + t * a.max_rows;
  const uint64_t last = a.keys64_sorted[t * a.max_rows + keep - 1];
  take_rows_in_order(n, 0, [&](int64_t j) { return composite[j] >= last ? 1 : 0; }, out, counts);
}

// ================================================================================
// sparse_attention (spec §5.5, §5.6). Key u of query t: u < n_win = min(W, p+1)
// is window position p - n_win + 1 + u (this step's kv row if >= the sequence's
// start, else the ring); then the compressed rows (CSA: the valid entries of the
// token's top-k row in order; HCA: rows 0 .. (p+1)/128 - 1).
// ================================================================================
struct AttnArgs {
  const uint16_t* q;   // [T, H, Dh]
  const uint16_t* kv;  // [T, Dh]
  const uint8_t* window;
  const uint8_t* rows;
  const int32_t* topk;  // [T, K] or null
  const float* sink;
  const float* inv_freq;
  uint16_t* o;
  const int32_t *positions, *token_seq, *seq_begin, *seq_start_pos, *seq_slot, *block_table;
  int32_t max_blocks;
  int64_t T, H, Dh, W, row_bytes, num_pages, per_page, ratio, K, max_keys;
  float scale;
};

// Resolved key: a KV record (type 1), a bf16 row of this step (type 2), or none (0).
struct KeyRef {
  const uint8_t* ptr;
  int type;
};

// The fields of a row's sequence that resolve_key needs (step metadata).
__device__ __forceinline__ void row_sequence(const AttnArgs& a, int32_t s, int64_t& start, int64_t& begin,
                                             int64_t& slot) {
  start = a.seq_start_pos[s], begin = a.seq_begin[s], slot = a.seq_slot[s];
}

__device__ __forceinline__ KeyRef resolve_key(const AttnArgs& a, int32_t s, int64_t p, int64_t start, int64_t begin,
                                              int64_t slot, int64_t n_win, const int32_t* comp, int64_t u) {
  KeyRef k{nullptr, 0};
  if (u < n_win) {
    const int64_t pos = p - n_win + 1 + u;
    if (pos >= start) {
      k.ptr = reinterpret_cast<const uint8_t*>(a.kv + (begin + (pos - start)) * a.Dh);
      k.type = 2;
    } else {
      k.ptr = a.window + (slot * a.W + pos % a.W) * a.row_bytes;
      k.type = 1;
    }
    return k;
  }
  const int64_t c = u - n_win;
  const int64_t j = a.ratio == 4 ? int64_t(comp[c]) : c;
  k.ptr = paged_record(a.rows, a.num_pages, a.per_page, a.row_bytes, a.block_table, a.max_blocks, s, j);
  k.type = k.ptr != nullptr ? 1 : 0;
  return k;
}

__device__ __forceinline__ float key_value(const KeyRef& k, int Dh, int i) {
  return k.type == 2 ? bf2f(reinterpret_cast<const uint16_t*>(k.ptr)[i]) : kv_record_value(k.ptr, Dh, i);
}

// Collects the valid entries of the token's top-k row, in order, into comp[];
// returns their count (every thread). Block-wide.
__device__ int compact_topk(const AttnArgs& a, int64_t t, int32_t* comp, int* counter) {
  // Blocks of 32 entries; warp w takes blocks w, w + warps, ... Every warp loads all
  // its blocks first (one memory round trip; warp 0 alone walking the 16 blocks of
  // K = 512 was a chain of dependent loads, ~18% of a batch-1 CSA launch's samples,
  // ncu), counts each block's valid entries, and after a barrier writes them at
  // the block's offset (the counts of the blocks before it): the order is the row's.
  constexpr int kMaxBlocksPerWarp = 8;
  constexpr int kMaxBlocks = 64;
  __shared__ int block_valid[kMaxBlocks];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int blocks = int((a.K + 31) / 32);
  if (blocks > kMaxBlocks || blocks > warps * kMaxBlocksPerWarp) {  // not at the models' top-k sizes
    if (threadIdx.x == 0) *counter = 0;
    __syncthreads();
    if (threadIdx.x < 32) {
      int n = 0;
      for (int64_t base = 0; base < a.K; base += 32) {
        const int32_t j = base + lane < a.K ? a.topk[t * a.K + base + lane] : -1;
        const unsigned ballot = __ballot_sync(kFull, j >= 0);
        if (j >= 0) comp[n + __popc(ballot & ((1u << lane) - 1u))] = j;
        n += __popc(ballot);
      }
      if (lane == 0) *counter = n;
    }
    __syncthreads();
    return *counter;
  }
  int32_t j[kMaxBlocksPerWarp];
#pragma unroll
  for (int i = 0; i < kMaxBlocksPerWarp; ++i) {
    const int64_t e = int64_t(warp + i * warps) * 32 + lane;
    j[i] = warp + i * warps < blocks && e < a.K ? a.topk[t * a.K + e] : -1;
  }
  unsigned ballot[kMaxBlocksPerWarp];
#pragma unroll
  for (int i = 0; i < kMaxBlocksPerWarp; ++i) {
    ballot[i] = __ballot_sync(kFull, j[i] >= 0);
    if (lane == 0 && warp + i * warps < blocks) block_valid[warp + i * warps] = __popc(ballot[i]);
  }
  __syncthreads();
  int total = 0;  // valid entries of the blocks before block b, for each of this warp's blocks in turn
  int next = warp;
  for (int b = 0; b < blocks; ++b) {
    if (b == next) {
      const int i = (b - warp) / warps;
#pragma unroll
      for (int k = 0; k < kMaxBlocksPerWarp; ++k)
        if (k == i && j[k] >= 0) comp[total + __popc(ballot[k] & ((1u << lane) - 1u))] = j[k];
      next += warps;
    }
    total += block_valid[b];
  }
  __syncthreads();
  return total;
}

// simple: one CTA per (token, head), the reference loop: logits in the cpu::dot_f32
// order, the max, P = exp(l - M) (fp32 denominator summed in key order by one
// thread), bf16(P) times the values in key order per output dimension.
__global__ void __launch_bounds__(256) attention_simple_kernel(AttnArgs a) {
  wait_for_predecessor();
  extern __shared__ __align__(16) unsigned char attn_simple_smem[];
  const int64_t t = blockIdx.x, h = blockIdx.y, Dh = a.Dh;
  float* qf = reinterpret_cast<float*>(attn_simple_smem);  // [Dh]
  float* logit = qf + Dh;                                     // [max_keys]
  const uint8_t** kptr = reinterpret_cast<const uint8_t**>(logit + ((a.max_keys + 1) / 2) * 2);  // [max_keys]
  int* ktype = reinterpret_cast<int*>(kptr + a.max_keys);     // [max_keys]
  int32_t* comp = ktype + a.max_keys;                         // [K]
  __shared__ int s_count;
  __shared__ float s_max, s_denom;
  uint16_t* out = a.o + (t * a.H + h) * Dh;
  const int32_t s = a.token_seq[t];
  const int64_t p = a.positions[t];
  if (s < 0 || p < 0) {
    for (int64_t i = threadIdx.x; i < Dh; i += blockDim.x) out[i] = 0;
    return;
  }
  const int64_t start = a.seq_start_pos[s], begin = a.seq_begin[s], slot = a.seq_slot[s];
  const int64_t n_win = p + 1 < a.W ? p + 1 : a.W;
  int64_t n_comp = 0;
  // HCA rows past the block table resolve to nothing; not counting them keeps
  // n_keys <= max_keys (the split's partial buffers are sized by it).
  if (a.ratio == 4) n_comp = compact_topk(a, t, comp, &s_count);
  else if (a.ratio == 128) n_comp = min((p + 1) / 128, int64_t(a.max_blocks) * a.per_page);
  int64_t n = n_win + n_comp;
  if (n > a.max_keys) n = a.max_keys;  // host sizes max_keys for every visible key
  for (int64_t i = threadIdx.x; i < Dh; i += blockDim.x) qf[i] = bf2f(a.q[(t * a.H + h) * Dh + i]);
  for (int64_t u = threadIdx.x; u < n; u += blockDim.x) {
    const KeyRef k = resolve_key(a, s, p, start, begin, slot, n_win, comp, u);
    kptr[u] = k.ptr;
    ktype[u] = k.type;
  }
  __syncthreads();
  for (int64_t u = threadIdx.x; u < n; u += blockDim.x) {
    const KeyRef k{kptr[u], ktype[u]};
    if (k.type == 0) {
      logit[u] = -INFINITY;
      continue;
    }
    float acc0[8], acc1[8];
#pragma unroll
    for (int l = 0; l < 8; ++l) acc0[l] = acc1[l] = 0.0f;
    for (int64_t b = 0; b + 16 <= Dh; b += 16) {
#pragma unroll
      for (int l = 0; l < 8; ++l) {
        acc0[l] = __fadd_rn(acc0[l], __fmul_rn(qf[b + l], key_value(k, int(Dh), int(b + l))));
        acc1[l] = __fadd_rn(acc1[l], __fmul_rn(qf[b + 8 + l], key_value(k, int(Dh), int(b + 8 + l))));
      }
    }
    auto reduce8 = [](const float (&v)[8]) {
      return __fadd_rn(__fadd_rn(__fadd_rn(v[0], v[1]), __fadd_rn(v[2], v[3])),
                       __fadd_rn(__fadd_rn(v[4], v[5]), __fadd_rn(v[6], v[7])));
    };
    float dot = __fadd_rn(reduce8(acc0), reduce8(acc1));
    for (int64_t i = (Dh / 16) * 16; i < Dh; ++i) dot = __fadd_rn(dot, __fmul_rn(qf[i], key_value(k, int(Dh), int(i))));
    logit[u] = __fmul_rn(dot, a.scale);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int64_t u = 0; u < n; ++u) mx = fmaxf(mx, logit[u]);
    s_max = mx;
  }
  __syncthreads();
  const float mx = s_max;
  for (int64_t u = threadIdx.x; u < n; u += blockDim.x) logit[u] = exp_ref(__fsub_rn(logit[u], mx));  // P_u
  __syncthreads();
  if (threadIdx.x == 0) {
    float den = 0.0f;
    for (int64_t u = 0; u < n; ++u) den = __fadd_rn(den, logit[u]);
    s_denom = __fadd_rn(den, exp_ref(__fsub_rn(a.sink[h], mx)));
  }
  __syncthreads();
  const float den = s_denom;
  const int64_t rope_begin = Dh - kRope;
  for (int64_t i2 = threadIdx.x; i2 < Dh / 2; i2 += blockDim.x) {
    const int64_t i = 2 * i2;
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int64_t u = 0; u < n; ++u) {
      const KeyRef k{kptr[u], ktype[u]};
      if (k.type == 0) continue;
      const float pb = round_bf(logit[u]);
      acc0 = __fadd_rn(acc0, __fmul_rn(pb, key_value(k, int(Dh), int(i))));
      acc1 = __fadd_rn(acc1, __fmul_rn(pb, key_value(k, int(Dh), int(i + 1))));
    }
    float o0 = round_bf(__fdiv_rn(acc0, den)), o1 = round_bf(__fdiv_rn(acc1, den));
    if (i >= rope_begin) {  // spec §5.6: de-rotate at the query position
      float c, sn;
      rope_cos_sin(p, a.inv_freq[(i - rope_begin) / 2], &c, &sn);
      rope_pair_f(&o0, &o1, c, -sn);
    }
    out[i] = f2bf(o0);
    out[i + 1] = f2bf(o1);
  }
}

// Key segments: a row's keys are cut into segments of kSegmentKeys; each segment
// runs the online softmax from scratch to its own (o, m, l), and the segments are
// folded in segment order by fold_weights/fold_value. One CTA may walk all of a
// row's segments (folding as it goes) or several CTAs may each take some and
// leave partials for attention_combine_kernel; the arithmetic is the same, so a
// row's output does not depend on the batch it came in (two-batch overlap relies
// on this) while one token at a time still spreads over many SMs.
// The cut is ops/attention_order.h's, shared with the CPU's model of these kernels.
constexpr int kSegmentChunks = int(kAttentionSegmentChunks);
constexpr int kSegmentKeys = int(kAttentionSegmentKeys);

struct FoldWeights {
  float a, b, m;  // running scale, segment scale, new running max
};

// m = -inf (no valid key yet / in the segment) gives that side the weight 0.
__device__ __forceinline__ FoldWeights fold_weights(float m_run, float m_seg) {
  const float m = fmaxf(m_run, m_seg);
  const float ref = m == -INFINITY ? 0.0f : m;
  return {core::exp_f32_portable(m_run - ref), core::exp_f32_portable(m_seg - ref), m};
}

__device__ __forceinline__ float fold_value(float run, float seg, const FoldWeights& w) {
  return __fmaf_rn(seg, w.b, __fmul_rn(run, w.a));
}

// A row's segment is done (called by its softmax threads, with the row's running and
// folded (m, l)): a split CTA leaves (m, l) at ml_at() for attention_combine_kernel
// (stored by ml_writer); one CTA a row folds it into (M, L) in segment order and
// leaves the weights of the value fold at wa, wb (stored by writer).
template <class MlAt>
__device__ __forceinline__ void finish_segment(bool split, bool writer, bool ml_writer, MlAt ml_at, float* wa,
                                               float* wb, float& m_run, float& l_run, float& M_fold, float& L_fold) {
  if (split) {
    if (ml_writer) *reinterpret_cast<float2*>(ml_at()) = make_float2(m_run, l_run);
  } else {
    const FoldWeights w = fold_weights(M_fold, m_run);
    if (writer) {
      *wa = w.a;
      *wb = w.b;
    }
    L_fold = fold_value(L_fold, l_run, w);
    M_fold = w.m;
  }
  m_run = -INFINITY;
  l_run = 0.0f;
}

// The softmax denominator with the head's sink (spec §5.6).
__device__ __forceinline__ float attention_denominator(float l, float m, float sink) {
  return __fadd_rn(l, core::exp_f32_portable(sink - m));
}

// Where split CTAs leave their partials: o [T][H][max_segs][DH] fp32, (m, l)
// [T][H][max_segs][2], and each row's partial count [T] (0 for pad rows): a partial
// per segment (attention_mma_kernel), or fewer under the wgmma kernel's lead fold.
struct AttnSplit {
  int nsplit;  // CTAs per (token, head group); 1: no partials
  int max_segs;  // partials a (token, head) at most: the stride
  bool lead_fold;  // the wgmma kernel's lead fold (ops/cuda/attention_split.h)
  bool zero_fold;  // a wgmma CTA that leaves a partial a segment zeroes its unused fold state (A/B runs)
  float* o;
  float* ml;
  int32_t* segs;
};

// fast: one CTA per (token, group of MT x 16 heads, split); MT x 4 warps. Keys stream
// through shared memory 32 at a time: records are staged by cp.async one chunk
// ahead and decoded once per CTA into a bf16 tile. Warp (mt, r): S partial for
// m-tile mt over dims [r*DH/4, (r+1)*DH/4) (mma) into shared memory; then every
// thread sums the partials of 4 keys of one row in r order and runs that row's
// online softmax with the row's 7 other threads (row_softmax4: fp32, running max);
// bf16(P) and the row factors go through shared memory; warp (mt, r) computes
// bf16(P) . V over its quarter of the output dims (mma, V fragments by
// ldmatrix.trans).
constexpr int kKeysPerChunk = int(kAttentionChunkKeys);
static_assert(kKeysPerChunk == 32, "a chunk is the m16n8k16 softmax step's 32 keys");
constexpr int kSStride = 40;  // fp32

template <int DH, int MT>
struct AttnLayout {
  static constexpr int kRowBytes = (DH - kRope + 2 * kRope + (DH - kRope) / 64 + 7) / 8 * 8;
  static constexpr int kStride = DH + 8;  // bf16, Q and K tiles
  static constexpr int kThreads = MT * 128;
  static constexpr size_t kQ = size_t(MT) * 16 * kStride * 2;
  static constexpr size_t kK = size_t(kKeysPerChunk) * kStride * 2;
  static constexpr size_t kRaw = size_t(2) * kKeysPerChunk * kRowBytes;
  static constexpr size_t kS = size_t(MT) * 4 * 16 * kSStride * 4;
  static constexpr size_t kOffK = kQ;
  static constexpr size_t kOffRaw = kOffK + kK;
  static constexpr size_t kOffS = (kOffRaw + kRaw + 15) / 16 * 16;
  static constexpr size_t kOffPtr = kOffS + kS;                                  // [2][32] pointers
  static constexpr size_t kOffType = kOffPtr + 2 * kKeysPerChunk * 8;           // [2][32] int
  static constexpr size_t kOffLut = kOffType + 2 * kKeysPerChunk * 4;           // [256] fp32 e4m3
  static constexpr size_t kOffRope = kOffLut + 256 * 4;                         // [32] cos, [32] sin
  static constexpr int kPStride = kKeysPerChunk + 8;                            // bf16, P rows
  static constexpr size_t kOffP = kOffRope + kRope * 4;                         // [MT*16][kPStride] bf16(P)
  static constexpr size_t kOffRowStats = kOffP + size_t(MT) * 16 * kPStride * 2;  // [4][MT*16] fp32
  static constexpr size_t kOffComp = kOffRowStats + 4 * size_t(MT) * 16 * 4;    // [K] int
  static size_t bytes(int64_t K) { return kOffComp + size_t(K) * 4 + 16; }
};

// A row's keys for the tensor-core kernels: the window, min(W, p + 1) (*n_win), then
// the compressed rows (CSA: the valid top-k entries, compacted into comp[] in order;
// HCA: (p + 1) / 128, capped at the block table: rows past it resolve to nothing,
// and not counting them keeps the count <= max_keys, which sizes the split's
// partials). Returns the count; block-wide (the CSA compaction has barriers).
__device__ int64_t row_keys(const AttnArgs& a, int64_t t, int64_t p, int32_t* comp, int* counter, int64_t* n_win) {
  *n_win = p + 1 < a.W ? p + 1 : a.W;
  int64_t n_comp = 0;
  if (a.ratio == 4) n_comp = compact_topk(a, t, comp, counter);
  else if (a.ratio == 128) n_comp = min((p + 1) / 128, int64_t(a.max_blocks) * a.per_page);
  return *n_win + n_comp;
}

// The online softmax of one 32-key chunk of a row, spread over the row's 8 threads.
// Thread (row, tig, half) holds keys 8 nt + 2 tig + e for nt = 2 half, 2 half + 1 and
// e = 0, 1 (in v, that order): the keys of quad lane tig in the m16n8 accumulator
// layout, split in two. The order is fixed (the CPU's Hopper model reproduces it): the
// chunk's max over the 8 threads (order-free); m_new = max(m_run, it), its reference 0
// while no key is valid (a chunk of missing keys gives P = 0, not NaN); alpha =
// exp(m_run - m_ref); P = exp(v - m_ref) in place; each tig's sum of its 8 P in (nt, e)
// order, formed in both halves from the pair's values (shuffle), then the butterfly
// over tig ^ 1 and tig ^ 2; l = fma(l, alpha, sum). Both tensor-core attention kernels
// run it. All 8 threads of the row end with the same m_run, l_run and alpha.
__device__ __forceinline__ void row_softmax4(float (&v)[4], float& m_run, float& l_run, float& alpha) {
  float cmax = fmaxf(fmaxf(v[0], v[1]), fmaxf(v[2], v[3]));
  cmax = fmaxf(cmax, __shfl_xor_sync(kFull, cmax, 1));  // the other half
  cmax = fmaxf(cmax, __shfl_xor_sync(kFull, cmax, 2));  // tig ^ 1
  cmax = fmaxf(cmax, __shfl_xor_sync(kFull, cmax, 4));  // tig ^ 2
  const float m_new = fmaxf(m_run, cmax);
  const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
  alpha = core::exp_f32_portable(m_run - m_ref);
  m_run = m_new;
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = core::exp_f32_portable(v[i] - m_ref);
  float w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = __shfl_xor_sync(kFull, v[i], 1);
  const bool upper = threadIdx.x & 1;  // half 1: keys of nt 2, 3
  float psum = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) psum += upper ? w[i] : v[i];
#pragma unroll
  for (int i = 0; i < 4; ++i) psum += upper ? v[i] : w[i];
  psum += __shfl_xor_sync(kFull, psum, 2);
  psum += __shfl_xor_sync(kFull, psum, 4);
  l_run = __fmaf_rn(l_run, alpha, psum);
}

// f = the 8 codes' values (hardware conversion: NaN codes give the hardware's NaN) times sc.
__device__ __forceinline__ void e4m3x8_times(uint2 codes, float sc, float (&f)[8]) {
  const uint32_t cw[2] = {codes.x, codes.y};
#pragma unroll
  for (int p2 = 0; p2 < 4; ++p2) {
    const float2 x = e4m3x2_to_float2(cw[p2 >> 1] >> (16 * (p2 & 1)));
    f[2 * p2] = __fmul_rn(x.x, sc);
    f[2 * p2 + 1] = __fmul_rn(x.y, sc);
  }
}
// Whether all 8 products are exact in bf16 (their low 16 bits zero).
__device__ __forceinline__ bool bf16_exact8(const float (&f)[8]) {
  uint32_t low = 0;
#pragma unroll
  for (int e = 0; e < 8; ++e) low |= __float_as_uint(f[e]);
  return (low & 0xffffu) == 0;
}
// Eight e4m3 codes (one uint2, code e in byte e % 4 of word e / 4) times their
// UE8M0 block scale 2^(sb - 127) (sb the scale byte), as 8 bf16 values (one uint4), by
// e4m3x2_times_bf16x2's integer steps and a bf16 multiply by 2^(sb - 7) a pair (four
// operations a pair; the hardware conversion to f16, two widenings to f32, two f32
// multiplies, a byte permute and the exactness test took ~8). For 10 <= sb <= 134 every
// product of a finite code is a bf16 normal or zero (|code| >= 2^-9, 2^(sb - 7) a
// bf16 normal), so exact: the bits the f32 product's upper half gave before.
// Returns false, with v undefined, where a code is NaN or sb is outside that range: the
// caller then takes e4m3x8_scaled_bf16. Branch-free, so that a loop of them overlaps.
__device__ __forceinline__ bool e4m3x8_scaled_bf16_exact(uint2 codes, uint32_t sb, uint4& v) {
  const uint32_t factor = ((sb + 120u) << 7) * 0x00010001u;  // bf16 2^(sb - 7), both halves
  v = make_uint4(e4m3x2_times_bf16x2<0x9180>(codes.x, factor), e4m3x2_times_bf16x2<0xB3A2>(codes.x, factor),
                 e4m3x2_times_bf16x2<0x9180>(codes.y, factor), e4m3x2_times_bf16x2<0xB3A2>(codes.y, factor));
  return !(e4m3x4_has_nan(codes.x) | e4m3x4_has_nan(codes.y)) & (sb - 10u <= 124u);  // (&: no branch)
}
// The same for every input: the common case above, else each product in f32 (the
// table's value where a code is NaN, whose bits the table keeps), then the f32
// product's upper half where it is exact in bf16, else its bf16 rounding.
__device__ __forceinline__ uint4 e4m3x8_scaled_bf16(uint2 codes, uint32_t sb, const float* lut) {
  uint4 v;
  if (e4m3x8_scaled_bf16_exact(codes, sb, v)) return v;
  const float sc = core::e8m0_to_float(uint8_t(sb));
  float f[8];
  if (!(e4m3x4_has_nan(codes.x) | e4m3x4_has_nan(codes.y))) {
    e4m3x8_times(codes, sc, f);
  } else {
    const uint32_t cw[2] = {codes.x, codes.y};
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __fmul_rn(lut[(cw[e >> 2] >> (8 * (e & 3))) & 0xffu], sc);
  }
  const bool exact = bf16_exact8(f);
  uint32_t vw[4];
#pragma unroll
  for (int w2 = 0; w2 < 4; ++w2)
    vw[w2] = exact ? __byte_perm(__float_as_uint(f[2 * w2]), __float_as_uint(f[2 * w2 + 1]), 0x7632)
                   : pack_bf16(f[2 * w2], f[2 * w2 + 1]);
  return make_uint4(vw[0], vw[1], vw[2], vw[3]);
}

// Rope dims d0 .. d0 + 7 (d0 >= DH - kRope) of a staged KV record: bf16 there (8-byte
// aligned rows, hence two 8-byte loads).
template <int DH>
__device__ __forceinline__ uint4 rope_key8(const uint8_t* rec, int d0) {
  constexpr int kNope = DH - kRope;
  const uint2* src = reinterpret_cast<const uint2*>(rec + kNope + 2 * (d0 - kNope));
  const uint2 x0 = src[0], x1 = src[1];
  return make_uint4(x0.x, x0.y, x1.x, x1.y);
}

// Dims d0 .. d0 + 7 of one key as 8 bf16 values (one uint4): a staged KV record's
// e4m3 codes times their UE8M0 block scale (type 1, e4m3x8_scaled_bf16), its bf16
// rope part, this step's bf16 kv row (type 2, the row *row_ptr points at; read only
// then) or zeros (type 0, a missing key). The tensor-core attention kernels decode
// through these functions, so their key tiles hold the same bits.
template <int DH>
__device__ __forceinline__ uint4 decode_key8(int type, const uint8_t* rec, const uint8_t* const* row_ptr, int d0,
                                             const float* lut) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (type == 1) {
    constexpr int kNope = DH - kRope;
    if (d0 < kNope) {
      const uint2 codes = *reinterpret_cast<const uint2*>(rec + d0);
      v = e4m3x8_scaled_bf16(codes, rec[kNope + 2 * kRope + d0 / 64], lut);
    } else {
      v = rope_key8<DH>(rec, d0);
    }
  } else if (type == 2) {
    v = *reinterpret_cast<const uint4*>(reinterpret_cast<const uint16_t*>(*row_ptr) + d0);
  }
  return v;
}

// kEarly: as attention_wgmma_kernel's (the metadata and tables before the dependency
// wait, Q by cp.async after it); the same bits.
template <int DH, int MT, bool kEarly>
__global__ void __launch_bounds__(MT * 128, 1) attention_mma_kernel(AttnArgs a, int head_groups, AttnSplit sp) {
  if constexpr (!kEarly) wait_for_predecessor();
  using L = AttnLayout<DH, MT>;
  constexpr int kQuarter = DH / 4;
  constexpr int kQkSteps = kQuarter / 16;  // k-steps of 16 dims per warp in S
  constexpr int kONt = kQuarter / 8;       // n-tiles of 8 output dims per warp
  static_assert(kONt % 2 == 0, "output n-tiles come in ldmatrix pairs");
  extern __shared__ __align__(16) unsigned char attn_smem[];
  uint16_t* Qs = reinterpret_cast<uint16_t*>(attn_smem);
  uint16_t* Ks = reinterpret_cast<uint16_t*>(attn_smem + L::kOffK);
  uint8_t* raw = attn_smem + L::kOffRaw;
  float* Sp = reinterpret_cast<float*>(attn_smem + L::kOffS);
  const uint8_t** kptr = reinterpret_cast<const uint8_t**>(attn_smem + L::kOffPtr);
  int* ktype = reinterpret_cast<int*>(attn_smem + L::kOffType);
  float* lut = reinterpret_cast<float*>(attn_smem + L::kOffLut);
  float* rope_c = reinterpret_cast<float*>(attn_smem + L::kOffRope);
  float* rope_s = rope_c + kRope / 2;
  int32_t* comp = reinterpret_cast<int32_t*>(attn_smem + L::kOffComp);
  uint32_t* Pw = reinterpret_cast<uint32_t*>(attn_smem + L::kOffP);  // bf16 pairs, L::kPStride / 2 words a row
  float* row_alpha = reinterpret_cast<float*>(attn_smem + L::kOffRowStats);
  float* row_wa = row_alpha + MT * 16;  // the segment fold's weights
  float* row_wb = row_wa + MT * 16;
  float* row_den = row_wb + MT * 16;
  __shared__ int s_count;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const int mt = warp >> 2, r = warp & 3;
  // The softmax role of this thread (row_softmax4): row sr of the CTA's MT x 16, its
  // quad lane stig and key half shalf.
  const int sr = tid >> 3, stig = (tid >> 1) & 3, shalf = tid & 1;
  constexpr int kPWords = L::kPStride / 2;
  const bool split = MT == 1 && sp.nsplit > 1;  // the launcher splits only with one m-tile
  const int split_id = int(blockIdx.x % unsigned(sp.nsplit));
  const int64_t tg = blockIdx.x / unsigned(sp.nsplit);
  const int64_t t = tg / head_groups, h0 = int64_t(tg % head_groups) * MT * 16;
  const bool row_leader = split && split_id == 0 && tg % head_groups == 0 && tid == 0;
  const int64_t H = a.H;
  const int32_t s = a.token_seq[t];
  const int64_t p = a.positions[t];
  const bool pad = s < 0 || p < 0;
  int64_t start = 0, begin = 0, slot = 0;
  const auto tables = [&] {  // the e4m3 values; the RoPE rotations (double-precision cos and sin)
    for (int i = tid; i < 256; i += blockDim.x) lut[i] = core::e4m3_to_float(uint8_t(i));
    for (int i = tid; i < kRope / 2; i += blockDim.x) {
      float c, sn;
      rope_cos_sin(p, a.inv_freq[i], &c, &sn);
      rope_c[i] = c;
      rope_s[i] = sn;
    }
  };
  if constexpr (kEarly) {
    if (!pad) {
      row_sequence(a, s, start, begin, slot);
      tables();
    }
    wait_for_predecessor();
  }
  if (pad) {  // pad rows: zeros (split: the combine kernel writes them)
    if (row_leader) sp.segs[t] = 0;
    if (split) return;
    for (int64_t i = tid; i < int64_t(MT) * 16 * DH; i += blockDim.x) {
      const int64_t h = h0 + i / DH;
      if (h < H) a.o[(t * H + h) * DH + i % DH] = 0;
    }
    return;
  }
  if constexpr (kEarly) {  // Q by cp.async (the first copy group; zero rows past the heads)
    for (int64_t i = tid; i < int64_t(MT) * 16 * (DH / 8); i += blockDim.x) {
      const int64_t hl = i / (DH / 8), c = (i % (DH / 8)) * 8, h = h0 + hl;
      if (h < H) cp_async16(Qs + hl * L::kStride + c, a.q + (t * H + h) * DH + c);
      else *reinterpret_cast<uint4*>(Qs + hl * L::kStride + c) = make_uint4(0, 0, 0, 0);
    }
    cp_async_commit();
  } else {
    row_sequence(a, s, start, begin, slot);
  }
  int64_t n_win = 0;
  const int64_t n_keys = row_keys(a, t, p, comp, &s_count, &n_win);
  const int64_t chunks = (n_keys + kKeysPerChunk - 1) / kKeysPerChunk;
  const int64_t n_segs = (chunks + kSegmentChunks - 1) / kSegmentChunks;
  if (row_leader) sp.segs[t] = int32_t(n_segs);
  // This CTA's chunks: those of segments split_id, split_id + nsplit, ...
  int64_t my_chunks = chunks;
  if (split) {
    my_chunks = 0;
    for (int64_t g2 = split_id; g2 < n_segs; g2 += sp.nsplit)
      my_chunks += chunks - g2 * kSegmentChunks < kSegmentChunks ? chunks - g2 * kSegmentChunks : kSegmentChunks;
  }
  if (my_chunks == 0) {  // uniform over the CTA
    if constexpr (kEarly) cp_async_wait<0>();  // (Q's copies land before the CTA leaves)
    return;
  }
  auto chunk_of = [&](int64_t i) {
    if (!split) return i;
    return (split_id + (i / kSegmentChunks) * sp.nsplit) * kSegmentChunks + i % kSegmentChunks;
  };

  if constexpr (!kEarly) {
    for (int64_t i = tid; i < int64_t(MT) * 16 * (DH / 8); i += blockDim.x) {
      const int64_t hl = i / (DH / 8), c = (i % (DH / 8)) * 8, h = h0 + hl;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (h < H) v = *reinterpret_cast<const uint4*>(a.q + (t * H + h) * DH + c);
      *reinterpret_cast<uint4*>(Qs + hl * L::kStride + c) = v;
    }
    tables();
  }
  auto resolve = [&](int64_t chunk, int buf) {  // warp 0
    const int64_t u = chunk * kKeysPerChunk + lane;
    KeyRef k{nullptr, 0};
    if (u < n_keys) k = resolve_key(a, s, p, start, begin, slot, n_win, comp, u);
    kptr[buf * kKeysPerChunk + lane] = k.ptr;
    ktype[buf * kKeysPerChunk + lane] = k.type;
  };
  // All threads: the records of the resolved chunk, one warp per key, its lanes on
  // the record's 8-byte pieces. (A flat loop over (key, piece) spent ~25
  // instructions per piece on the division by the piece count and the per-piece
  // key lookups: ~12% of the kernel's instructions at batch 64, ncu.)
  auto issue = [&](int buf) {
    constexpr int kPieces = L::kRowBytes / 8;
    const int warps = int(blockDim.x) >> 5;
    for (int k = warp; k < kKeysPerChunk; k += warps) {
      if (ktype[buf * kKeysPerChunk + k] != 1) continue;  // uniform over the warp
      const uint8_t* src = kptr[buf * kKeysPerChunk + k];
      uint8_t* dst = raw + (size_t(buf) * kKeysPerChunk + k) * L::kRowBytes;
#pragma unroll
      for (int piece = lane; piece < kPieces; piece += 32) cp_async8(dst + 8 * piece, src + 8 * piece);
    }
    cp_async_commit();
  };
  __syncthreads();  // comp[] (compact_topk ends with a barrier), Qs (the late form), tables
  if (warp == 0) resolve(chunk_of(0), 0);
  __syncthreads();
  issue(0);

  // (o, m, l) of the current segment; (O, M, L) the fold of the finished ones.
  // With 4 m-tiles (512 threads, 128 registers each) the fold would not fit in
  // registers next to o (ptxas spills inside the chunk loop), so it lives in
  // local memory, touched only once per segment.
  constexpr bool kFoldInLocal = MT == 4;
  float o[kONt][4];
  float O_reg[kFoldInLocal ? 1 : kONt][4] = {};
  volatile float O_loc[kFoldInLocal ? kONt * 4 : 1];
  auto O_get = [&](int nt, int e) -> float {
    if constexpr (kFoldInLocal) return O_loc[nt * 4 + e];
    else return O_reg[nt][e];
  };
  auto O_set = [&](int nt, int e, float v) {
    if constexpr (kFoldInLocal) O_loc[nt * 4 + e] = v;
    else O_reg[nt][e] = v;
  };
#pragma unroll
  for (int nt = 0; nt < kONt; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      o[nt][e] = 0.0f;
      O_set(nt, e, 0.0f);
    }
  // Softmax state of row sr (every thread of the row holds the same values).
  float m_run = -INFINITY, l_run = 0.0f, M_fold = -INFINITY, L_fold = 0.0f;

  for (int64_t i = 0; i < my_chunks; ++i) {
    const int64_t c = chunk_of(i);
    const int buf = int(i & 1);
    __syncthreads();  // the previous chunk's readers of ktype/kptr[buf ^ 1] and of Ks are done
    if (warp == 0 && i + 1 < my_chunks) resolve(chunk_of(i + 1), buf ^ 1);
    __syncthreads();
    if (i + 1 < my_chunks) issue(buf ^ 1);
    else cp_async_commit();  // an empty group keeps the wait count uniform
    cp_async_wait<1>();
    __syncthreads();
    // Decode the chunk into Ks: thread -> (key = i % 32, 8 dims = i / 32).
    for (int i = tid; i < kKeysPerChunk * (DH / 8); i += blockDim.x) {
      const int k = i % kKeysPerChunk, d0 = (i / kKeysPerChunk) * 8;
      const int type = ktype[buf * kKeysPerChunk + k];
      const uint4 v = decode_key8<DH>(type, raw + (size_t(buf) * kKeysPerChunk + k) * L::kRowBytes,
                                      kptr + buf * kKeysPerChunk + k, d0, lut);
      *reinterpret_cast<uint4*>(Ks + k * L::kStride + d0) = v;
    }
    __syncthreads();
    // S partials: m-tile mt, dims of quarter r, 4 n-tiles of 8 keys.
    {
      float sacc[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kQkSteps; ++ks) {
        const int kk = r * kQuarter + ks * 16 + 2 * tig;
        const uint16_t* q0 = Qs + (mt * 16 + g) * L::kStride + kk;
        const uint32_t af[4] = {lds32(q0), lds32(q0 + 8 * L::kStride), lds32(q0 + 8), lds32(q0 + 8 * L::kStride + 8)};
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const uint16_t* k0 = Ks + (nt * 8 + g) * L::kStride + kk;
          mma_bf16(sacc[nt], af, lds32(k0), lds32(k0 + 8));
        }
      }
      float* sp = Sp + ((mt * 4 + r) * 16) * kSStride;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        *reinterpret_cast<float2*>(sp + g * kSStride + nt * 8 + 2 * tig) = make_float2(sacc[nt][0], sacc[nt][1]);
        *reinterpret_cast<float2*>(sp + (g + 8) * kSStride + nt * 8 + 2 * tig) = make_float2(sacc[nt][2], sacc[nt][3]);
      }
    }
    __syncthreads();
    // Softmax of row sr, keys 8 nt + 2 stig + e (nt = 2 shalf + j): S as the sum of
    // the four dim-quarter partials in quarter order, scaled, -inf for missing keys.
    const bool seg_end = c % kSegmentChunks == kSegmentChunks - 1 || c + 1 == chunks;
    {
      const int smt = sr >> 4, srl = sr & 15;
      float sv[4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = (2 * shalf + j) * 8 + 2 * stig;
        float x0 = 0.0f, x1 = 0.0f;
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
          const float2 x = *reinterpret_cast<const float2*>(Sp + ((smt * 4 + rr) * 16 + srl) * kSStride + col);
          x0 += x.x;
          x1 += x.y;
        }
        sv[2 * j] = ktype[buf * kKeysPerChunk + col] != 0 ? x0 * a.scale : -INFINITY;
        sv[2 * j + 1] = ktype[buf * kKeysPerChunk + col + 1] != 0 ? x1 * a.scale : -INFINITY;
      }
      float alpha;
      row_softmax4(sv, m_run, l_run, alpha);
      // bf16(P) for the P.V warps: the A-fragment words of keys 8 nt + 2 stig, + 1.
#pragma unroll
      for (int j = 0; j < 2; ++j) Pw[sr * kPWords + (2 * shalf + j) * 4 + stig] = pack_bf16(sv[2 * j], sv[2 * j + 1]);
      const bool writer = stig == 0 && shalf == 0;
      if (writer) row_alpha[sr] = alpha;
      if (seg_end) {  // the segment is done: its (m, l) into the fold (or the split's partials)
        const int64_t h = h0 + sr;
        const auto ml_at = [&] { return sp.ml + ((t * H + h) * sp.max_segs + c / kSegmentChunks) * 2; };
        finish_segment(split, writer, writer && h < H, ml_at, &row_wa[sr], &row_wb[sr], m_run, l_run, M_fold, L_fold);
      }
    }
    __syncthreads();  // P and the row factors
    float alpha[2] = {row_alpha[mt * 16 + g], row_alpha[mt * 16 + g + 8]};
#pragma unroll
    for (int nt = 0; nt < kONt; ++nt) {
      o[nt][0] *= alpha[0];
      o[nt][1] *= alpha[0];
      o[nt][2] *= alpha[1];
      o[nt][3] *= alpha[1];
    }
    // bf16(P) as A fragments: k-step ks covers keys 16ks .. 16ks + 15.
    uint32_t pa[2][4];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const uint32_t* p0 = Pw + (mt * 16 + g) * kPWords + 8 * ks + tig;
      pa[ks][0] = p0[0];
      pa[ks][1] = p0[8 * kPWords];
      pa[ks][2] = p0[4];
      pa[ks][3] = p0[8 * kPWords + 4];
    }
#pragma unroll
    for (int ks = 0; ks < 2; ++ks)
#pragma unroll
      for (int np = 0; np < kONt / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, Ks + (ks * 16 + (lane & 15)) * L::kStride + r * kQuarter + np * 16 + (lane >> 4) * 8);
        mma_bf16(o[2 * np], pa[ks], b[0], b[1]);
        mma_bf16(o[2 * np + 1], pa[ks], b[2], b[3]);
      }
    if (seg_end) {
      const int64_t seg = c / kSegmentChunks;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = mt * 16 + g + 8 * hh;
        if (split) {
          const int64_t h = h0 + row;
          if (h < H) {
            const int64_t prow = (t * H + h) * sp.max_segs + seg;
#pragma unroll
            for (int nt = 0; nt < kONt; ++nt)
              *reinterpret_cast<float2*>(sp.o + prow * DH + r * kQuarter + nt * 8 + 2 * tig) =
                  make_float2(o[nt][2 * hh], o[nt][2 * hh + 1]);
          }
        } else {
          const FoldWeights w{row_wa[row], row_wb[row], 0.0f};
#pragma unroll
          for (int nt = 0; nt < kONt; ++nt) {
            O_set(nt, 2 * hh, fold_value(O_get(nt, 2 * hh), o[nt][2 * hh], w));
            O_set(nt, 2 * hh + 1, fold_value(O_get(nt, 2 * hh + 1), o[nt][2 * hh + 1], w));
          }
        }
#pragma unroll
        for (int nt = 0; nt < kONt; ++nt) o[nt][2 * hh] = o[nt][2 * hh + 1] = 0.0f;
      }
    }
  }
  cp_async_wait<0>();
  if (split) return;  // attention_combine_kernel finishes the rows

  // O / (L + exp(sink - M)), bf16, inverse RoPE of the last 64 dims at p (spec §5.6).
  if (stig == 0 && shalf == 0 && h0 + sr < H) row_den[sr] = attention_denominator(L_fold, M_fold, a.sink[h0 + sr]);
  __syncthreads();
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t h = h0 + mt * 16 + g + 8 * hh;
    if (h >= H) continue;
    const float den = row_den[mt * 16 + g + 8 * hh];
    uint16_t* oh = a.o + (t * H + h) * DH;
#pragma unroll
    for (int nt = 0; nt < kONt; ++nt) {
      const int d = r * kQuarter + nt * 8 + 2 * tig;
      float x0 = round_bf(__fdiv_rn(O_get(nt, 2 * hh), den)), x1 = round_bf(__fdiv_rn(O_get(nt, 2 * hh + 1), den));
      if (d >= DH - kRope) {
        const int pair = (d - (DH - kRope)) / 2;
        rope_pair_f(&x0, &x1, rope_c[pair], -rope_s[pair]);
      }
      *reinterpret_cast<uint32_t*>(oh + d) = pack_bf16(x0, x1);
    }
  }
}

// Finishes rows whose segments split CTAs left in AttnSplit: folds the partials in
// order from an empty state exactly as attention_mma_kernel folds segments in
// registers (a lead CTA's folded state is one partial), then O / (L + exp(sink - M)),
// bf16, inverse RoPE. One CTA per (token, head), 4 dims per thread. kEarly: the
// rotations (the step's positions, the frequencies; a double-precision cos and sin
// each) and the sink before the dependency wait, not after the fold.
template <int DH, bool kEarly>
__global__ void __launch_bounds__(DH / 4) attention_combine_kernel(AttnArgs a, AttnSplit sp) {
  const int64_t t = blockIdx.x / a.H, h = blockIdx.x % a.H;
  const int d = 4 * threadIdx.x;
  float rc[2] = {1.0f, 1.0f}, rs[2] = {0.0f, 0.0f}, sink = 0.0f;  // (a dim pair below the RoPE dims: unused)
  const auto rotations = [&] {
    const int64_t p = a.positions[t];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int dk = d + 2 * k;
      if (dk >= DH - kRope) rope_cos_sin(p, a.inv_freq[(dk - (DH - kRope)) / 2], &rc[k], &rs[k]);
    }
    sink = a.sink[h];
  };
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kAttnCombine, a.sink);
  if constexpr (kEarly) rotations();
  wait_for_predecessor();
  DSV4_CTA_PROBE(CtaProbeSite::kAttnCombine, 1, a.sink);  // waited
  uint16_t* out = a.o + (t * a.H + h) * DH + d;
  const int32_t n_segs = sp.segs[t];
  if (n_segs == 0) {  // pad row
    *reinterpret_cast<uint2*>(out) = make_uint2(0, 0);
    return;
  }
  const int64_t row0 = (t * a.H + h) * sp.max_segs;
  float O[4] = {0.0f, 0.0f, 0.0f, 0.0f}, M = -INFINITY, L = 0.0f;
  constexpr int kBatch = 4;  // segments loaded before they are folded
  for (int32_t s0 = 0; s0 < n_segs; s0 += kBatch) {
    float4 ov[kBatch];
    float2 ml[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
      if (s0 + k < n_segs) {
        ov[k] = *reinterpret_cast<const float4*>(sp.o + (row0 + s0 + k) * DH + d);
        ml[k] = *reinterpret_cast<const float2*>(sp.ml + (row0 + s0 + k) * 2);
      }
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
      if (s0 + k < n_segs) {
        const FoldWeights w = fold_weights(M, ml[k].x);
        O[0] = fold_value(O[0], ov[k].x, w);
        O[1] = fold_value(O[1], ov[k].y, w);
        O[2] = fold_value(O[2], ov[k].z, w);
        O[3] = fold_value(O[3], ov[k].w, w);
        L = fold_value(L, ml[k].y, w);
        M = w.m;
      }
  }
  if constexpr (!kEarly) rotations();
  const float den = attention_denominator(L, M, sink);
  uint32_t packed[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    float x0 = round_bf(__fdiv_rn(O[2 * k], den)), x1 = round_bf(__fdiv_rn(O[2 * k + 1], den));
    if (d + 2 * k >= DH - kRope) rope_pair_f(&x0, &x1, rc[k], -rs[k]);
    packed[k] = pack_bf16(x0, x1);
  }
  *reinterpret_cast<uint2*>(out) = make_uint2(packed[0], packed[1]);
}


// ================================================================================
// sparse_attention on wgmma for V4-Flash's shape (Dh = 512, 64 heads): one CTA per
// token, four warpgroups; docs/design/cuda-attention.md, "Next: sparse attention on
// wgmma". It computes attention_mma_kernel's bits (a row's 64-key segments folded
// in order without a split), so the CPU's Hopper model and the byte comparison with
// that kernel both test it:
//  * a tile's 64 keys are decoded once into a K tile (8 buffers of 64 keys x 64
//    dims, 128-byte swizzle); Q sits in the same layout for the whole row;
//  * S: warpgroup r chains the 8 k16 steps of dims quarter r from zero (m64n64,
//    both operands from shared memory) and leaves its partial in shared memory;
//    each of a head's 8 threads adds (((0 + p0) + p1) + p2) + p3 for its 4 keys of a
//    32-key chunk, the present kernel's order;
//  * the online softmax per 32-key chunk spread over all 512 threads as in the
//    present kernel (row_softmax4, 8 threads a head), which leave bf16(P)
//    [head][key], alpha and the segment's fold weights per head in shared memory;
//  * O transposed: warpgroup r owns dims 128r .. 128r + 127 as two m64n64 tiles
//    (rows dims, columns heads); per chunk o *= alpha(head), then two k16 steps with
//    A = V^T from the K tile (ldmatrix.trans into the m16n8k16 A layout) and
//    B = bf16(P) from shared memory (K-major, heads as rows): the same k16 products
//    and accumulator as the present kernel's two mma.sync steps;
//  * the segment fold and the output as in attention_mma_kernel, the fold O in
//    local memory (touched once a segment; 512 threads leave 128 registers each).
// The kernel steps through 64-key tiles (a segment is kTilesPerSeg of them); the next
// tile's records are fetched (cp.async) while the current one runs its softmax and
// P.V products.
namespace wg_attn {
constexpr int kDh = 512, kHeads = 64, kTileKeys = 64, kThreads = 512;
// A tile is the kernel's step (its records staged, decoded and multiplied at once);
// a segment of the fold order (ops/attention_order.h) is kTilesPerSeg tiles.
constexpr int kTilesPerSeg = kSegmentKeys / kTileKeys;
static_assert(kSegmentKeys % kTileKeys == 0, "a segment is whole tiles");
constexpr int kBuf = 64 * 128;  // 64 rows x 64 bf16, one swizzled buffer
constexpr int kRowBytes = AttnLayout<kDh, 1>::kRowBytes;
constexpr int kSpStride = 64 + 8;  // fp32, rows of the S partials

// A CTA's shared memory. One CTA a row (kPair false) or half a row's dims (the pair
// form, below):
//  * Q [64 heads][its dims] and the tile's keys [64][its dims], 64-dim buffers; the
//    output tile over Q at the end;
//  * the S partials of its dims quarters [quarter][64 heads][kSpStride] fp32. One CTA a
//    row: they take the P area and the start of the staging area (the tile's records
//    were decoded before them, and the next tile's are fetched and P written only after
//    every partial has been read). The pair: apart, since the other CTA reads them
//    while this one writes P and fetches the next records;
//  * bf16(P) [64 heads][64 keys], swizzled; the staged records [64][kRowBytes];
//  * key pointers and types [2][64], per-head values, the e4m3 table, the output's
//    RoPE table, the compacted top-k [K].
template <bool kPair>
struct Layout {
  static constexpr int kCtaDh = kPair ? kDh / 2 : kDh;  // the dims this CTA decodes, multiplies and outputs
  static constexpr int kBufs = kCtaDh / 64;
  static constexpr int kQuarters = kBufs / 2;  // its S partials (a quarter: 128 dims)
  static constexpr int kWgDh = kCtaDh / 4;     // P.V dims a warpgroup
  static constexpr int kMb = kWgDh / 64;       // ... in m64 tiles
  static constexpr size_t kOffQ = 0;
  static constexpr size_t kOffK = kOffQ + size_t(kBufs) * kBuf;
  static constexpr size_t kOffS = kOffK + size_t(kBufs) * kBuf;
  static constexpr size_t kSpBytes = size_t(kQuarters) * kHeads * kSpStride * 4;
  static constexpr size_t kOffP = kPair ? kOffS + kSpBytes : kOffS;
  static constexpr size_t kOffRaw = kPair ? kOffP + size_t(kHeads) * kTileKeys * 2 : kOffS + 48 * 1024;
  static_assert(kPair || kOffS + kSpBytes <= kOffRaw + size_t(kTileKeys) * kRowBytes,
                "the S partials overrun the staging area");
  static_assert(kOffP % 1024 == 0, "P is one swizzled buffer");
  static constexpr size_t kOffPtr = (kOffRaw + size_t(kTileKeys) * kRowBytes + 15) / 16 * 16;
  static constexpr size_t kOffType = kOffPtr + 2 * kTileKeys * 8;
  static constexpr size_t kOffHead = kOffType + 2 * kTileKeys * 4;  // alpha of chunk 0, of chunk 1, fold a, b, denominator
  static constexpr size_t kOffLut = kOffHead + 5 * kHeads * 4;
  static constexpr size_t kOffRope = kOffLut + 256 * 4;  // [32] cos, [32] sin
  static constexpr size_t kOffComp = kOffRope + kRope * 4;
  // + 1024: the base is aligned up to the swizzle atom inside the allocation.
  static size_t bytes(int64_t K) { return kOffComp + size_t(K) * 4 + 1024; }
};
inline size_t bytes(int64_t K) { return Layout<false>::bytes(K); }
}  // namespace wg_attn

// kSplit: the launch splits rows over CTAs (sp.nsplit > 1); the one-CTA-a-row instance
// carries none of the split's indexing. (At its 128-register cap, ptxas's share of
// local memory moves with every edit, and 128-256-row steps with it by up to ±0.5%:
// docs/design/cuda-attention.md, twenty-seventh session.)
//
// kEarly (DSV4_CUDA_ATTN_EARLY, default on; off for A/B runs): the row's metadata (the
// step's positions and sequences, uploaded before the step; no kernel writes them), the
// e4m3 table and the output's inverse RoPE table before the dependency wait, and after
// it Q copied by cp.async, in flight under the top-k compaction and the key lookups
// (its loads into registers had to return before those began). The same bits. The
// launcher takes it for split launches and the register fold (see there).
//
// kPair: a row's 512 dims over a cluster of two CTAs, 256 each (docs/design/cuda-attention.md,
// fifty-fourth session). Each CTA decodes its half of the tile's keys, computes its two dims
// quarters' S partials and reads the other two from the other CTA's shared memory, adding
// all four in quarter order as one CTA a row does; both run the whole softmax (the same
// values); each multiplies, folds and outputs its own dims. So the bits are those of one
// CTA a row, with half the decode, products and fold a CTA, and the fold O in registers.
//
// kFoldRegs (one CTA a row, DSV4_CUDA_ATTN_FOLD_REGS; docs/design/cuda-attention.md,
// hundred-fourth session): the fold state O in registers (64 a thread) instead of local
// memory. The 64 registers it needs come from o: a warpgroup's P.V runs one m64 tile of
// its dims at a time (o 32 registers, not 64), each tile's chunks then its fold before
// the next tile. A segment being one tile, o never outlives a tile, and each output
// value's steps (o from zero, *alpha, the k16 products, the fold) are those of the other
// instances: the same bits.
template <bool kSplit, bool kEarly, bool kPair = false, bool kFoldRegs = false>
__global__ void __launch_bounds__(wg_attn::kThreads, 1) attention_wgmma_kernel(AttnArgs a, AttnSplit sp) {
  namespace W = wg_attn;
  namespace tc = tensor_core;
  using L = W::Layout<kPair>;
  static_assert(!kFoldRegs || (!kSplit && !kPair), "the register fold is one CTA a row's");
  static_assert(!kFoldRegs || W::kTilesPerSeg == 1, "the register fold takes a segment a tile (o lives one tile)");
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kAttention, a.sink);
  if constexpr (!kEarly) {
    wait_for_predecessor();
    DSV4_CTA_PROBE(CtaProbeSite::kAttention, 1, a.sink);  // waited
  }
  extern __shared__ __align__(16) unsigned char wg_smem_raw[];  // aligned to the swizzle atom below
  unsigned char* sm = wg_smem_raw + ((1024u - (smem_addr(wg_smem_raw) & 1023u)) & 1023u);
  uint8_t* Qs = sm + L::kOffQ;
  uint8_t* Ks = sm + L::kOffK;
  float* Sp = reinterpret_cast<float*>(sm + L::kOffS);
  uint8_t* Ps = sm + L::kOffP;  // bf16(P) [64 heads][64 keys] (one CTA a row: over the partials once they are read)
  uint8_t* raw = sm + L::kOffRaw;
  const uint8_t** kptr = reinterpret_cast<const uint8_t**>(sm + L::kOffPtr);
  int* ktype = reinterpret_cast<int*>(sm + L::kOffType);
  float* alpha_s = reinterpret_cast<float*>(sm + L::kOffHead);  // [2][64]: a chunk's writes never meet the other's reads
  float* fold_a = alpha_s + 2 * W::kHeads;
  float* fold_b = fold_a + W::kHeads;
  float* den_s = fold_b + W::kHeads;
  float* lut = reinterpret_cast<float*>(sm + L::kOffLut);
  float* rope_c = reinterpret_cast<float*>(sm + L::kOffRope);
  float* rope_s = rope_c + kRope / 2;
  int32_t* comp = reinterpret_cast<int32_t*>(sm + L::kOffComp);
  __shared__ int s_count;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  // wg through a shuffle from lane 0: ptxas then knows it is warp-uniform. Taken as
  // tid >> 7 inside a divergent block around the accumulators, it had ptxas serialize
  // the P.V wgmmas ("C7520 ... WG.AR in divergent path"; docs/BENCHMARKS.md, tenth
  // session). CUTLASS takes its warp-group index the same way.
  const int wg = __shfl_sync(kFull, tid >> 7, 0), ww = warp & 3;
  // Split (sp.nsplit > 1): CTAs take the row's segments in turn and leave each one's
  // (o, m, l) to attention_combine_kernel, which folds them in order. Under the lead
  // fold (ops/cuda/attention_split.h) CTA 0 first folds the row's leading segments as
  // one CTA a row does and leaves that state as the row's first partial, the others
  // taking the later segments in turn. Otherwise one CTA folds the whole row.
  constexpr bool split = kSplit;
  // The pair: clusters of two consecutive CTAs (cluster rank = blockIdx.x % 2); CTA
  // `half` takes dims 256 half .. 256 half + 255. Both take the same segments.
  const uint32_t half = kPair ? blockIdx.x & 1u : 0u;
  const int dim0 = kPair ? 256 * int(half) : 0;
  const unsigned cta = kPair ? blockIdx.x >> 1 : blockIdx.x;
  const int split_id = split ? int(cta % unsigned(sp.nsplit)) : 0;
  const int64_t tok = split ? cta / unsigned(sp.nsplit) : cta;
  const bool row_leader = split && split_id == 0 && tid == 0 && half == 0;
  const bool ml_cta = half == 0;  // the CTA that stores (m, l) partials (the pair's are equal)
  uint16_t* out = a.o + tok * W::kHeads * W::kDh;
  const int32_t s = a.token_seq[tok];
  const int64_t p = a.positions[tok];
  const bool pad = s < 0 || p < 0;
  int64_t start = 0, begin = 0, slot = 0;
  const auto e4m3_table = [&] {
    for (int i = tid; i < 256; i += W::kThreads) lut[i] = core::e4m3_to_float(uint8_t(i));
  };
  // The output's inverse RoPE table, warp 1 (its double-precision cos and sin take a
  // while); split CTAs leave the output to the combine kernel.
  const auto rope_table = [&] {
    if (warp == 1 && !split) {
      static_assert(kRope / 2 == 32, "a lane a rotation pair");
      float c, sn;
      rope_cos_sin(p, a.inv_freq[lane], &c, &sn);
      rope_c[lane] = c;
      rope_s[lane] = sn;
    }
  };
  if constexpr (kEarly) {
    if (!pad) {
      row_sequence(a, s, start, begin, slot);
      e4m3_table();
      rope_table();
    }
    wait_for_predecessor();
    DSV4_CTA_PROBE(CtaProbeSite::kAttention, 1, a.sink);  // waited
  }
  if (pad) {  // pad rows: zeros (split: the combine kernel writes them)
    if (row_leader) sp.segs[tok] = 0;
    if constexpr (!split && !kPair)
      for (int i = tid; i < W::kHeads * W::kDh / 8; i += W::kThreads) reinterpret_cast<uint4*>(out)[i] = make_uint4(0, 0, 0, 0);
    if constexpr (!split && kPair)
      for (int i = tid; i < W::kHeads * L::kCtaDh / 8; i += W::kThreads)
        *reinterpret_cast<uint4*>(out + (i / (L::kCtaDh / 8)) * W::kDh + dim0 + 8 * (i % (L::kCtaDh / 8))) =
            make_uint4(0, 0, 0, 0);
    return;
  }
  if constexpr (kEarly) {  // Q: 16-byte piece pc of head h, by cp.async (the first copy group)
    constexpr int kLoads = W::kHeads * (L::kCtaDh / 8) / W::kThreads;
    static_assert(kLoads * W::kThreads == W::kHeads * (L::kCtaDh / 8), "whole pieces a thread");
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int i = tid + j * W::kThreads, h = i / (L::kCtaDh / 8), pc = i % (L::kCtaDh / 8);
      cp_async16(Qs + (pc >> 3) * W::kBuf + tc::sw128_offset(h, pc & 7),
                 a.q + (tok * W::kHeads + h) * W::kDh + dim0 + 8 * pc);
    }
    cp_async_commit();
  } else {
    row_sequence(a, s, start, begin, slot);
  }
  int64_t n_win = 0;
  const int64_t n_keys = row_keys(a, tok, p, comp, &s_count, &n_win);
  const int64_t chunks = (n_keys + kKeysPerChunk - 1) / kKeysPerChunk;
  const int tiles = int((n_keys + W::kTileKeys - 1) / W::kTileKeys);
  const int segs = int((n_keys + kSegmentKeys - 1) / kSegmentKeys);
  // The segments folded in registers before the partials (0: none, a partial per segment).
  const int lead = !split ? segs : sp.lead_fold ? attention_split_lead_segs(segs, sp.nsplit) : 0;
  const bool per_segment = split && (split_id > 0 || lead == 0);  // leaves a partial per segment
  const int lead_partial = lead > 0 ? 1 : 0;                       // the lead CTA's state, partial 0
  if (row_leader) sp.segs[tok] = int32_t(lead > 0 ? attention_split_lead_partials(segs, sp.nsplit) : segs);
  // This CTA's segments: first, first + step, ... below limit.
  const int seg_first = per_segment ? lead + split_id - lead_partial : 0;
  const int seg_step = per_segment ? sp.nsplit - lead_partial : 1, seg_limit = per_segment ? segs : lead;
  if (seg_first >= seg_limit) {  // uniform over the CTA: no segment of the row is this CTA's
    if constexpr (kEarly) cp_async_wait<0>();  // (Q's copies land before the CTA leaves)
    return;
  }
  // The i-th tile of this CTA, or -1 past its last. Only a row's last segment can be
  // short, and it ends the list.
  const auto tile_at = [&](int i) {
    const int seg = seg_first + i / W::kTilesPerSeg * seg_step, tile = seg * W::kTilesPerSeg + i % W::kTilesPerSeg;
    return seg < seg_limit && tile < tiles ? tile : -1;
  };
  // Partial e of head h: (m, l), two floats; and its o from this thread's 64 values
  // v(mb, i) in the accumulator layout (o[mb][i] below), h * max_segs partials on.
  const auto partial_ml = [&](int64_t h, int e) { return sp.ml + ((tok * W::kHeads + h) * sp.max_segs + e) * 2; };
  const auto store_partial_o = [&](int e, auto&& v) {
    const int head_stride = sp.max_segs * W::kDh;
    float* po = sp.o + ((tok * W::kHeads + int64_t(0)) * sp.max_segs + e) * W::kDh + 2 * t * head_stride + dim0 +
                L::kWgDh * wg + 16 * ww + g;
#pragma unroll
    for (int mb = 0; mb < L::kMb; ++mb)
#pragma unroll
      for (int i = 0; i < 32; ++i) po[(8 * (i >> 2) + (i & 1)) * head_stride + 64 * mb + 8 * ((i >> 1) & 1)] = v(mb, i);
  };

  if constexpr (!kEarly) {  // Q: 16-byte piece pc of head h, every load issued before the first store
    constexpr int kLoads = W::kHeads * (L::kCtaDh / 8) / W::kThreads;
    static_assert(kLoads * W::kThreads == W::kHeads * (L::kCtaDh / 8), "whole loads a thread");
    uint4 v[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int i = tid + j * W::kThreads, h = i / (L::kCtaDh / 8), pc = i % (L::kCtaDh / 8);
      v[j] = *reinterpret_cast<const uint4*>(a.q + (tok * W::kHeads + h) * W::kDh + dim0 + 8 * pc);
    }
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int i = tid + j * W::kThreads, h = i / (L::kCtaDh / 8), pc = i % (L::kCtaDh / 8);
      *reinterpret_cast<uint4*>(Qs + (pc >> 3) * W::kBuf + tc::sw128_offset(h, pc & 7)) = v[j];
    }
    e4m3_table();
  }
  auto resolve = [&](int64_t tile, int buf) {  // warp 0: the tile's 64 keys, two per lane
    for (int k = lane; k < W::kTileKeys; k += 32) {
      const int64_t u = tile * W::kTileKeys + k;
      KeyRef kr{nullptr, 0};
      if (u < n_keys) kr = resolve_key(a, s, p, start, begin, slot, n_win, comp, u);
      kptr[buf * W::kTileKeys + k] = kr.ptr;
      ktype[buf * W::kTileKeys + k] = kr.type;
    }
  };
  auto issue = [&](int buf) {  // all threads: a warp per key, its lanes on the record's 8-byte pieces
    for (int k = warp; k < W::kTileKeys; k += W::kThreads / 32) {
      if (ktype[buf * W::kTileKeys + k] != 1) continue;  // uniform over the warp
      const uint8_t* src = kptr[buf * W::kTileKeys + k];
      uint8_t* dst = raw + size_t(k) * W::kRowBytes;
      if constexpr (kPair) {
        // The pieces of this CTA's dims: the e4m3 codes of dims 0-255 (pieces 0-31), or
        // those of 256-447 and the bf16 rope values (32-71); and the scales (72).
        static_assert(W::kRowBytes == 73 * 8 && W::kDh - kRope == 448, "V4-Flash's 584-byte record");
        const int first = half ? 32 : 0, count = half ? 41 : 33;
        for (int i = lane; i < count; i += 32) {
          const int piece = i == 32 && half == 0 ? 72 : first + i;
          cp_async8(dst + 8 * piece, src + 8 * piece);
        }
      } else {
        for (int piece = lane; piece < W::kRowBytes / 8; piece += 32) cp_async8(dst + 8 * piece, src + 8 * piece);
      }
    }
    cp_async_commit();
  };
  __syncthreads();  // comp[], Q (the late form; the early one's lands with the first records), tables
  DSV4_CTA_PROBE(CtaProbeSite::kAttention, 2, a.sink);  // staged: the row's keys listed, Q (late form)
  if (warp == 0) resolve(tile_at(0), 0);
  if constexpr (!kEarly) rope_table();  // (beside warp 0's lookups)
  __syncthreads();
  issue(0);
  DSV4_CTA_PROBE(CtaProbeSite::kAttention, 3, a.sink);  // first_issued: the first tile's records in flight

  // o[mb]: dims dim0 + kWgDh wg + 64 mb + (16 ww + g + 8 (e / 2)), heads 8q + 2t + e % 2 at
  // index 4q + e. The fold state O: one CTA a row, 64 values a thread in local memory
  // (512 threads leave 128 registers each); the pair, 32 in registers.
  // kFoldRegs: P.V one m64 tile at a time onto o[0] (o[1] unused), O 64 registers.
  constexpr bool kOInRegs = kPair || kFoldRegs;
  float o[L::kMb][32];
  volatile float O_fold[kOInRegs ? 1 : 64];
  constexpr int kFoldGroup = 16;  // O's values a segment-end fold loads at once (below)
  float O_reg[kOInRegs ? L::kMb * 32 : 1] = {};
  const auto fold_get = [&](int i) -> float {
    if constexpr (kOInRegs) return O_reg[i];
    else return O_fold[i];
  };
  const auto fold_set = [&](int i, float v) {
    if constexpr (kOInRegs) O_reg[i] = v;
    else O_fold[i] = v;
  };
  // A CTA that leaves a partial a segment never folds: its O_fold is not zeroed (64
  // local-memory stores a thread, 128 KB a CTA) unless sp.zero_fold (A/B runs).
  const bool folds = !per_segment || sp.zero_fold;
#pragma unroll
  for (int i = 0; i < 32; ++i)
#pragma unroll
    for (int mb = 0; mb < L::kMb; ++mb) o[mb][i] = 0.0f;
  if constexpr (!kOInRegs) {
    if (folds) {
#pragma unroll
      for (int i = 0; i < 32; ++i) O_fold[i] = O_fold[32 + i] = 0.0f;
    }
  }
  // The pair: the other CTA's S partials, at the same offsets of its shared memory.
  const uint32_t sp_peer = kPair ? cluster_map(smem_addr(Sp), half ^ 1u) : 0u;
  // The softmax role of this thread (row_softmax4, as in attention_mma_kernel): head sr,
  // quad lane stig and key half shalf; its row's running and folded (m, l).
  const int sr = tid >> 3, stig = (tid >> 1) & 3, shalf = tid & 1;
  const bool row_writer = stig == 0 && shalf == 0;
  float m_run = -INFINITY, l_run = 0.0f, M_fold = -INFINITY, L_fold = 0.0f;
  const uint32_t q_base = smem_addr(Qs), k_base = smem_addr(Ks), p_base = smem_addr(Ps);

  int buf = 1;
  for (int step = 0;; ++step) {
    const int tile = tile_at(step);
    if (tile < 0) break;
    buf ^= 1;
    const int next = tile_at(step + 1), seg = tile / W::kTilesPerSeg;
    const bool seg_end = tile % W::kTilesPerSeg == W::kTilesPerSeg - 1 || tile + 1 == tiles;
    cp_async_wait<0>();
    __syncthreads();  // the records are here; the previous tile's readers of Ks and P are done
    {  // key k, dims dim0 + 8 (c0 + 8 j) .. + 7: one piece of each of this CTA's 64-dim blocks (K buffer j),
       // the row's blocks b0 + j; the row's last block holds its rope dims
      static_assert(W::kThreads == 8 * W::kTileKeys && L::kBufs * 64 == L::kCtaDh,
                    "a thread a key and a piece of each block");
      constexpr int kNope = W::kDh - kRope, kNopeBlocks = kNope / 64;
      const int k = tid % W::kTileKeys, c0 = tid / W::kTileKeys, type = ktype[buf * W::kTileKeys + k];
      const uint8_t* rec = raw + size_t(k) * W::kRowBytes;
      uint8_t* dst = Ks + tc::sw128_offset(k, c0);
      const int b0 = dim0 / 64;
      if (type == 1) {
        // The e4m3 pieces by the branch-free common case, so that they overlap (one
        // decode_key8 after another, each with its branches, they did not); where one
        // is not exact, all are redone by the full path (the same bits either way).
        bool exact = true;
#pragma unroll
        for (int j = 0; j < L::kBufs; ++j) {
          if (b0 + j == kNopeBlocks) break;
          uint4 v;
          exact &= e4m3x8_scaled_bf16_exact(*reinterpret_cast<const uint2*>(rec + 64 * (b0 + j) + 8 * c0),
                                            rec[kNope + 2 * kRope + b0 + j], v);
          *reinterpret_cast<uint4*>(dst + j * W::kBuf) = v;
        }
        if (!exact) {
          for (int j = 0; j < L::kBufs && b0 + j < kNopeBlocks; ++j)
            *reinterpret_cast<uint4*>(dst + j * W::kBuf) =
                e4m3x8_scaled_bf16(*reinterpret_cast<const uint2*>(rec + 64 * (b0 + j) + 8 * c0),
                                   rec[kNope + 2 * kRope + b0 + j], lut);
        }
        if (!kPair || half != 0)  // this CTA's last buffer is the row's rope block
          *reinterpret_cast<uint4*>(dst + (L::kBufs - 1) * W::kBuf) = rope_key8<W::kDh>(rec, kNope + 8 * c0);
      } else {
#pragma unroll 1
        for (int j = 0; j < L::kBufs; ++j)
          *reinterpret_cast<uint4*>(dst + j * W::kBuf) =
              decode_key8<W::kDh>(type, rec, kptr + buf * W::kTileKeys + k, 8 * (c0 + 8 * (b0 + j)), lut);
      }
    }
    tc::fence_proxy_async();
    __syncthreads();  // the K tile is complete and the staging buffer free

    // S partial of dims quarter wg (buffers 2 wg, 2 wg + 1), or in the pair form of this
    // CTA's quarter lq = wg / 2 (the row's quarter 2 half + lq) for keys 32 (wg % 2) .. + 31
    // (m64n32: an element's chain is the m64n64 one's): 8 chained k16 steps from zero.
    {
      constexpr int kSn = kPair ? 4 : 8;  // the warpgroup's keys / 8
      const int lq = kPair ? wg >> 1 : wg, k0 = kPair ? 32 * (wg & 1) : 0;
      float acc[4 * kSn];
#pragma unroll
      for (int i = 0; i < 4 * kSn; ++i) acc[i] = 0.0f;
      tc::wgmma_fence();
#pragma unroll
      for (int bb = 0; bb < 2; ++bb)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t off = uint32_t((2 * lq + bb) * W::kBuf + 32 * j);
          tc::wgmma_bf16_ss<kSn>(acc, tc::wgmma_desc(q_base + off), tc::wgmma_desc(k_base + off + 128 * k0),
                                 (bb | j) != 0 ? 1 : 0);
        }
      tc::wgmma_commit();
      // Warp 0 looks up the next tile's keys while the products run (the buffer's
      // last readers finished in the previous tile); the barrier below orders them
      // before issue().
      if (next >= 0 && warp == 0) resolve(next, buf ^ 1);
      tc::wgmma_wait_all();
      if constexpr (kPair) {
        if (step > 0) cluster_wait_acquire();  // the other CTA has read the last tile's partials
      }
      // The partials to shared memory as [quarter][head][key] (rows of kSpStride floats:
      // the 8-byte stores and the softmax's reads are conflict-free), so that every
      // thread takes a part of the softmax. With warpgroup 0 alone summing and running
      // it, the other three waited: a third of the stall samples (ncu, batch 256).
      float* part = Sp + size_t(lq) * W::kHeads * W::kSpStride;
#pragma unroll
      for (int q = 0; q < kSn; ++q) {
        const int head = 16 * ww + g, key = k0 + 8 * q + 2 * t;
        *reinterpret_cast<float2*>(part + head * W::kSpStride + key) = make_float2(acc[4 * q], acc[4 * q + 1]);
        *reinterpret_cast<float2*>(part + (head + 8) * W::kSpStride + key) =
            make_float2(acc[4 * q + 2], acc[4 * q + 3]);
      }
    }
    if constexpr (kPair) {
      cluster_sync_all();  // both CTAs' partials (and warp 0's lookups) are in place
      if (next >= 0) issue(buf ^ 1);  // (the staging area is the pair's own)
    } else {
      __syncthreads();
    }
    // S of this thread's keys 32c + 8 nt + 2 stig + e (nt = 2 shalf + j) of head sr: the
    // four partials in quarter order, scaled, missing keys at -inf.
    const int tile_chunks = 2 * tile + 1 < chunks ? 2 : 1;
    float sv[2][4];
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = 32 * c + (2 * shalf + j) * 8 + 2 * stig;
        float x0 = 0.0f, x1 = 0.0f;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float2 x;
          if constexpr (kPair) {  // quarter r: the partial lq = r % 2 of CTA r / 2
            const int at = ((r & 1) * W::kHeads + sr) * W::kSpStride + key;
            x = (r >> 1) == int(half) ? *reinterpret_cast<const float2*>(Sp + at) : ld_cluster_f32x2(sp_peer + 4 * at);
          } else {
            x = *reinterpret_cast<const float2*>(Sp + (size_t(r) * W::kHeads + sr) * W::kSpStride + key);
          }
          x0 += x.x;
          x1 += x.y;
        }
        sv[c][2 * j] = ktype[buf * W::kTileKeys + key] != 0 ? x0 * a.scale : -INFINITY;
        sv[c][2 * j + 1] = ktype[buf * W::kTileKeys + key + 1] != 0 ? x1 * a.scale : -INFINITY;
      }
    if constexpr (kPair) {
      cluster_arrive_release();  // this CTA's reads of the other's partials are done (waited on before the next stores)
    } else {
      __syncthreads();  // every partial read: bf16(P) takes their place, the next records the rest
      if (next >= 0) issue(buf ^ 1);
    }
    // The tile's chunks in order (the row's last tile may hold one): bf16(P)
    // [head][key] for the P.V wgmmas (K-major, 128-byte swizzle) and alpha per head.
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      if (c == tile_chunks) break;
      float alpha;
      row_softmax4(sv[c], m_run, l_run, alpha);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        *reinterpret_cast<uint32_t*>(Ps + tc::sw128_offset(sr, 4 * c + 2 * shalf + j) + 4 * stig) =
            pack_bf16(sv[c][2 * j], sv[c][2 * j + 1]);
      if (row_writer) alpha_s[c * W::kHeads + sr] = alpha;
    }
    const auto ml_at = [&] { return partial_ml(sr, lead_partial + seg - lead); };
    if (seg_end)
      finish_segment(per_segment, row_writer, row_writer && ml_cta, ml_at, &fold_a[sr], &fold_b[sr], m_run, l_run, M_fold,
                     L_fold);
    tc::fence_proxy_async();
    __syncthreads();  // bf16(P) and alpha of the tile's chunks
    // O's values kFoldGroup at a time: a group's local-memory loads (mostly from L2: 128 KB
    // a CTA against the ~30 KB of L1 that 220 KB of shared memory leave) go out together;
    // loaded one at a time, each load followed the previous value's store. (In registers,
    // the grouping is moot.) o[j] holds O's m64 tile mb.
    const auto fold_tile = [&](int mb, int j) {
#pragma unroll
      for (int i0 = 0; i0 < 32; i0 += kFoldGroup) {
        float run[kFoldGroup];
#pragma unroll
        for (int k = 0; k < kFoldGroup; ++k) run[k] = fold_get(32 * mb + i0 + k);
#pragma unroll
        for (int k = 0; k < kFoldGroup; ++k) {
          const int i = i0 + k, h = 8 * (i >> 2) + 2 * t + (i & 1);
          const FoldWeights w{fold_a[h], fold_b[h], 0.0f};
          fold_set(32 * mb + i, fold_value(run[k], o[j][i], w));
        }
      }
    };
    // P.V in passes of kPassMb m64 tiles of the warpgroup's dims, tile mb = kPassMb pass + j
    // onto o[j]: both tiles in one pass, or (kFoldRegs) one a pass, each folded into O and
    // o zeroed before the next (the tile is the segment: the fold weights came with P).
    constexpr int kPassMb = kFoldRegs ? 1 : L::kMb;
#pragma unroll
    for (int pass = 0; pass < L::kMb / kPassMb; ++pass) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        if (c == tile_chunks) break;
        // o *= alpha(head), then keys 32c .. 32c + 31 as two k16 steps onto o.
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const float2 a01 = *reinterpret_cast<const float2*>(alpha_s + c * W::kHeads + 8 * q + 2 * t);
          const float a0 = a01.x, a1 = a01.y;
#pragma unroll
          for (int j = 0; j < kPassMb; ++j) {
            o[j][4 * q] *= a0;
            o[j][4 * q + 1] *= a1;
            o[j][4 * q + 2] *= a0;
            o[j][4 * q + 3] *= a1;
          }
        }
        // A = V^T (dims x keys) for keys 16i .. 16i + 15, i = 2c + jj: matrix m of
        // ldmatrix.x4.trans = keys 16i + 8 (m / 2) .., dims + 8 (m % 2). All the pass's
        // fragments are loaded before the fence (registers a wgmma reads stay untouched).
        uint32_t af[2][kPassMb][4];
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int j = 0; j < kPassMb; ++j) {
            const int m = lane >> 3, key = 16 * (2 * c + jj) + 8 * (m >> 1) + (lane & 7);
            const int dim = L::kWgDh * wg + 64 * (kPassMb * pass + j) + 16 * ww + 8 * (m & 1);  // (of this CTA's dims)
            ldmatrix_x4_trans(af[jj][j], Ks + (dim >> 6) * W::kBuf + tc::sw128_offset(key, (dim & 63) >> 3));
          }
        tc::wgmma_fence();
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int j = 0; j < kPassMb; ++j)
            tc::wgmma_bf16_rs<8>(o[j], af[jj][j], tc::wgmma_desc(p_base + 32 * (2 * c + jj)), 1);
        tc::wgmma_commit();
        tc::wgmma_wait_all();
      }
      if constexpr (kFoldRegs) {
        fold_tile(pass, 0);
#pragma unroll
        for (int i = 0; i < 32; ++i) o[0][i] = 0.0f;
      }
    }
    if constexpr (!kFoldRegs) {
      // At a segment's end: o to the split's partials, or folded into O in segment
      // order; within a segment o runs on.
      if (!seg_end) continue;
      if (per_segment) {
        store_partial_o(lead_partial + seg - lead, [&](int mb, int i) { return o[mb][i]; });
      } else {
#pragma unroll
        for (int mb = 0; mb < L::kMb; ++mb) fold_tile(mb, mb);
      }
#pragma unroll
      for (int i = 0; i < 32; ++i)
#pragma unroll
        for (int mb = 0; mb < L::kMb; ++mb) o[mb][i] = 0.0f;
    }
  }
  cp_async_wait<0>();
  DSV4_CTA_PROBE(CtaProbeSite::kAttention, 4, a.sink);  // tiles_done: every tile multiplied and folded
  // The pair: the other CTA's last reads of this CTA's partials are done before it leaves.
  if constexpr (kPair) cluster_wait_acquire();
  if (per_segment) return;  // attention_combine_kernel finishes the row
  // The fold state in registers (o is done with): its 64 local-memory loads together,
  // not each behind the store or division that uses it.
  float O_out[L::kMb * 32];
#pragma unroll
  for (int i = 0; i < L::kMb * 32; ++i) O_out[i] = fold_get(i);
  if (split) {  // the lead CTA: its folded state as the row's partial 0
    store_partial_o(0, [&](int mb, int i) { return O_out[32 * mb + i]; });
    if (row_writer && ml_cta) *reinterpret_cast<float2*>(partial_ml(sr, 0)) = make_float2(M_fold, L_fold);
    return;
  }

  // O / (L + exp(sink - M)), bf16, staged as [head][dim] over Q; then the inverse RoPE
  // of the last 64 dims at p and the store, a pair of dims per thread and step.
  if (row_writer) den_s[sr] = attention_denominator(L_fold, M_fold, a.sink[sr]);
  __syncthreads();
  uint16_t* tile = reinterpret_cast<uint16_t*>(Qs);  // [64 heads][this CTA's dims]
#pragma unroll
  for (int mb = 0; mb < L::kMb; ++mb)
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int h = 8 * (i >> 2) + 2 * t + (i & 1);
      const int d = L::kWgDh * wg + 64 * mb + 16 * ww + g + 8 * ((i >> 1) & 1);
      tile[h * L::kCtaDh + d] = f2bf(__fdiv_rn(O_out[32 * mb + i], den_s[h]));
    }
  __syncthreads();
  DSV4_CTA_PROBE(CtaProbeSite::kAttention, 5, a.sink);  // out_staged: O / denominator in bf16, over Q
  // 8 dims a thread and step (16-byte shared loads and global stores; with 4 bytes a
  // step the loop took 14% of a SWA launch's stall samples at 256 rows, twenty-fourth
  // session). A piece lies wholly in the RoPE dims or wholly below them; below, its
  // bf16 values pass as they are (what rounding their floats again would give).
  static_assert((W::kDh - kRope) % 8 == 0 && L::kCtaDh % 8 == 0, "whole 8-dim pieces");
  constexpr int kPieces = L::kCtaDh / 8;
  for (int i = tid; i < W::kHeads * kPieces; i += W::kThreads) {
    const int h = i / kPieces, d = 8 * (i % kPieces);
    uint4 v = *reinterpret_cast<const uint4*>(tile + h * L::kCtaDh + d);
    if (dim0 + d >= W::kDh - kRope) {
      uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float x0 = bf2f(uint16_t(w[k])), x1 = bf2f(uint16_t(w[k] >> 16));
        const int pair = (dim0 + d + 2 * k - (W::kDh - kRope)) / 2;
        rope_pair_f(&x0, &x1, rope_c[pair], -rope_s[pair]);
        w[k] = pack_bf16(x0, x1);
      }
      v = make_uint4(w[0], w[1], w[2], w[3]);
    }
    *reinterpret_cast<uint4*>(out + h * W::kDh + dim0 + d) = v;
  }
}

// Every pair of e4m3 codes (i % 65536, low code in the low byte) under every scale byte
// sb = i / 65536 < 255: the keys' decode (e4m3x8_scaled_bf16, the pair in bytes 0-1 of
// the first word and 2-3 of the second, beside a finite neighbour pair) against the
// bf16 of core::e4m3_to_float x core::e8m0_to_float in f32, bit for bit; and the common
// case must take every such word with 10 <= sb <= 134 (its claim of exactness there).
// NaN codes are left out (their payloads are the table's, checked by the kernels' test).
__global__ void key_decode_mismatch_kernel(unsigned long long* count, uint32_t* first) {
  __shared__ float lut[256];
  for (int c = threadIdx.x; c < 256; c += blockDim.x) lut[c] = core::e4m3_to_float(uint8_t(c));
  __syncthreads();
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < 255ull * 65536; i += stride) {
    const uint32_t pair = uint32_t(i & 0xffffu), sb = uint32_t(i >> 16);
    if ((pair & 0x7fu) == 0x7fu || ((pair >> 8) & 0x7fu) == 0x7fu) continue;
    uint32_t other = (pair * 40503u + 7919u) & 0xffffu;
    other &= 0xfefeu;  // (no NaN code: 0x7f, 0xff have bit 0 set)
    const uint2 codes = make_uint2(pair | other << 16, other | pair << 16);
    uint4 fast;
    const bool took = e4m3x8_scaled_bf16_exact(codes, sb, fast);
    const uint4 got = e4m3x8_scaled_bf16(codes, sb, lut);
    const float sc = core::e8m0_to_float(uint8_t(sb));
    const auto want = [&](uint32_t code) {
      return uint32_t(core::float_to_bf16_bits(__fmul_rn(core::e4m3_to_float(uint8_t(code)), sc)));
    };
    const uint32_t want_pair = want(pair & 0xffu) | want(pair >> 8) << 16,
                   want_other = want(other & 0xffu) | want(other >> 8) << 16;
    bool same = got.x == want_pair && got.y == want_other && got.z == want_other && got.w == want_pair;
    if (sb >= 10 && sb <= 134) same &= took && fast.x == got.x && fast.y == got.y && fast.z == got.z && fast.w == got.w;
    if (!same && atomicAdd(count, 1ull) == 0) *first = uint32_t(i);
  }
}
}  // namespace

// ---- launchers -------------------------------------------------------------------

void CudaBackend::do_window_commit(const Tensor& kv, const BatchView& batch, LayerCache& cache) {
  const int64_t T = kv.size(0), Dh = kv.size(1);
  if (T == 0) return;
  const int64_t W = cache.window.size(1), row_bytes = cache.window.size(2);
  DSV4_CHECK(row_bytes == kv_row_bytes(Dh, kRope) && Dh % 64 == 0 && Dh > kRope,
             "window_commit: ring rows of {} bytes do not hold head_dim {}", row_bytes, Dh);
  WindowCommitArgs a{kv.as<uint16_t>(), batch.token_seq, batch.seq_begin, batch.seq_len, batch.seq_start_pos,
                     batch.seq_slot, cache.window.as<uint8_t>(), T, W, Dh, row_bytes};
  const int warps = 8;
  const size_t smem = size_t(warps) * size_t(Dh) * sizeof(float);
  allow_smem(window_commit_kernel, smem);
  window_commit_kernel<<<unsigned((T + warps - 1) / warps), warps * 32, smem, stream_>>>(a);
  check_launch(stream_);
}

void CudaBackend::do_indexer_q(const Tensor& q, const BatchView& batch, const RopeTable& rope) {
  const int64_t T = q.size(0), Hi = q.size(1), Di = q.size(2), rd = rope.rope_dim;
  if (T == 0 || Hi == 0) return;
  DSV4_CHECK(rd % 2 == 0 && rd <= Di, "indexer_q: rope_dim {} with head dim {}", rd, Di);
  const int64_t rows = T * Hi;
  const int warps = 8;
  const unsigned grid = unsigned((rows + warps - 1) / warps);
  uint16_t* qp = q.as<uint16_t>();
  const float* f = rope.inv_freq.as<float>();
  switch (Di) {
    case 64: indexer_q_kernel<2><<<grid, warps * 32, 0, stream_>>>(qp, rows, Hi, batch.positions, f, int(rd)); break;
    case 128: indexer_q_kernel<4><<<grid, warps * 32, 0, stream_>>>(qp, rows, Hi, batch.positions, f, int(rd)); break;
    case 256: indexer_q_kernel<8><<<grid, warps * 32, 0, stream_>>>(qp, rows, Hi, batch.positions, f, int(rd)); break;
    default: core::fail("indexer_q: head dim {} is not supported by the CUDA backend (64, 128, 256)", Di);
  }
  check_launch(stream_);
}

namespace {
std::atomic<int> g_compress_emit_ctas{0};

// The most CTAs a ratio-4 row's pooling spreads over (DSV4_CUDA_COMPRESS_RATIO4_CTAS=N
// for A/B runs; 1 pools it on one CTA, as before the sixty-fourth session).
int64_t ratio4_emit_ctas() {
  static const int64_t ctas = env_integer("DSV4_CUDA_COMPRESS_RATIO4_CTAS", 4, 1, 16);
  return ctas;
}
}  // namespace

// Test hook: CTAs a row of compress_emit_kernel (capped at one a 32-feature chunk; 0: the launcher's choice).
void cuda_compress_emit_ctas(int ctas) { g_compress_emit_ctas.store(ctas); }

void CudaBackend::do_compress(const Tensor& a, const Tensor& g, const CompressorWeights& w, const BatchView& batch,
                              const RopeTable& rope, float norm_eps, LayerCache& cache) {
  const int64_t T = a.size(0);
  if (T == 0 || batch.num_seqs == 0) return;
  Tensor& kv_state = w.rotate ? cache.index_kv_state : cache.kv_state;
  Tensor& score_state = w.rotate ? cache.index_score_state : cache.score_state;
  const Tensor& rows = w.rotate ? cache.index_rows : cache.rows;
  const int64_t m = w.ratio, d = w.head_dim, rd = rope.rope_dim;
  const int64_t expect_bytes = w.rotate ? index_row_bytes(d) : kv_row_bytes(d, kRope);
  if (w.rotate)
    DSV4_CHECK(d >= 32 && d <= kMaxCompressDim && (d & (d - 1)) == 0,
               "compress: indexer head_dim {} must be a power of two in [32, {}]", d, kMaxCompressDim);
  else
    DSV4_CHECK(d > kRope && d <= kMaxCompressDim && d % 64 == 0,
               "compress: head_dim {} must be a multiple of 64 in ({}, {}]", d, kRope, kMaxCompressDim);
  DSV4_CHECK(w.rotate || rd == kRope, "compress: the KV record layout needs rope_dim {}, got {}", kRope, rd);
  DSV4_CHECK(rd % 2 == 0 && rd <= d, "compress: rope_dim {} with head_dim {}", rd, d);
  DSV4_CHECK(rows.ndim() == 3 && rows.size(1) == kPageTokens / m && rows.size(2) == expect_bytes,
             "compress: cache rows {} do not hold {}-byte records of {} rows per page", rows.shape_string(),
             expect_bytes, kPageTokens / m);
  DSV4_CHECK(kv_state.size(1) == (m == 4 ? 2 * m : m) && kv_state.size(2) == w.width(),
             "compress: state {} does not match ratio {} width {}", kv_state.shape_string(), m, w.width());
  CompressArgs args;
  args.a = a.as<float>();
  args.g = g.as<float>();
  args.ape = w.ape.as<float>();
  args.norm = w.norm.as<uint16_t>();
  args.inv_freq = rope.inv_freq.as<float>();
  args.kv_state = kv_state.as<float>();
  args.score_state = score_state.as<float>();
  args.rows = rows.as<uint8_t>();
  args.positions = batch.positions;
  args.token_seq = batch.token_seq;
  args.seq_begin = batch.seq_begin;
  args.seq_len = batch.seq_len;
  args.seq_start_pos = batch.seq_start_pos;
  args.seq_slot = batch.seq_slot;
  args.block_table = batch.block_table;
  args.max_blocks = batch.max_blocks;
  args.T = T;
  args.m = m;
  args.d = d;
  args.width = w.width();
  args.state_rows = kv_state.size(1);
  args.rd = rd;
  args.num_pages = rows.size(0);
  args.per_page = rows.size(1);
  args.row_bytes = rows.size(2);
  args.rotate = w.rotate;
  args.eps = norm_eps;
  if (use_simple_kernels()) {
    compress_simple_kernel<<<unsigned(batch.num_seqs), kCompressThreads, 0, stream_>>>(args);
    check_launch(stream_);
    return;
  }
  // CTAs a row and a chunk's features: ops/cuda/compress_emit_plan.h.
  const CompressEmitShape shape = compress_emit_shape(d, m == 4 ? 2 * m : m, m == 4, T, ratio4_emit_ctas(),
                                                      g_compress_emit_ctas.load(std::memory_order_relaxed));
  const int64_t chunks = shape.ctas;
  CompressEmitPlan es;
  es.features = int(shape.features);
  if (chunks > 1) {
    bool fresh = false;
    es.pooled = static_cast<float*>(scratch("compress_pooled", size_t(T * d) * sizeof(float)));
    es.arrivals = static_cast<int*>(scratch("compress_arrivals", size_t(T) * sizeof(int), &fresh));
    // Zero once when allocated; each token's last CTA resets its count after use.
    if (fresh) DSV4_CUDA_CHECK(cudaMemsetAsync(es.arrivals, 0, size_t(T) * sizeof(int), stream_));
  }
  compress_emit_kernel<<<dim3(unsigned(T), unsigned(chunks)), kCompressThreads, 0, stream_>>>(args, es);
  check_launch(stream_);
  const int threads = 256;
  const unsigned col_blocks = unsigned((args.width + threads - 1) / threads);
  // Ratio 128: a sequence writes min(len, m) rows, over up to 16 CTAs a column block.
  const int64_t longest = batch.max_seq_len > 0 ? batch.max_seq_len : T;
  const unsigned spread = m == 4 ? 1u : unsigned(std::min<int64_t>({16, m, longest}));
  const dim3 grid(col_blocks, unsigned(batch.num_seqs), spread);
  compress_state_kernel<<<grid, threads, 0, stream_>>>(args);
  check_launch(stream_);
}

namespace {
// Pages a scoring CTA takes: kScoreMaxPages (the Q fragments and the histogram
// flush once for 256 rows) unless that leaves the grid under two CTAs an SM, as at
// batch 1-16 of a 4K context (5 CTAs a token: 80 CTAs at 16 rows, each walking its
// 4 pages one after another); then half, down to one page a CTA.
// DSV4_CUDA_SCORE_PAGES=1|2|4 (or the test hook) fixes it (A/B runs).
std::atomic<int> g_score_pages_forced{0};
std::atomic<int> g_score_early_forced{-1};
std::atomic<int> g_select_early_forced{-1};
int score_pages_per_cta(int64_t tokens, int64_t max_pages, int64_t sms) {
  static const int from_env = [] {
    const char* v = std::getenv("DSV4_CUDA_SCORE_PAGES");
    if (v == nullptr || *v == 0) return 0;
    const std::string s(v);
    DSV4_CHECK(s == "1" || s == "2" || s == "4", "DSV4_CUDA_SCORE_PAGES={}: 1, 2 or 4 pages a scoring CTA", s);
    return std::stoi(s);
  }();
  const int forced = g_score_pages_forced.load(std::memory_order_relaxed);
  if (forced > 0) return forced;
  if (from_env > 0) return from_env;
  int pages = kScoreMaxPages;
  while (pages > 1 && tokens * ((max_pages + pages - 1) / pages) < 2 * sms) pages /= 2;
  return pages;
}

// Tokens per launch so that the per-token scratch stays under ~64 MB.
int64_t topk_tokens_per_launch(int64_t T, int64_t bytes_per_token) {
  const int64_t budget = int64_t(64) << 20;
  int64_t n = budget / (bytes_per_token > 0 ? bytes_per_token : 1);
  n = n < 1 ? 1 : n;
  n = n > 65535 ? 65535 : n;  // grid.y of the scoring kernel
  return n < T ? n : T;
}
}  // namespace

// Test hook: the scoring CTAs' pages (1, 2 or 4; 0 follows DSV4_CUDA_SCORE_PAGES and the grid).
void cuda_indexer_score_pages(int pages) {
  DSV4_CHECK(pages == 0 || pages == 1 || pages == 2 || pages == kScoreMaxPages, "score pages {}: 0, 1, 2 or 4",
             pages);
  g_score_pages_forced.store(pages);
}

// Test hook: -1 follows DSV4_CUDA_SCORE_EARLY (default on), 0 / 1 force the scoring
// kernel's early form off / on.
void cuda_indexer_score_early(int mode) { g_score_early_forced.store(mode); }
// Test hook: the same for the selection kernel (DSV4_CUDA_SELECT_EARLY).
void cuda_indexer_select_early(int mode) { g_select_early_forced.store(mode); }

void CudaBackend::do_indexer_topk(const Tensor& q, const Tensor& weights, float weight_scale, const LayerCache& cache,
                                  const BatchView& batch, const Tensor& topk) {
  const int64_t T = q.size(0), Hi = q.size(1), Di = q.size(2), K = topk.size(1);
  if (T == 0 || K == 0) return;
  const Tensor& rows = cache.index_rows;
  DSV4_CHECK(rows.ndim() == 3 && rows.size(1) == kPageTokens / 4 && rows.size(2) == index_row_bytes(Di),
             "indexer_topk: index rows {} do not hold {}-byte records", rows.shape_string(), index_row_bytes(Di));
  DSV4_CHECK(Di == 32 || Di == 64 || Di == 128 || Di == 256, "indexer_topk: head dim {} not supported", Di);
  DSV4_CHECK(K <= 16384, "indexer_topk: top-{} is more than the CUDA selection takes (16384)", K);
  const int64_t max_rows = std::max<int64_t>(int64_t(batch.max_blocks) * (kPageTokens / 4), 1);
  DSV4_CHECK(max_rows * 4 < (int64_t(1) << 31), "indexer_topk: {} rows per sequence overflow the row ids", max_rows);
  const bool simple = use_simple_kernels();
  TopkArgs a{};
  a.weight_scale = weight_scale;
  a.rows = rows.as<uint8_t>();
  a.block_table = batch.block_table;
  a.max_blocks = batch.max_blocks;
  a.num_pages = rows.size(0);
  a.row_bytes = rows.size(2);
  a.Hi = Hi;
  a.Di = Di;
  a.K = K;
  a.max_rows = max_rows;
  const bool mma_ok = Di == kScoreDi && Hi <= kScoreHeads && aligned16(q.data()) && aligned16(rows.data());
  const int64_t bytes_per_token = simple ? max_rows * 16 : max_rows * 2 + 256 * 4;
  const int64_t chunk = topk_tokens_per_launch(T, bytes_per_token);
  auto launch_simple_score = [&](auto kComposite, unsigned grid) {
    constexpr bool kC = decltype(kComposite)::value;
    const size_t smem = size_t(Hi * Di + Hi) * sizeof(float);
    switch (Di) {
#define DSV4_SCORE_CASE(DI)                                                             \
  case DI:                                                                              \
    allow_smem(index_score_simple_kernel<DI, kC>, smem);                                \
    index_score_simple_kernel<DI, kC><<<grid, 256, smem, stream_>>>(a);                  \
    break;
      DSV4_SCORE_CASE(32)
      DSV4_SCORE_CASE(64)
      DSV4_SCORE_CASE(128)
      DSV4_SCORE_CASE(256)
#undef DSV4_SCORE_CASE
    }
    check_launch(stream_);
  };
  if (simple) {
    uint64_t* keys = static_cast<uint64_t*>(scratch("topk_keys64", size_t(chunk * max_rows) * 8));
    uint64_t* sorted = static_cast<uint64_t*>(scratch("topk_keys64_sorted", size_t(chunk * max_rows) * 8));
    int* seg = static_cast<int*>(scratch("topk_segments", size_t(2 * chunk) * sizeof(int)));
    size_t temp_bytes = 0;
    DSV4_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
        nullptr, temp_bytes, keys, sorted, int(chunk * max_rows), int(chunk), seg, seg + chunk, 0, 48, stream_));
    void* temp = scratch("topk_cub_temp", std::max<size_t>(temp_bytes, 16));
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
      const int64_t n = std::min(chunk, T - t0);
      a.q = q.as<uint16_t>() + t0 * Hi * Di;
      a.weights = weights.as<uint16_t>() + t0 * Hi;
      a.positions = batch.positions + t0;
      a.token_seq = batch.token_seq + t0;
      a.topk = topk.as<int32_t>() + t0 * K;
      a.T = n;
      a.keys64 = keys;
      a.keys64_sorted = sorted;
      a.seg_begin = seg;
      a.seg_end = seg + chunk;
      topk_segments_kernel<<<unsigned((n + 255) / 256), 256, 0, stream_>>>(a);
      check_launch(stream_);
      launch_simple_score(std::true_type{}, unsigned(n));
      size_t bytes = 0;
      DSV4_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
          nullptr, bytes, keys, sorted, int(n * max_rows), int(n), seg, seg + chunk, 0, 48, stream_));
      DSV4_CHECK(bytes <= std::max<size_t>(temp_bytes, 16), "indexer_topk: CUB wants {} bytes, {} reserved", bytes,
                 temp_bytes);
      bytes = std::max<size_t>(temp_bytes, 16);
      DSV4_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortKeysDescending(
          temp, bytes, keys, sorted, int(n * max_rows), int(n), seg, seg + chunk, 0, 48, stream_));
      topk_extract_kernel<<<unsigned(n), 256, 0, stream_>>>(a);
      check_launch(stream_);
    }
    return;
  }
  uint16_t* keys = static_cast<uint16_t*>(scratch("topk_keys16", size_t(chunk * max_rows) * 2));
  // The histogram rows are zero between launches: zeroed once here when allocated,
  // then each topk_select_kernel CTA zeroes its row as it reads it. (A memset before
  // each scoring launch was a graph node that no dependent launch crosses: ~8 µs of
  // idle GPU before the scoring at batch 1 in each CSA layer, by the graph trace;
  // docs/BENCHMARKS.md, thirty-fourth session.)
  bool hist_fresh = false;
  uint32_t* hist = static_cast<uint32_t*>(scratch("topk_hist", size_t(chunk) * 256 * 4, &hist_fresh));
  if (hist_fresh) DSV4_CUDA_CHECK(cudaMemsetAsync(hist, 0, size_t(chunk) * 256 * 4, stream_));
  const size_t score_smem = sizeof(ScoreSmem);
  static const bool score_early_env = !env_is("DSV4_CUDA_SCORE_EARLY", "0");
  const int early_forced = g_score_early_forced.load();
  const bool score_early = early_forced >= 0 ? early_forced == 1 : score_early_env;
  static const bool select_early_env = !env_is("DSV4_CUDA_SELECT_EARLY", "0");
  const int select_forced = g_select_early_forced.load();
  const bool select_early = select_forced >= 0 ? select_forced == 1 : select_early_env;
  a.release_select = select_early;
  allow_smem(index_score_mma_kernel<true>, score_smem);
  allow_smem(index_score_mma_kernel<false>, score_smem);
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    a.q = q.as<uint16_t>() + t0 * Hi * Di;
    a.weights = weights.as<uint16_t>() + t0 * Hi;
    a.positions = batch.positions + t0;
    a.token_seq = batch.token_seq + t0;
    a.topk = topk.as<int32_t>() + t0 * K;
    a.T = n;
    a.keys16 = keys;
    a.hist = hist;
    if (mma_ok) {
      a.score_pages = score_pages_per_cta(n, (max_rows + 63) / 64, properties().multiProcessorCount);
      const int64_t chunk_rows = int64_t(64) * a.score_pages;
      const dim3 grid(unsigned((max_rows + chunk_rows - 1) / chunk_rows), unsigned(n));
      if (score_early) index_score_mma_kernel<true><<<grid, 128, score_smem, stream_>>>(a);
      else index_score_mma_kernel<false><<<grid, 128, score_smem, stream_>>>(a);
      check_launch(stream_);
    } else {
      launch_simple_score(std::false_type{}, unsigned(n));
    }
    if (select_early) topk_select_kernel<true><<<unsigned(n), kSelectThreads, 0, stream_>>>(a);
    else topk_select_kernel<false><<<unsigned(n), kSelectThreads, 0, stream_>>>(a);
    check_launch(stream_);
  }
}

namespace {

template <int DH, int MT>
void launch_attention_mma(cudaStream_t stream, const AttnArgs& a, const AttnSplit& sp, int64_t T, int64_t H,
                          size_t smem_limit) {
  using L = AttnLayout<DH, MT>;
  const int head_groups = int((H + MT * 16 - 1) / (MT * 16));
  const size_t smem = L::bytes(a.K);
  DSV4_CHECK(smem <= smem_limit, "sparse_attention: top-{} needs {} bytes of shared memory, the device allows {}", a.K,
             smem, smem_limit);
  const bool early = attention_early();
  const auto kernel = early ? attention_mma_kernel<DH, MT, true> : attention_mma_kernel<DH, MT, false>;
  allow_smem(kernel, smem);
  kernel<<<unsigned(T * head_groups * sp.nsplit), L::kThreads, smem, stream>>>(a, head_groups, sp);
  check_launch(stream);
  if (sp.nsplit > 1) {
    const auto combine = early ? attention_combine_kernel<DH, true> : attention_combine_kernel<DH, false>;
    combine<<<unsigned(T * H), DH / 4, 0, stream>>>(a, sp);
    check_launch(stream);
  }
}

// Per-head results depend neither on how heads are grouped into CTAs (each
// m-tile's arithmetic is the same) nor on how a row's key segments are spread
// over CTAs (one fold order), so both may follow the batch: few rows spread
// their segments over the SMs, many rows take one CTA per 16-64 heads.
template <int DH>
void launch_attention_mma_mt(cudaStream_t stream, const AttnArgs& a, AttnSplit sp, int64_t T, int64_t H,
                             int num_sms, size_t smem_limit) {
  const int64_t tiles = (H + 15) / 16;
  const bool wide = T * tiles > 2 * int64_t(num_sms);
  if (sp.nsplit > 1 || !wide || tiles == 1) return launch_attention_mma<DH, 1>(stream, a, sp, T, H, smem_limit);
  if (tiles == 2 || tiles == 3) return launch_attention_mma<DH, 2>(stream, a, sp, T, H, smem_limit);
  return launch_attention_mma<DH, 4>(stream, a, sp, T, H, smem_limit);
}

}  // namespace

void CudaBackend::do_sparse_attention(const Tensor& q, const Tensor& kv, const LayerCache& cache,
                                      const BatchView& batch, const Tensor& topk, const Tensor& sink,
                                      float softmax_scale, const RopeTable& rope, const Tensor& o) {
  const int64_t T = q.size(0), H = q.size(1), Dh = q.size(2);
  if (T == 0 || H == 0) return;
  DSV4_CHECK(rope.rope_dim == kRope, "sparse_attention: the KV record layout needs rope_dim {}, got {}", kRope,
             rope.rope_dim);
  DSV4_CHECK(Dh % 64 == 0 && Dh > kRope, "sparse_attention: head_dim {} not supported", Dh);
  const int64_t row_bytes = kv_row_bytes(Dh, kRope);
  DSV4_CHECK(cache.window.ndim() == 3 && cache.window.size(2) == row_bytes,
             "sparse_attention: window ring {} does not hold {}-byte records", cache.window.shape_string(), row_bytes);
  const int64_t m = cache.ratio;
  DSV4_CHECK(m == 0 || m == 4 || m == 128, "sparse_attention: ratio {}", m);
  if (m > 0)
    DSV4_CHECK(cache.rows.ndim() == 3 && cache.rows.size(1) == kPageTokens / m && cache.rows.size(2) == row_bytes,
               "sparse_attention: compressed rows {} do not hold {}-byte records", cache.rows.shape_string(),
               row_bytes);
  AttnArgs a{};
  a.q = q.as<uint16_t>();
  a.kv = kv.as<uint16_t>();
  a.window = cache.window.as<uint8_t>();
  a.rows = m > 0 ? cache.rows.as<uint8_t>() : nullptr;
  a.topk = m == 4 ? topk.as<int32_t>() : nullptr;
  a.sink = sink.as<float>();
  a.inv_freq = rope.inv_freq.as<float>();
  a.o = o.as<uint16_t>();
  a.positions = batch.positions;
  a.token_seq = batch.token_seq;
  a.seq_begin = batch.seq_begin;
  a.seq_start_pos = batch.seq_start_pos;
  a.seq_slot = batch.seq_slot;
  a.block_table = batch.block_table;
  a.max_blocks = batch.max_blocks;
  a.T = T;
  a.H = H;
  a.Dh = Dh;
  a.W = cache.window.size(1);
  a.row_bytes = row_bytes;
  a.num_pages = m > 0 ? cache.rows.size(0) : 0;
  a.per_page = m > 0 ? kPageTokens / m : 1;
  a.ratio = m;
  a.K = m == 4 ? topk.size(1) : 0;
  a.scale = softmax_scale;
  // Every key a query can see: the window plus the top-k, or every HCA row the block table covers.
  a.max_keys = a.W + (m == 4 ? a.K : m == 128 ? int64_t(batch.max_blocks) * (kPageTokens / 128) : 0);
  const bool simple = use_simple_kernels();
  const bool mma_ok = (Dh == 512 || Dh == 128) && aligned16(q.data()) && aligned16(kv.data());
  if (simple || !mma_ok) {
    const size_t smem = size_t(Dh) * 4 + size_t((a.max_keys + 1) / 2 * 2) * 4 + size_t(a.max_keys) * (8 + 4) +
                        size_t(a.K) * 4 + 16;
    DSV4_CHECK(smem <= size_t(properties().sharedMemPerBlockOptin),
               "sparse_attention: {} keys per query exceed the simple kernel's shared memory", a.max_keys);
    allow_smem(attention_simple_kernel, smem);
    attention_simple_kernel<<<dim3(unsigned(T), unsigned(H)), 256, smem, stream_>>>(a);
    check_launch(stream_);
    return;
  }
  const size_t limit = properties().sharedMemPerBlockOptin;
  const int num_sms = properties().multiProcessorCount;
  // Split a row's key segments over CTAs while the rows alone (row_ctas CTAs each)
  // would not fill the SMs, and while the partials stay small (they cost a write and
  // a read). Under the lead fold (the wgmma kernel) a row leaves fewer partials than
  // segments (attention_split_lead_partials, at most that of the longest row).
  const int64_t max_segs = (a.max_keys + kSegmentKeys - 1) / kSegmentKeys;
  // The split for row_ctas CTAs a split (its scratch not yet attached), then with it.
  const auto plan_split = [&](int64_t row_ctas, bool lead_fold) {
    AttnSplit sp{1, 1, false, false, nullptr, nullptr, nullptr};
    if (attention_split_disabled() || row_ctas >= num_sms || max_segs <= 1) return sp;
    const int nsplit = split_ctas(row_ctas, max_segs, num_sms);
    lead_fold = lead_fold && lead_fold_wanted(nsplit);
    const int64_t partials = lead_fold ? attention_split_lead_partials(max_segs, nsplit) : max_segs;
    const size_t part_bytes = size_t(T * H * partials) * size_t(Dh + 2) * sizeof(float);
    if (nsplit > 1 && part_bytes <= split_max_partial_bytes()) {
      sp.nsplit = nsplit;
      sp.max_segs = int(partials);
      sp.lead_fold = lead_fold;
      sp.zero_fold = split_zero_fold();
    }
    return sp;
  };
  const auto with_scratch = [&](AttnSplit sp) {
    if (sp.nsplit > 1) {
      const int64_t partials = sp.max_segs;
      sp.o = static_cast<float*>(scratch("attn_split_o", size_t(T * H * partials * Dh) * sizeof(float)));
      sp.ml = static_cast<float*>(scratch("attn_split_ml", size_t(T * H * partials) * 2 * sizeof(float)));
      sp.segs = static_cast<int32_t*>(scratch("attn_split_segs", size_t(T) * sizeof(int32_t)));
    }
    return sp;
  };
  // V4-Flash's shape: the wgmma kernel (the same bits), one CTA a row or, for few
  // rows, the row's segments spread over CTAs; where attention_pair_pays, its pair form
  // (a cluster of two CTAs a row or split; off, a step took +1.9 / +0.5 / +0.3% at 1 / 16 /
  // 64 rows, bench-1g, fifty-fourth session), which also takes a single row. Otherwise a single row stays on
  // the mma.sync kernel's split (CTAs of 16 heads: 4x as many for its few segments), where
  // the wgmma split showed no gain (bench-1g, nineteenth session: +0.15% a step, within
  // the noise; -0.3 / -1.9 / -1.8 / -1.5% at 2 / 4 / 8 / 16 rows).
  // DSV4_CUDA_ATTN_WGMMA_SPLIT=0 leaves every split launch of one CTA a split to
  // attention_mma_kernel. (It zeroes pad rows with 16-byte stores.)
  if (Dh == wg_attn::kDh && H == wg_attn::kHeads && attention_wgmma_wanted() && wg_attn::bytes(a.K) <= limit &&
      aligned16(o.data())) {
    // A split launch's rows finished by the combine kernel.
    const auto combine_split = [&](const AttnSplit& sp, bool early) {
      if (sp.nsplit == 1) return;
      g_wgmma_split_launches.fetch_add(1, std::memory_order_relaxed);
      const auto combine = early ? attention_combine_kernel<wg_attn::kDh, true>
                                 : attention_combine_kernel<wg_attn::kDh, false>;
      combine<<<unsigned(T * H), wg_attn::kDh / 4, 0, stream_>>>(a, sp);
      check_launch(stream_);
    };
    const AttnSplit one_plan = plan_split(T, true), pair_plan = plan_split(2 * T, true);
    if (attention_pair_wanted(T, attention_pair_pays(T, max_segs, num_sms, one_plan.nsplit, pair_plan.nsplit))) {
      // The pair form: a row's dims over a cluster of two CTAs (each split of a row is a
      // cluster), the same bits.
      const AttnSplit sp = with_scratch(pair_plan);
      const bool early = attention_early();
      const auto kernel = sp.nsplit == 1 ? attention_wgmma_kernel<false, false, true>
                          : early        ? attention_wgmma_kernel<true, true, true>
                                         : attention_wgmma_kernel<true, false, true>;
      const size_t smem = wg_attn::Layout<true>::bytes(a.K);
      allow_smem(kernel, smem);
      cudaLaunchAttribute cluster;
      const cudaLaunchConfig_t cfg =
          cluster_launch_config(dim3(unsigned(2 * T * sp.nsplit)), dim3(2), wg_attn::kThreads, smem, stream_, cluster);
      DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a, sp));
      check_launch(stream_);
      g_wgmma_launches.fetch_add(1, std::memory_order_relaxed);
      g_wgmma_pair_launches.fetch_add(1, std::memory_order_relaxed);
      combine_split(sp, early);
      return;
    }
    const AttnSplit sp = with_scratch(one_plan);
    if (sp.nsplit == 1 || (T > 1 && attention_wgmma_split_wanted())) {
      // The early form for split launches (up to 131 rows, where a row's prologue is on
      // the step's chain) and the register fold; one CTA a row with O in local memory
      // keeps the late one, its registers spill more early (ptxas: 144 bytes of spill
      // stores against 104; the register fold: 12 either way).
      const bool early = attention_early();
      const bool fold_regs = sp.nsplit == 1 && attention_fold_regs();
      const auto kernel = fold_regs && early ? attention_wgmma_kernel<false, true, false, true>
                          : fold_regs          ? attention_wgmma_kernel<false, false, false, true>
                          : sp.nsplit == 1     ? attention_wgmma_kernel<false, false>
                          : early              ? attention_wgmma_kernel<true, true>
                                               : attention_wgmma_kernel<true, false>;
      allow_smem(kernel, wg_attn::bytes(a.K));
      kernel<<<unsigned(T * sp.nsplit), wg_attn::kThreads, wg_attn::bytes(a.K), stream_>>>(a, sp);
      check_launch(stream_);
      g_wgmma_launches.fetch_add(1, std::memory_order_relaxed);
      if (fold_regs) g_wgmma_fold_regs_launches.fetch_add(1, std::memory_order_relaxed);
      combine_split(sp, early);
      return;
    }
  }
  const AttnSplit sp = with_scratch(plan_split(T * ((H + 15) / 16), false));
  if (Dh == 512) launch_attention_mma_mt<512>(stream_, a, sp, T, H, num_sms, limit);
  else launch_attention_mma_mt<128>(stream_, a, sp, T, H, num_sms, limit);
}

int64_t cuda_attention_key_decode_mismatches(uint32_t* first) {
  return count_mismatches(key_decode_mismatch_kernel, first);
}

}  // namespace dsv4::ops
