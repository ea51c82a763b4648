// CUDA pointwise ops: embed, gather_rows, add_broadcast, rms_norm, q_norm_rope,
// kv_rope_quant, hc_pre / hc_post / hc_head, moe_reduce, moe_output.
// Design, roofline arithmetic and register counts: docs/design/cuda-attention.md.
//
// Numerics follow the CPU reference (src/ops/cpu) rounding point by rounding
// point. Where the reference's fp32 arithmetic is reproducible at no real cost
// the kernels reproduce it exactly: products and sums that the reference keeps
// unfused use __fmul_rn / __fadd_rn (nvcc would otherwise contract them into
// FMAs), RoPE takes cos/sin of the fp32 angle in double like the reference, and
// the per-head q norm sums its bf16 squares sequentially in the reference order.
// Long fp32 reductions (rms_norm, the 24 mHC mixes) use a fixed tree instead: the
// result is deterministic and independent of the batch (the two-batch-overlap
// bit-identity rule) but may differ from the reference by fp32 rounding.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>

#include "core/dtype.h"
#include "core/scalar_math.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_hooks.h"
#include "ops/cuda/act_quant.cuh"
#include "ops/cuda/block_sum.cuh"
#include "ops/cuda/cluster.cuh"
#include "ops/cuda/cta_probe.cuh"
#include "ops/cuda/e4m3_cast.cuh"
#include "ops/cuda/grid_dependency.cuh"
#include "ops/cuda/mbarrier.cuh"
#include "ops/cuda/quantized_linear.h"

namespace dsv4::ops {

using core::Tensor;

namespace {

std::atomic<int> g_force_row_mix{-1};
std::atomic<int> g_force_row_split{0};
std::atomic<int64_t> g_row_mix_launches{0};
std::atomic<int> g_force_hc_fused{-1};
std::atomic<int> g_force_slot_rows{-1};
std::atomic<int> g_force_hc_quick{-1};
std::atomic<int> g_force_hc_row_finishers{-1};
std::atomic<int64_t> g_hc_fused_launches{0};
std::atomic<int64_t> g_hc_two_finisher_launches{0};
std::atomic<int> g_force_hc_cluster{-1};
std::atomic<int64_t> g_hc_cluster_launches{0};
std::atomic<int> g_force_hc_post_slots{-1};
std::atomic<int64_t> g_hc_post_slots_launches{0};
std::atomic<int> g_force_norm_early{-1};
std::atomic<int64_t> g_norm_early_launches{0};

// ---- shared helpers ------------------------------------------------------------

unsigned grid_for(int64_t work_items, int threads) {
  const int64_t blocks = (work_items + threads - 1) / threads;
  return unsigned(blocks < 1 ? 1 : (blocks > 65536 * 8 ? 65536 * 8 : blocks));
}

__device__ __forceinline__ float bf2f(uint16_t h) { return core::bf16_to_float(h); }
__device__ __forceinline__ uint16_t f2bf(float x) { return core::float_to_bf16(x); }
__device__ __forceinline__ float round_bf(float x) { return core::round_bf16(x); }

// VEC bf16 values through one aligned access (VEC = 8: 16 bytes, 2: 4 bytes, 1: 2 bytes).
template <int VEC>
struct BfVec {
  uint16_t v[VEC];
};
template <int VEC>
__device__ __forceinline__ BfVec<VEC> load_bf(const uint16_t* p) {
  BfVec<VEC> r;
  if constexpr (VEC == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      r.v[2 * i] = uint16_t(w[i] & 0xffffu);
      r.v[2 * i + 1] = uint16_t(w[i] >> 16);
    }
  } else if constexpr (VEC == 2) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
    r.v[0] = uint16_t(w & 0xffffu);
    r.v[1] = uint16_t(w >> 16);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) r.v[i] = p[i];
  }
  return r;
}
template <int VEC>
__device__ __forceinline__ void store_bf(uint16_t* p, const BfVec<VEC>& r) {
  if constexpr (VEC == 8) {
    uint4 u;
    u.x = uint32_t(r.v[0]) | (uint32_t(r.v[1]) << 16);
    u.y = uint32_t(r.v[2]) | (uint32_t(r.v[3]) << 16);
    u.z = uint32_t(r.v[4]) | (uint32_t(r.v[5]) << 16);
    u.w = uint32_t(r.v[6]) | (uint32_t(r.v[7]) << 16);
    *reinterpret_cast<uint4*>(p) = u;
  } else if constexpr (VEC == 2) {
    *reinterpret_cast<uint32_t*>(p) = uint32_t(r.v[0]) | (uint32_t(r.v[1]) << 16);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = r.v[i];
  }
}

// cos/sin of the fp32 angle pos * inv_freq[i], evaluated in double and rounded to
// fp32 exactly as ref::rope_bf16 does (torch.polar on the fp32 angle).
__device__ __forceinline__ void rope_cos_sin(int64_t pos, float inv_freq, float* c, float* s) {
  const float angle = __fmul_rn(float(pos), inv_freq);
  *c = float(cos(double(angle)));
  *s = float(sin(double(angle)));
}

// One interleaved RoPE pair on bf16 values (spec §2.3), unfused like the reference.
__device__ __forceinline__ void rope_pair(uint16_t* a, uint16_t* b, float c, float s) {
  const float x = bf2f(*a), y = bf2f(*b);
  *a = f2bf(__fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s)));
  *b = f2bf(__fadd_rn(__fmul_rn(x, s), __fmul_rn(y, c)));
}

// ---- embed ---------------------------------------------------------------------
// Roofline: T*D*2 bytes read, T*hc*D*2 written (decode: negligible; launch-bound).
template <int VEC>
__global__ void embed_kernel(const uint16_t* __restrict__ table, int64_t V, const int32_t* __restrict__ ids,
                             int64_t hc, int64_t D, uint16_t* __restrict__ X) {
  wait_then_release_dependents();
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  const bool valid = id >= 0 && id < V;  // an invalid id (the CPU throws) gives zero rows
  for (int64_t c = threadIdx.x; c < D / VEC; c += blockDim.x) {
    BfVec<VEC> v;
    if (valid) {
      v = load_bf<VEC>(table + int64_t(id) * D + c * VEC);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v.v[i] = 0;
    }
    for (int64_t i = 0; i < hc; ++i) store_bf<VEC>(X + (t * hc + i) * D + c * VEC, v);
  }
}

// ---- gather_rows ---------------------------------------------------------------
template <typename U>
__global__ void gather_rows_kernel(const U* __restrict__ src, int64_t src_rows, const int32_t* __restrict__ rows,
                                   int64_t units_per_row, U* __restrict__ dst) {
  wait_then_release_dependents();
  const int64_t i = blockIdx.x;
  const int32_t r = rows[i];
  U* out = dst + i * units_per_row;
  if (r < 0 || r >= src_rows) {  // the CPU throws; the GPU writes a zero row
    for (int64_t u = threadIdx.x; u < units_per_row; u += blockDim.x) out[u] = U{};
    return;
  }
  const U* in = src + int64_t(r) * units_per_row;
  for (int64_t u = threadIdx.x; u < units_per_row; u += blockDim.x) out[u] = in[u];
}

// ---- add_broadcast -------------------------------------------------------------
template <int VEC>
__global__ void add_broadcast_kernel(const uint16_t* __restrict__ e, const uint16_t* __restrict__ h, int64_t T,
                                     int64_t hc, int64_t D, uint16_t* __restrict__ X) {
  wait_then_release_dependents();
  const int64_t chunks = T * hc * D / VEC;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t idx = c * VEC, t = idx / (hc * D), d = idx % D;
    const BfVec<VEC> a = load_bf<VEC>(e + t * D + d), b = load_bf<VEC>(h + idx);
    BfVec<VEC> y;
#pragma unroll
    for (int i = 0; i < VEC; ++i) y.v[i] = f2bf(__fadd_rn(bf2f(a.v[i]), bf2f(b.v[i])));
    store_bf<VEC>(X + idx, y);
  }
}

// ---- rms_norm ------------------------------------------------------------------
// One CTA per row. Roofline: 2*N*2 bytes per row (+ weight from L2); at D=4096 a
// decode row is 16 KB: launch-bound at small T, bandwidth-bound from ~T=512.
// y may alias x: every element is read by the thread that later writes it, and
// the reads of the first pass finish before the block-wide reduction barrier.
// rms_norm of one row by the whole block (256 threads), shared with hc_finish_kernel
// (hc_pre_norm), so that both give the same bits.
// With q_row (VEC = 8, N % 128 == 0, blockDim.x a multiple of 32): y is also quantized
// for an FP8 linear as it is written (quant_chunk8: act_quant's codes and scales).
template <int VEC>
__device__ void rms_norm_row(const uint16_t* xr, const uint16_t* __restrict__ w, int64_t N, float eps, uint16_t* yr,
                             float* red /* [32] */, uint8_t* q_row = nullptr, float* s_row = nullptr) {
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < N / VEC; c += blockDim.x) {
    const BfVec<VEC> v = load_bf<VEC>(xr + c * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float a = bf2f(v.v[i]);
      ss = fmaf(a, a, ss);
    }
  }
  const float total = block_sum(ss, red);
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(total, float(N)), eps)));
  if constexpr (VEC == 8) {
    if (q_row) {  // every thread the same number of passes (quant_chunk8's shuffles)
      for (int64_t base = 0; base < N / VEC; base += blockDim.x) {
        const int64_t c = base + threadIdx.x;
        const bool live = c < N / VEC;
        float f[8] = {};
        if (live) {
          const BfVec<VEC> v = load_bf<VEC>(xr + c * VEC), wv = load_bf<VEC>(w + c * VEC);
          BfVec<VEC> o;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            o.v[i] = f2bf(__fmul_rn(bf2f(wv.v[i]), __fmul_rn(bf2f(v.v[i]), r)));
            f[i] = bf2f(o.v[i]);
          }
          store_bf<VEC>(yr + c * VEC, o);
        }
        quant_chunk8(f, live, c, q_row, s_row);
      }
      return;
    }
  }
  for (int64_t c = threadIdx.x; c < N / VEC; c += blockDim.x) {
    const BfVec<VEC> v = load_bf<VEC>(xr + c * VEC), wv = load_bf<VEC>(w + c * VEC);
    BfVec<VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = f2bf(__fmul_rn(bf2f(wv.v[i]), __fmul_rn(bf2f(v.v[i]), r)));
    store_bf<VEC>(yr + c * VEC, o);
  }
}

// The early form of rms_norm_row<8> (kChunks = ceil(N / 8 / blockDim.x), 1 or 2: the
// kernels' norms at N <= 4096): the norm weights of the thread's chunks c = tid + k *
// blockDim.x are loaded by the caller before its dependency wait (no kernel writes a
// weight), and x's chunks stay in registers from the sum to the output, where the late
// form loads the weights after the block's sum and x a second time. Why: at batch 1 these
// norms are one-CTA links of the layer's chain (kv's, q's before wq_b, the final norm)
// that run while GEMMs stream beside them, where every dependent round trip to memory
// takes a few µs (eighty-first session, batch-1 graph trace on an H100: `rms_norm` 9.5-10.7
// µs on the kv lane of the HCA layers, `rms_norm_quant` ~7 µs after a plain edge in the
// CSA layers). The same values in the same order: the same bits.
template <int kChunks>
struct NormRowWeights {
  BfVec<8> w[kChunks];
  __device__ __forceinline__ void load(const uint16_t* __restrict__ wr, int64_t N) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
      if (c < N / 8) w[k] = load_bf<8>(wr + c * 8);
    }
  }
};

template <int kChunks>
__device__ void rms_norm_row_early(const uint16_t* xr, const NormRowWeights<kChunks>& wr, int64_t N, float eps,
                                   uint16_t* yr, float* red /* [32] */, uint8_t* q_row = nullptr,
                                   float* s_row = nullptr) {
  BfVec<8> xv[kChunks];
  float ss = 0.0f;  // rms_norm_row's order: this thread's chunks ascending, their values in order
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
    if (c < N / 8) {
      xv[k] = load_bf<8>(xr + c * 8);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float a = bf2f(xv[k].v[i]);
        ss = fmaf(a, a, ss);
      }
    }
  }
  const float total = block_sum(ss, red);  // (its barrier also orders every read of x before y's writes)
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(total, float(N)), eps)));
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {  // every thread kChunks passes (quant_chunk8's shuffles)
    const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
    const bool live = c < N / 8;
    float f[8] = {};
    if (live) {
      BfVec<8> o;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        o.v[i] = f2bf(__fmul_rn(bf2f(wr.w[k].v[i]), __fmul_rn(bf2f(xv[k].v[i]), r)));
        f[i] = bf2f(o.v[i]);
      }
      store_bf<8>(yr + c * 8, o);
    }
    if (q_row) quant_chunk8(f, live, c, q_row, s_row);  // (uniform branch)
  }
}

// kEarlyChunks > 0 (VEC = 8): the early form above with that many chunks a thread.
template <int VEC, int kEarlyChunks = 0>
__global__ void rms_norm_kernel(const uint16_t* x, const uint16_t* __restrict__ w, int64_t N, float eps,
                                uint16_t* y) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  if constexpr (kEarlyChunks > 0) {
    static_assert(VEC == 8, "rms_norm_kernel: the early form takes 8-value chunks");
    NormRowWeights<kEarlyChunks> wr;
    wr.load(w, N);
    wait_then_release_dependents();
    rms_norm_row_early<kEarlyChunks>(x + row * N, wr, N, eps, y + row * N, red);
  } else {
    wait_then_release_dependents();
    rms_norm_row<VEC>(x + row * N, w, N, eps, y + row * N, red);
  }
}

// rms_norm_linear's first launch: y = rms_norm(x) and its quantization q, s (rows of
// N and N / 128) for the linear, the bits of rms_norm_kernel<8> and act_quant_kernel.
template <int kEarlyChunks = 0>
__global__ void rms_norm_quant_kernel(const uint16_t* x, const uint16_t* __restrict__ w, int64_t N, float eps,
                                      uint16_t* y, uint8_t* __restrict__ q, float* __restrict__ s,
                                      int release_at_entry) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  if (release_at_entry) allow_dependents_to_launch();  // (cuda_entry_release_rows())
  if constexpr (kEarlyChunks > 0) {
    NormRowWeights<kEarlyChunks> wr;
    wr.load(w, N);
    wait_then_release_dependents();
    rms_norm_row_early<kEarlyChunks>(x + row * N, wr, N, eps, y + row * N, red, q + row * N,
                                     s + row * (N / 128));
  } else {
    wait_then_release_dependents();
    rms_norm_row<8>(x + row * N, w, N, eps, y + row * N, red, q + row * N, s + row * (N / 128));
  }
}

// ---- q_norm_rope ---------------------------------------------------------------
// One CTA per (token, group of up to 8 heads) holding those heads' query rows in
// shared memory (rows padded by 8 values); 8 warps, one head per warp, each from
// its row's load to its store. The
// reference normalises in bf16 arithmetic; its sum of the bf16-rounded squares
// runs in the fixed order of ref::sum_bf16_squares_lanes32 (32 interleaved
// partials, then a pairwise tree), which a warp reproduces with an xor-shuffle
// butterfly: 16 dependent adds per lane at Dh = 512 instead of the 512-long chain
// of one thread per head in one CTA per token (28 us at batch 1, most of it that
// chain).
// Roofline: 2*H*Dh*2 bytes per token (64 KB read + 64 KB written at H=64, Dh=512).
template <int VEC>
__global__ void q_norm_rope_kernel(uint16_t* __restrict__ q, const int32_t* __restrict__ positions,
                                   const float* __restrict__ inv_freq, int64_t H_all, int64_t Dh, int64_t rd,
                                   float eps, int64_t heads_per_cta) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t stride = Dh + 8;
  const int64_t h0 = int64_t(blockIdx.y) * heads_per_cta;
  const int64_t H = H_all - h0 < heads_per_cta ? H_all - h0 : heads_per_cta;  // this CTA's heads
  const int64_t plane = (heads_per_cta * stride * 2 + 15) / 16 * 16;                      // bytes
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem_raw);                                   // [H][Dh + 8]
  float* cs = reinterpret_cast<float*>(smem_raw + plane);                                 // [rd/2] cos
  float* sn = cs + rd / 2;                                                                // [rd/2] sin
  const int64_t t = blockIdx.x;
  const int32_t pos = positions[t];
  uint16_t* qt = q + (t * H_all + h0) * Dh;
  // The RoPE table first, before the dependency wait: the angles depend only on the
  // position (step metadata uploaded before the step) and inv_freq (a weight), which no
  // kernel writes, so their double-precision cos and sin run under the predecessor's
  // tail where it releases this launch early (in SWA layers the wq_b GEMM, after its
  // main loop).
  if (pos >= 0)
    for (int64_t i = threadIdx.x; i < rd / 2; i += blockDim.x) rope_cos_sin(pos, inv_freq[i], cs + i, sn + i);
  wait_then_release_dependents();
  // Warp w owns heads w, w + warps, ... (one at 8 heads a CTA) from load to store, so
  // only the RoPE table is shared across warps: one block barrier, which also orders
  // each warp's own row. (A flat (head, chunk) loop over the block cost a 32-bit
  // division per chunk and two block barriers: ncu at batch 256 had the kernel
  // issue-bound, 25 µs a launch.)
  const int lane = threadIdx.x & 31, warp = int(threadIdx.x >> 5), warps = int(blockDim.x >> 5), dh = int(Dh);
  for (int h = warp; h < int(H); h += warps)
    for (int i = lane * VEC; i < dh; i += 32 * VEC)
      store_bf<VEC>(qs + h * stride + i, load_bf<VEC>(qt + int64_t(h) * Dh + i));
  __syncthreads();  // the table (and each warp's row)
  const int64_t rope_begin = Dh - rd;
  for (int h = warp; h < int(H); h += warps) {
    uint16_t* v = qs + h * stride;
    float sum = 0.0f;
    for (int i = lane; i < dh; i += 32) {
      const float a = bf2f(v[i]);
      sum = __fadd_rn(sum, round_bf(__fmul_rn(a, a)));
    }
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) sum = __fadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, off));
    // Every lane holds the same sum (the butterfly adds the same pairs in every lane).
    const float mean = round_bf(__fdiv_rn(sum, float(Dh)));
    const float r = round_bf(__fdiv_rn(1.0f, __fsqrt_rn(round_bf(__fadd_rn(mean, eps)))));
    for (int i = lane * VEC; i < dh; i += 32 * VEC) {
      BfVec<VEC> b = load_bf<VEC>(v + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) b.v[k] = f2bf(__fmul_rn(bf2f(b.v[k]), r));
      if (pos >= 0 && i + VEC > rope_begin) {
#pragma unroll
        for (int k = 0; k < VEC; k += 2) {
          const int64_t d = i + k;  // even; rope_begin is even, so pairs never straddle a vector
          if (d >= rope_begin) {
            const int64_t pair = (d - rope_begin) / 2;
            rope_pair(&b.v[k], &b.v[k + 1], cs[pair], sn[pair]);
          }
        }
      }
      store_bf<VEC>(qt + int64_t(h) * Dh + i, b);
    }
  }
}

// ---- kv_rope_quant -------------------------------------------------------------
// One warp per row; lane l of pass k owns the 8 values [8(32k+l), 8(32k+l)+8), so a
// 64-value FP8 block is 8 consecutive lanes and its amax is 3 xor-shuffles.
// Forward RoPE of the last rd dims, then the FP8 QAT simulation (block 64, UE8M0)
// of the rest, exactly ref::fp8_sim_bf16. Roofline: 2*Dh*2 bytes per row.
__device__ __forceinline__ float fp8_exponent_scale_inv(float amax, float* scale) {
  const int e = core::ceil_log2_bits(fmaxf(amax, 1e-4f) * (1.0f / 448.0f));
  *scale = core::pow2_float(e);
  return core::pow2_float(-e);
}

// The RoPE table of one row at `pos`, lane l taking pairs l, l + 32, ...: cs[i] =
// cos, cs[rd/2 + i] = sin of pair i (rope_cos_sin: a double-precision cos and sin).
// The angles depend only on the position (step metadata the host uploads before the
// step) and inv_freq (a weight): no kernel writes either, so kv_rope_quant_kernel
// evaluates them before its dependency wait, one pair a lane, under rms_norm's tail
// where rms_norm releases it early (before: each of the 8 RoPE lanes took its 4 pairs
// one after the other, after the wait; 5 µs a launch alone under ncu at 1 and 16 rows).
// The caller orders the table with __syncwarp().
__device__ __forceinline__ void rope_table_warp(int32_t pos, const float* __restrict__ inv_freq, int64_t rd,
                                                float* cs, int lane) {
  for (int64_t i = lane; i < rd / 2; i += 32) {
    const float f = inv_freq[i];  // loaded whatever pos is: in flight together with pos
    if (pos >= 0) rope_cos_sin(pos, f, cs + i, cs + rd / 2 + i);
  }
}

// Dynamic shared memory: [warps][rd] floats, each warp's RoPE table (8 warps: 32 KB
// at the largest rope_dim the launchers take).
constexpr int64_t kKvMaxRopeDim = 1024;
__global__ void kv_rope_quant_kernel(uint16_t* __restrict__ kv, int64_t T, const int32_t* __restrict__ positions,
                                     const float* __restrict__ inv_freq, int64_t Dh, int64_t rd) {
  extern __shared__ float kv_rope_cs[];
  const int lane = threadIdx.x & 31, warp = int(threadIdx.x >> 5);
  const int64_t row = blockIdx.x * int64_t(blockDim.x >> 5) + warp;
  if (row >= T) return;  // whole warps exit together (an exited warp counts as released)
  const int32_t pos = positions[row];
  float* cs = kv_rope_cs + warp * rd;
  rope_table_warp(pos, inv_freq, rd, cs, lane);
  wait_then_release_dependents();
  __syncwarp();  // the table
  uint16_t* v = kv + row * Dh;
  const int64_t nope = Dh - rd;
  for (int64_t base = 0; base < Dh; base += 256) {
    const int64_t i = base + 8 * lane;
    const bool in_row = i < Dh;
    BfVec<8> b;
    if (in_row) b = load_bf<8>(v + i);
    else
#pragma unroll
      for (int k = 0; k < 8; ++k) b.v[k] = 0;
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(bf2f(b.v[k])));
    // Blocks of 64 are 8 aligned lanes; every lane takes part in the shuffles.
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (!in_row) continue;
    if (i < nope) {
      float s;
      const float inv = fp8_exponent_scale_inv(amax, &s);
#pragma unroll
      for (int k = 0; k < 8; k += 2) {
        // Clamped first as std::clamp (a NaN stays NaN), then the hardware cast: the
        // reference cast's bits (e4m3_cast.cuh).
        const float x0 = core::clamp_f32(__fmul_rn(bf2f(b.v[k]), inv), -448.0f, 448.0f);
        const float x1 = core::clamp_f32(__fmul_rn(bf2f(b.v[k + 1]), inv), -448.0f, 448.0f);
        const uint32_t c = e4m3x2_sat(x0, x1);
        b.v[k] = f2bf(__fmul_rn(core::e4m3_to_float(uint8_t(c)), s));
        b.v[k + 1] = f2bf(__fmul_rn(core::e4m3_to_float(uint8_t(c >> 8)), s));
      }
    } else if (pos >= 0) {
#pragma unroll
      for (int k = 0; k < 8; k += 2) {
        const int64_t pair = (i + k - nope) / 2;
        rope_pair(&b.v[k], &b.v[k + 1], cs[pair], cs[rd / 2 + pair]);
      }
    }
    store_bf<8>(v + i, b);
  }
}

// ---- mHC: hc_pre / hc_head -----------------------------------------------------
// Stage 1 (hc_mix_partial_kernel) is a skinny GEMM mixes[t, j] = fn[j] . X[t] over
// K = hc*D, split into fixed slices of kHcSlice = 128 values (S = K/128 = 128 at
// D = 4096): CTA (slice, 32-row tile) stages fn[:, slice] (24 x 128 f32) and the
// tile's X in shared memory; lane j of each warp computes mix j for 4 rows (lanes
// mix .. mix + 3: the 4 rows' sums of squares). fn (1.5 MB) is read from HBM once per step and
// from L2 by the other row tiles. Stage 2 (hc_finish_kernel) adds the S partials
// in slice order (deterministic, independent of T), applies the norm, sigmoid
// and Sinkhorn (one thread, the reference order) and forms x = sum_i pre_i R_i.
// Roofline at D = 4096, T = 256: fn 1.5 MB + X 2 x 8 MB -> ~6 us at 3 TB/s; at
// T = 1 the 1.5 MB of fn over 128 CTAs, ~2-3 us.
constexpr int kHcSlice = 128;
constexpr int kHcMaxRowsPerLaunch = 512;  // bounds the partial scratch (S x 512 x 32 f32)

// moe_reduce's order (spec §6.2): a row's k slot ids (ids[0 .. k), any memory) sorted
// into order[0 .. n) by ascending expert id, equal ids in slot order, ids < 0 skipped
// (insertion sort, one thread); returns n. moe_reduce_kernel's; the mix's slot sums
// (hc_mix_partial_tile) form the same order by ranks, so both add in the same order.
__device__ __forceinline__ int moe_slot_order(const int32_t* ids, int k, int* order) {
  int n = 0;
  for (int s = 0; s < k; ++s) {
    const int32_t id = ids[s];
    if (id < 0) continue;
    int pos = n++;
    while (pos > 0 && ids[order[pos - 1]] > id) {  // strictly greater: equal ids keep slot order
      order[pos] = order[pos - 1];
      --pos;
    }
    order[pos] = s;
  }
  return n;
}

// moe_slot_order's order by ranks, for a thread a slot: slot `slot`'s place among the row's
// k ids (row_ids, shared memory): the valid slots with a smaller id, or the same id in an
// earlier slot. *count: the row's valid slots. (The place of a slot with id < 0 is unused.)
__device__ __forceinline__ int moe_slot_place(const int32_t* row_ids, int k, int slot, int* count) {
  const int32_t id = row_ids[slot];
  int place = 0, n = 0;
  for (int u = 0; u < k; ++u) {
    const int32_t other = row_ids[u];
    n += other >= 0;
    place += other >= 0 && (other < id || (other == id && u < slot));
  }
  *count = n;
  return place;
}

// VEC columns of row t's routed sum from slot_out [T, k, D] (row at `row`, a pointer to
// slot (t, 0)'s column block): an fp32 sum from 0 over the n ordered slots.
template <int VEC>
__device__ __forceinline__ void moe_slot_sum(const uint16_t* row, int64_t D, const int* order, int n,
                                             float (&acc)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
#pragma unroll 8
  for (int s = 0; s < n; ++s) {
    const BfVec<VEC> v = load_bf<VEC>(row + int64_t(order[s]) * D);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], bf2f(v.v[i]));
  }
}

// moe_output of one value: bf16(routed + shared) (spec §6.2).
__device__ __forceinline__ uint16_t moe_output_value(float routed, uint16_t shared) {
  return f2bf(__fadd_rn(routed, bf2f(shared)));
}

// hc_post of one value of stream j (spec §4.2): bf16(post_j f + sum_i comb[i][j] R_i),
// the sum in i order; c[i] = comb[i][j], r[i] = R_i. hc_post_kernel and the mix kernel
// that forms the stream (hc_post_pre_norm) both use it, so both give the same bits.
template <int HC>
__device__ __forceinline__ uint16_t hc_post_value(float pj, uint16_t f, const float (&c)[HC],
                                                  const uint16_t (&r)[HC]) {
  float mixed = 0.0f;
#pragma unroll
  for (int i = 0; i < HC; ++i) mixed = __fadd_rn(mixed, __fmul_rn(c[i], bf2f(r[i])));
  return f2bf(__fadd_rn(__fmul_rn(pj, bf2f(f)), mixed));
}

// The stream an hc_post forms for the mix (hc_post_pre_norm, kPostHc): X = Y with
// Y[t, j, d] = bf16(post_j f + sum_i comb[i][j] R_i), hc_post_kernel's arithmetic; f
// is the sublayer output, or bf16(routed + shared) (moe_output's, stored to y by the
// slices of stream 0) where f is null. Y is stored as it is formed.
struct HcPostSource {
  const uint16_t* f = nullptr;       // [T, D]
  const float* routed = nullptr;     // [T, D]
  const uint16_t* shared = nullptr;  // [T, D]
  uint16_t* y = nullptr;             // [T, D]
  const uint16_t* R = nullptr;       // [T, hc, D]
  const float* post = nullptr;       // [T, hc]
  const float* comb = nullptr;       // [T, hc, hc]
  uint16_t* Y = nullptr;             // [T, hc, D]
  int hc = 0;
  int64_t D = 0;
  // HcPostInput::of_moe_slots: routed = moe_reduce(slot_out, ids) is formed by the mix
  // (not stored); null: routed is read.
  const uint16_t* slot_out = nullptr;  // [T, k, D]
  const int32_t* ids = nullptr;        // [T, k]
  int k = 0;
};

// Slots a row may have where the mix forms routed from them (the slot order in shared memory).
constexpr int kHcMaxSlots = 16;

// Rows an hc_post source may have (one launch): the fusion saves a launch where the
// step is a latency chain. Measured at up to 64 rows with a per-element form (no
// unrolled loads), it was 3-5% slower a step at batch 1-64 (docs/BENCHMARKS.md).
// Instances for up to 8 and up to 16 rows (the registers for the loads in flight).
constexpr int kHcPostMaxRows = 16;

// kRows rows per warp, 8 warps: 32-row tiles, or 64-row tiles from 65 rows where
// mix + 8 <= 32 (at batch 256 the 32-row tiles made 1024 CTAs, 1.3 waves of 6 CTAs
// an SM, each a load round trip then its FMAs: ~27 µs a launch, ncu; 64-row tiles
// are 512 CTAs, one wave of 4 an SM, and read each fn value once per 8 rows).
// Launch bounds: 4 CTAs an SM for the 64-row tiles (64 registers, 28 bytes of spill
// in the staging; 76 registers and 3 CTAs without); no minimum (0) for the 32-row
// tiles, which take 64 registers without spilling only then.
// kPostHc > 0 (32-row tiles, at most kPostRows rows): the X tile is formed from src
// (kPostHc = its hc) as above, not read: every load of a thread's elements is issued
// before the first is used (one round trip), then Y is formed and stored.
// A mix tile's wait for its predecessor. kFused (hc_mix_finish_kernel): the wait alone;
// the slice CTAs let the dependents launch by exiting, the finish CTAs once every slice
// is done (so that the next GEMM's weight copies, issued before its own wait, do not
// compete with the slices' loads: with every CTA releasing after its wait, an early form
// of the fused launch ended 17.8 µs after its predecessor at 16 rows where the two
// launches end ~10.7 after it, graph trace, H200).
template <bool kFused>
__device__ __forceinline__ void hc_tile_wait() {
  if constexpr (kFused) {
    wait_for_predecessor();
  } else {
    wait_then_release_dependents();
  }
}

// The tile's shared memory. Rows padded to 132 floats: 16-byte aligned for the float4
// reads below, and lane l's fn row starts 4 banks after lane l-1's (conflict-free
// 128-bit reads).
template <int kRows>
struct HcMixTileSmem {
  static constexpr int kPad = kHcSlice + 4;
  float fn_s[32 - kRows][kPad];  // one lane per mix, then one per row's sum of squares
  float x_s[8 * kRows][kPad];
};

// One lane's dot products over a 128-wide slice for kRows rows: acc[r] = w . x[r], an FMA
// chain from zero over k = 0 .. 127, four at a time in x, y, z, w order (the CPU's
// dots_in_slices_of_128). The mix tile and the cluster kernel both run it, so their
// partials have the same bits.
template <int kRows, int kStride>
__device__ __forceinline__ void hc_slice_dots(const float* w, const float (*x)[kStride], float (&acc)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  for (int k = 0; k < kHcSlice; k += 4) {
    const float4 w4 = *reinterpret_cast<const float4*>(w + k);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float4 x4 = *reinterpret_cast<const float4*>(&x[r][k]);
      acc[r] = fmaf(w4.x, x4.x, acc[r]);
      acc[r] = fmaf(w4.y, x4.y, acc[r]);
      acc[r] = fmaf(w4.z, x4.z, acc[r]);
      acc[r] = fmaf(w4.w, x4.w, acc[r]);
    }
  }
}

// The tile (slice, rows r0 ..) by threads 0-255 (kFused: in hc_mix_finish_kernel).
template <int kRows, int kPostHc, int kPostRows, bool kFused>
__device__ __forceinline__ void hc_mix_partial_tile(const uint16_t* __restrict__ X, const float* __restrict__ fn,
                                                    int64_t rows, int64_t n, int mix, float* __restrict__ partial,
                                                    const HcPostSource& src, int64_t slice, int64_t r0,
                                                    HcMixTileSmem<kRows>& sm, const void* probe_tag = nullptr) {
  static_assert(kPostHc == 0 || (kRows == 4 && kPostRows <= kHcPostMaxRows),
                "an hc_post source only for the 32-row tiles, up to kHcPostMaxRows rows");
  constexpr int kHcRowTile = 8 * kRows;
  constexpr int kMaxMix = 32 - kRows;
  auto& fn_s = sm.fn_s;
  auto& x_s = sm.x_s;
  const int64_t k0 = slice * kHcSlice;
  // Every load of the tile is issued before the first is used: one DRAM round trip
  // instead of one per loop iteration (ncu at batch 1: 15 -> 12 µs a launch). fn is
  // a weight: its loads go out before the wait for the predecessor (dependent launch).
  if constexpr (kRows == 8) {
    // fn by cp.async straight into shared memory, X by 16-byte loads (the host checks
    // both are 16-byte aligned): 16 registers in flight a thread instead of 44 (with
    // 2- and 4-byte loads into registers: 118 registers, two CTAs an SM).
    constexpr int kFnVec = kMaxMix * kHcSlice / 4 / 256, kXVec = kHcRowTile * kHcSlice / 8 / 256;
    static_assert(kMaxMix * kHcSlice % 1024 == 0 && kHcRowTile * kHcSlice % 2048 == 0, "whole tiles per pass");
#pragma unroll
    for (int u = 0; u < kFnVec; ++u) {
      const int idx = int(threadIdx.x) + 256 * u, row = idx / (kHcSlice / 4), c = (idx % (kHcSlice / 4)) * 4;
      if (row < mix)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                     ::"r"(uint32_t(__cvta_generic_to_shared(&fn_s[row][c]))), "l"(fn + int64_t(row) * n + k0 + c));
    }
    asm volatile("cp.async.commit_group;\n" ::);
    hc_tile_wait<kFused>();
    DSV4_CTA_PROBE(kFused ? CtaProbeSite::kHcMixFinish : CtaProbeSite::kHcMixPartial, kFused ? 7 : 1, probe_tag);
    uint4 xv[kXVec];
#pragma unroll
    for (int u = 0; u < kXVec; ++u) {
      const int idx = int(threadIdx.x) + 256 * u, r = idx / (kHcSlice / 8), c = (idx % (kHcSlice / 8)) * 8;
      xv[u] = r0 + r < rows ? *reinterpret_cast<const uint4*>(X + (r0 + r) * n + k0 + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kXVec; ++u) {
      const int idx = int(threadIdx.x) + 256 * u, r = idx / (kHcSlice / 8), c = (idx % (kHcSlice / 8)) * 8;
      const uint32_t w[4] = {xv[u].x, xv[u].y, xv[u].z, xv[u].w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        x_s[r][c + 2 * e] = bf2f(uint16_t(w[e] & 0xffffu));
        x_s[r][c + 2 * e + 1] = bf2f(uint16_t(w[e] >> 16));
      }
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
  } else {
    constexpr int kFnPer = (kMaxMix * kHcSlice + 255) / 256, kXPer = kHcRowTile * kHcSlice / 256;
    static_assert(kHcRowTile * kHcSlice % 256 == 0, "whole x tile per pass");
    float fv[kFnPer], xv[kXPer];
    if constexpr (kFused) {
      // fn by cp.async straight into shared memory (the host checks 16-byte rows): 14
      // registers a thread fewer, so that the fused kernel (the finish's code beside the
      // tile's) holds the 16-row tile's loads in flight without spilling.
      constexpr int kPieces = kMaxMix * kHcSlice / 4;  // 16-byte pieces
#pragma unroll
      for (int u = 0; u < (kPieces + 255) / 256; ++u) {
        const int idx = int(threadIdx.x) + 256 * u, row = idx / (kHcSlice / 4), c = (idx % (kHcSlice / 4)) * 4;
        if (idx < kPieces && row < mix)
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(uint32_t(__cvta_generic_to_shared(
                           &fn_s[row][c]))),
                       "l"(fn + int64_t(row) * n + k0 + c));
      }
      asm volatile("cp.async.commit_group;\n" ::);
    } else {
#pragma unroll
      for (int u = 0; u < kFnPer; ++u) {
        const int idx = int(threadIdx.x) + 256 * u;
        fv[u] = idx < mix * kHcSlice ? fn[int64_t(idx / kHcSlice) * n + k0 + idx % kHcSlice] : 0.0f;
      }
    }
    hc_tile_wait<kFused>();
    DSV4_CTA_PROBE(kFused ? CtaProbeSite::kHcMixFinish : CtaProbeSite::kHcMixPartial, kFused ? 7 : 1, probe_tag);
    if constexpr (kPostHc > 0) {
      // Y[t, j, d] = bf16(post_j f + sum_i comb[i][j] R_i), hc_post_kernel's arithmetic;
      // the slice lies in stream j (D % 128 == 0). Rows < kPostRows: elements u < kU.
      constexpr int HC = kPostHc, kU = kPostRows * kHcSlice / 256;
      static_assert(kU <= kXPer, "the source rows fit one tile");
      const int64_t D = src.D, d0 = k0 % D;
      const int j = int(k0 / D);
      if (src.slot_out) {
        // routed = moe_reduce(slot_out, ids) for this slice's columns, moe_reduce_kernel's
        // arithmetic (each row's slots in ascending expert id, equal ids in slot order, ids
        // < 0 skipped; an fp32 sum from 0 in that order), into x_s (its rows < kPostRows,
        // read back below by the thread that then overwrites the same element).
        // The order by ranks: thread (t, s) places its slot after the row's valid slots with a
        // smaller id, or the same id in an earlier slot: moe_slot_order's order in one step
        // for every slot (rows * k <= 256), where one thread a row had sorted by insertion
        // (k dependent shared-memory compare-and-shift steps on the launch's path).
        static_assert(kPostRows * kHcMaxSlots <= 256, "a thread a slot");
        __shared__ int slot_id[kPostRows][kHcMaxSlots], slot_order[kPostRows][kHcMaxSlots], slot_count[kPostRows];
        const int tid = int(threadIdx.x), k = src.k;
        const bool slot_thread = tid < rows * k;
        const int slot_row = slot_thread ? tid / k : 0, slot = slot_thread ? tid % k : 0;
        const int32_t id = slot_thread ? src.ids[tid] : -1;
        if (slot_thread) slot_id[slot_row][slot] = id;
        asm volatile("bar.sync 1, 256;" ::: "memory");
        if (slot_thread) {
          int count;
          const int place = moe_slot_place(slot_id[slot_row], k, slot, &count);
          if (id >= 0) slot_order[slot_row][place] = slot;
          if (slot == 0) slot_count[slot_row] = count;
        }
        asm volatile("bar.sync 1, 256;" ::: "memory");
        for (int v = tid; v < rows * (kHcSlice / 8); v += 256) {  // 8 columns of a row a thread
          const int t = v / (kHcSlice / 8), c = (v % (kHcSlice / 8)) * 8;
          float acc[8];
          moe_slot_sum<8>(src.slot_out + int64_t(t) * k * D + d0 + c, D, slot_order[t], slot_count[t], acc);
#pragma unroll
          for (int e = 0; e < 8; ++e) x_s[t][c + e] = acc[e];
        }
        asm volatile("bar.sync 1, 256;" ::: "memory");
      }
      // Row t's post_j and comb[t][.][j] (the same for every element of the row) go
      // through shared memory, not a register set per element: at 16 rows those were
      // 40 of the ~150 registers a thread (and spilled in hc_mix_finish_kernel's 96).
      __shared__ float row_post[kPostRows], row_comb[kPostRows][HC];
      const int tid = int(threadIdx.x);
      float row_value = 0.0f;  // thread tid < rows * (HC + 1): comb (i < HC) or post (i == HC) of row tid / (HC + 1)
      if (tid < rows * (HC + 1)) {
        const int t = tid / (HC + 1), i = tid % (HC + 1);
        row_value = i < HC ? src.comb[t * HC * HC + i * HC + j] : src.post[t * HC + j];
      }
      uint16_t fb[kU], rv[kU][HC];
      float routed[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int idx = tid + 256 * u;
        const int64_t t = idx / kHcSlice, d = d0 + idx % kHcSlice;
        if (t >= rows) continue;
        if (src.f) {
          fb[u] = src.f[t * D + d];
        } else {
          routed[u] = src.slot_out ? x_s[t][idx % kHcSlice] : src.routed[t * D + d];
          fb[u] = src.shared[t * D + d];
        }
#pragma unroll
        for (int i = 0; i < HC; ++i) rv[u][i] = src.R[(t * HC + i) * D + d];
      }
      if (tid < rows * (HC + 1)) {
        const int t = tid / (HC + 1), i = tid % (HC + 1);
        if (i < HC) row_comb[t][i] = row_value;
        else row_post[t] = row_value;
      }
      asm volatile("bar.sync 1, 256;" ::: "memory");
#pragma unroll
      for (int u = 0; u < kXPer; ++u) xv[u] = 0.0f;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int idx = tid + 256 * u;
        const int64_t t = idx / kHcSlice, d = d0 + idx % kHcSlice;
        if (t >= rows) continue;
        if (!src.f) {  // moe_output's f, stored by stream 0's slices
          fb[u] = moe_output_value(routed[u], fb[u]);
          if (j == 0) src.y[t * D + d] = fb[u];
        }
        float cm[HC];
#pragma unroll
        for (int i = 0; i < HC; ++i) cm[i] = row_comb[t][i];
        const uint16_t o = hc_post_value<HC>(row_post[t], fb[u], cm, rv[u]);
        src.Y[(t * HC + j) * D + d] = o;
        xv[u] = bf2f(o);
      }
    } else {
#pragma unroll
      for (int u = 0; u < kXPer; ++u) {
        const int idx = int(threadIdx.x) + 256 * u, r = idx / kHcSlice;
        xv[u] = r0 + r < rows ? bf2f(X[(r0 + r) * n + k0 + idx % kHcSlice]) : 0.0f;
      }
    }
    if constexpr (kFused) {
      asm volatile("cp.async.wait_all;\n" ::: "memory");
    } else {
#pragma unroll
      for (int u = 0; u < kFnPer; ++u) {
        const int idx = int(threadIdx.x) + 256 * u;
        if (idx < mix * kHcSlice) fn_s[idx / kHcSlice][idx % kHcSlice] = fv[u];
      }
    }
#pragma unroll
    for (int u = 0; u < kXPer; ++u) {
      const int idx = int(threadIdx.x) + 256 * u;
      x_s[idx / kHcSlice][idx % kHcSlice] = xv[u];
    }
  }
  asm volatile("bar.sync 1, 256;" ::: "memory");  // (threads 0-255: hc_mix_finish_kernel's warp 8 is elsewhere)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rb = warp * kRows;  // 8 warps x kRows rows = the tile
  // Lanes 0 .. mix-1: mix `lane` of the warp's kRows rows (fn row `lane` against each
  // x row). Lanes mix .. mix+kRows-1: the sum of squares of row rb + (lane - mix), as
  // the same loop with that x row in place of the fn row (acc[lane - mix] is then
  // x . x; the others are discarded). The operand row is picked once, not per row and
  // k: a select per FMA had made the ALU pipe the limit (ncu at batch 256: issue
  // slots 59% busy, ALU the busiest pipe, 29 us a launch). Same FMA order per output
  // as before: k = 0 .. 127, four at a time in x, y, z, w order.
  if (lane >= mix + kRows || r0 + rb >= rows) return;  // (warps past the last row: nothing to write)
  const float* wrow = lane < mix ? &fn_s[lane][0] : &x_s[rb + lane - mix][0];
  float acc[kRows];
  hc_slice_dots<kRows, HcMixTileSmem<kRows>::kPad>(wrow, &x_s[rb], acc);
  float* out = partial + slice * kHcMaxRowsPerLaunch * 32;
  if (lane < mix) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r0 + rb + r < rows) out[(r0 + rb + r) * 32 + lane] = acc[r];
  } else {
    const int r = lane - mix;  // slot `mix` of row rb + r: its sum of squares
    float v = acc[0];
#pragma unroll
    for (int i = 1; i < kRows; ++i) v = r == i ? acc[i] : v;
    if (r0 + rb + r < rows) out[(r0 + rb + r) * 32 + mix] = v;
  }
}

template <int kRows, int kPostHc = 0, int kPostRows = 8>
__global__ void __launch_bounds__(256, kRows == 8 ? 4 : 0)
    hc_mix_partial_kernel(const uint16_t* __restrict__ X, const float* __restrict__ fn, int64_t rows, int64_t n,
                          int mix, float* __restrict__ partial, const HcPostSource src = {}) {
  __shared__ __align__(16) HcMixTileSmem<kRows> sm;
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kHcMixPartial, fn);
  hc_mix_partial_tile<kRows, kPostHc, kPostRows, false>(X, fn, rows, n, mix, partial, src, blockIdx.x,
                                                        int64_t(blockIdx.y) * 8 * kRows, sm, fn);
}

// The same partials with one thread a row (rows >= kHcRowMixMinRows, no hc_post
// source): thread r of CTA (slice, row block) runs every mix of its row and the
// row's sum of squares, each an FMA chain over k = 0 .. 127 in order, as the lanes
// of hc_mix_partial_kernel do (same bits). Why: there a lane is a mix, so each of a
// warp's rows is read by all its lanes and 8 of the 32 lanes compute sums of
// squares they discard; ncu at 256 rows (H200): 17 µs a launch, issue slots 44%
// busy, stalled on shared-memory loads (12 wavefronts a warp for 32 FMAs). Here a
// warp reads its 32 rows once (4 wavefronts a k8 step) and fn's values as
// broadcasts (one wavefront for 4 FMAs of every thread). fn is staged before the
// wait for the predecessor (a weight), the X block by cp.async after it. Step −0.4%
// at 64 rows, −0.3% at 256 (BENCHMARKS.md, twenty-second session).
// kSplit (1, 2 or 4; DSV4_CUDA_HC_ROW_SPLIT, default 2 since the thirty-ninth session): a
// row's mixes are cut into kSplit equal parts, one warp a part, so a CTA's 4 warps hold
// 128 / kSplit rows and a launch kSplit times the warps, each with a chain of kMix /
// kSplit FMAs a k step instead of kMix. Why: at 256 rows the graph trace had a launch
// at 14.4 µs for ~2 µs of bytes and ~3 µs of FMAs at the fp32 rate, with 8 warps an
// SM; at 64 rows 128 CTAs of 2 live warps. Every lane of a warp has the same part, so
// fn's reads stay broadcasts; each output's chain is unchanged, so are the bits. Part 0
// also takes the sum of squares. Measured (H200, graph trace): 14.4 -> 12.2 µs a launch
// at 256 rows, 6.7 -> 5.4 at 64; the step -0.4% / -0.2% at 256 / 64. kSplit = 4 was
// slower (22 µs at 256: each CTA stages all of fn's slice for a quarter of the rows).
constexpr int kHcRowMixThreads = 128;
constexpr int64_t kHcRowMixMinRows = 32;
constexpr int kHcRowMixXStride = 2 * kHcSlice + 16;  // bytes a staged X row: 16-byte reads conflict-free

template <int kMix, int kSplit>
__global__ void __launch_bounds__(kHcRowMixThreads) hc_mix_rows_kernel(const uint16_t* __restrict__ X,
                                                                       const float* __restrict__ fn, int64_t rows,
                                                                       int64_t n, float* __restrict__ partial) {
  static_assert(kMix + 1 <= 32, "a row's mixes and sum of squares fit its 32 partials");
  static_assert((kSplit == 1 || kSplit == 2 || kSplit == 4) && kMix % kSplit == 0, "kSplit: 1, 2 or 4 parts of kMix");
  constexpr int kPart = kMix / kSplit;                       // mixes a thread runs
  constexpr int kBlockRows = kHcRowMixThreads / kSplit;      // rows a CTA covers
  __shared__ __align__(16) float fn_s[kMix * kHcSlice];
  __shared__ __align__(16) uint8_t x_s[kBlockRows * kHcRowMixXStride];  // (fewer rows, more CTAs an SM)
  const int tid = int(threadIdx.x);
  const int64_t k0 = int64_t(blockIdx.x) * kHcSlice, r0 = int64_t(blockIdx.y) * kBlockRows;
  constexpr int kPiecesPerRow = kHcSlice * 4 / 16;  // fn: 16-byte pieces of a row's slice
  for (int i = tid; i < kMix * kPiecesPerRow; i += kHcRowMixThreads) {
    const int j = i / kPiecesPerRow, c = (i % kPiecesPerRow) * 4;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                     uint32_t(__cvta_generic_to_shared(fn_s + j * kHcSlice + c))),
                 "l"(fn + int64_t(j) * n + k0 + c));
  }
  wait_then_release_dependents();
  // X: the block's rows, 16 pieces of 16 bytes each; thread tid copies piece tid % 16
  // of rows tid / 16, tid / 16 + 8, ... (consecutive threads read consecutive bytes).
  constexpr int kXPieces = 2 * kHcSlice / 16;
  const int64_t live_rows = rows - r0 < kBlockRows ? rows - r0 : kBlockRows;
  for (int i = tid; i < live_rows * kXPieces; i += kHcRowMixThreads) {
    const int r = i / kXPieces, c = i % kXPieces;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                     uint32_t(__cvta_generic_to_shared(x_s + r * kHcRowMixXStride + 16 * c))),
                 "l"(X + (r0 + r) * n + k0 + 8 * c));
  }
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();
  // Warp w: part w % kSplit of rows (w / kSplit) * 32 + lane (kSplit = 1: row tid).
  const int part = kSplit == 1 ? 0 : (tid >> 5) % kSplit;
  const int row = kSplit == 1 ? tid : (tid >> 5) / kSplit * 32 + (tid & 31);
  if (row >= live_rows) return;
  const float* fpart = fn_s + part * kPart * kHcSlice;
  float acc[kPart];
#pragma unroll
  for (int j = 0; j < kPart; ++j) acc[j] = 0.0f;
  float ss = 0.0f;
  const uint8_t* xrow = x_s + row * kHcRowMixXStride;
#pragma unroll 2
  for (int k = 0; k < kHcSlice; k += 8) {
    const uint4 v = *reinterpret_cast<const uint4*>(xrow + 2 * k);
    const float x[8] = {bf2f(uint16_t(v.x & 0xffffu)), bf2f(uint16_t(v.x >> 16)), bf2f(uint16_t(v.y & 0xffffu)),
                        bf2f(uint16_t(v.y >> 16)),     bf2f(uint16_t(v.z & 0xffffu)), bf2f(uint16_t(v.z >> 16)),
                        bf2f(uint16_t(v.w & 0xffffu)), bf2f(uint16_t(v.w >> 16))};
#pragma unroll
    for (int j = 0; j < kPart; ++j) {
      const float4 f0 = *reinterpret_cast<const float4*>(fpart + j * kHcSlice + k);
      const float4 f1 = *reinterpret_cast<const float4*>(fpart + j * kHcSlice + k + 4);
      acc[j] = fmaf(f0.x, x[0], acc[j]);
      acc[j] = fmaf(f0.y, x[1], acc[j]);
      acc[j] = fmaf(f0.z, x[2], acc[j]);
      acc[j] = fmaf(f0.w, x[3], acc[j]);
      acc[j] = fmaf(f1.x, x[4], acc[j]);
      acc[j] = fmaf(f1.y, x[5], acc[j]);
      acc[j] = fmaf(f1.z, x[6], acc[j]);
      acc[j] = fmaf(f1.w, x[7], acc[j]);
    }
    if (part == 0) {
#pragma unroll
      for (int e = 0; e < 8; ++e) ss = fmaf(x[e], x[e], ss);
    }
  }
  float* out = partial + (int64_t(blockIdx.x) * kHcMaxRowsPerLaunch + r0 + row) * 32;
  if constexpr (kSplit > 1) out += part * kPart;
  if constexpr (kPart % 4 == 0) {
#pragma unroll
    for (int q = 0; q < kPart / 4; ++q)
      reinterpret_cast<float4*>(out)[q] = make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < kPart; ++j) out[j] = acc[j];
  }
  if (part == 0) out[kMix] = ss;
}

// ref::sinkhorn on a register matrix (HC is a template parameter so the arrays stay in registers).
template <int HC>
__device__ void sinkhorn_ref(float (&c)[HC * HC], int64_t iters, float eps) {
#pragma unroll
  for (int i = 0; i < HC; ++i) {
    float m = c[i * HC];
#pragma unroll
    for (int j = 1; j < HC; ++j) m = fmaxf(m, c[i * HC + j]);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < HC; ++j) {
      c[i * HC + j] = core::exp_f32_via_f64(__fsub_rn(c[i * HC + j], m));
      sum = __fadd_rn(sum, c[i * HC + j]);
    }
#pragma unroll
    for (int j = 0; j < HC; ++j) c[i * HC + j] = __fadd_rn(__fdiv_rn(c[i * HC + j], sum), eps);
  }
  auto normalize_columns = [&] {
#pragma unroll
    for (int j = 0; j < HC; ++j) {
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < HC; ++i) sum = __fadd_rn(sum, c[i * HC + j]);
      const float den = __fadd_rn(sum, eps);
#pragma unroll
      for (int i = 0; i < HC; ++i) c[i * HC + j] = __fdiv_rn(c[i * HC + j], den);
    }
  };
  normalize_columns();
  for (int64_t it = 1; it < iters; ++it) {
#pragma unroll
    for (int i = 0; i < HC; ++i) {
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < HC; ++j) sum = __fadd_rn(sum, c[i * HC + j]);
      const float den = __fadd_rn(sum, eps);
#pragma unroll
      for (int j = 0; j < HC; ++j) c[i * HC + j] = __fdiv_rn(c[i * HC + j], den);
    }
    normalize_columns();
  }
}

// The same Sinkhorn with one lane per element (HC * HC <= 32 lanes of a warp;
// every lane of the warp must call it). Each lane forms its row and column
// sums from shuffles in the reference's order (j = 0.., then i = 0..), so every
// sum, and therefore every element, is bit-identical to sinkhorn_ref; the
// dependent chain per iteration is two divisions instead of 2 * HC * HC.
template <int HC>
__device__ float sinkhorn_warp(float v, int64_t iters, float eps) {
  static_assert(HC * HC <= 32, "one lane per element");
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = int(threadIdx.x & 31);
  const int e = lane < HC * HC ? lane : 0;  // idle lanes shadow element 0
  const int i = e / HC, j = e % HC;
  auto row_sum = [&](float x) {
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < HC; ++k) sum = __fadd_rn(sum, __shfl_sync(kAll, x, i * HC + k));
    return sum;
  };
  auto col_sum = [&](float x) {
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < HC; ++k) sum = __fadd_rn(sum, __shfl_sync(kAll, x, k * HC + j));
    return sum;
  };
  float m = __shfl_sync(kAll, v, i * HC);
#pragma unroll
  for (int k = 1; k < HC; ++k) m = fmaxf(m, __shfl_sync(kAll, v, i * HC + k));
  v = core::exp_f32_via_f64(__fsub_rn(v, m));
  v = __fadd_rn(__fdiv_rn(v, row_sum(v)), eps);
  v = __fdiv_rn(v, __fadd_rn(col_sum(v), eps));
  for (int64_t it = 1; it < iters; ++it) {
    v = __fdiv_rn(v, __fadd_rn(row_sum(v), eps));
    v = __fdiv_rn(v, __fadd_rn(col_sum(v), eps));
  }
  return v;
}

// hc_sinkhorn (HcConfig::sinkhorn_later): comb = Sinkhorn(comb) in place, one warp a row
// running hc_finish_kernel's warp-8 code on the input that kernel left (the same bits).
// A latency chain of ~40 dependent divisions a row (~3.5 µs a launch in the graph trace,
// H200), which the model runs beside the sublayer instead of ahead of it.
constexpr int kSinkhornRowsPerBlock = 4;
template <int HC>
__global__ void __launch_bounds__(32 * kSinkhornRowsPerBlock) hc_sinkhorn_kernel(float* __restrict__ comb,
                                                                                 int64_t rows, int64_t iters,
                                                                                 float eps) {
  wait_then_release_dependents();
  const int64_t t = int64_t(blockIdx.x) * kSinkhornRowsPerBlock + (threadIdx.x >> 5);
  if (t >= rows) return;  // (whole warps: sinkhorn_warp's shuffles take every lane)
  const int lane = int(threadIdx.x & 31);
  float* cm = comb + t * HC * HC;
  const float v = sinkhorn_warp<HC>(cm[lane < HC * HC ? lane : 0], iters, eps);
  if (lane < HC * HC) cm[lane] = v;
}

struct HcFinishArgs {
  const uint16_t* X;      // [rows, HC, D]
  const float* partial;   // [S, kHcMaxRowsPerLaunch, 32]
  const float* base;      // [mix]
  const float* scale;     // [3] (pre) or [1] (head)
  int64_t slices, D;
  float norm_eps, hc_eps;
  int64_t sinkhorn_iters;
  bool sinkhorn;          // false (HcConfig::sinkhorn_later): comb is left as the Sinkhorn's input
  uint16_t* x;            // [rows, D]
  float* post;            // [rows, HC] (pre only)
  float* comb;            // [rows, HC, HC] (pre only)
  // hc_pre_norm: xn = rms_norm(x, norm_w, rms_eps) [rows, D]; null: x only.
  const uint16_t* norm_w;
  float rms_eps;
  uint16_t* xn;
  // hc_pre_norm_linear_pair (VEC = 8, D % 128 == 0): xn quantized for the FP8 linears
  // as it is written, codes [rows, D] and scales [rows, D / 128]; null: not.
  uint8_t* xq = nullptr;
  float* xs = nullptr;
};

// The mix's norm factor of a row from its sums: 1 / sqrt(raw[kMix] / n + norm_eps), n = HC * D.
template <int HC, int kMix>
__device__ __forceinline__ float hc_mix_norm_factor(const HcFinishArgs& a, const float* raw) {
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(raw[kMix], float(HC * a.D)), a.norm_eps)));
}

// pre_i of row t from its sums (the finish's threads i < HC).
template <int HC, int kMix>
__device__ __forceinline__ float hc_pre_value(const HcFinishArgs& a, const float* raw, int i) {
  const float r = hc_mix_norm_factor<HC, kMix>(a, raw);
  return __fadd_rn(core::sigmoid_f32(__fadd_rn(__fmul_rn(__fmul_rn(raw[i], r), a.scale[0]), a.base[i])), a.hc_eps);
}

// post and comb of row t from its sums, by one warp (lane): the Sinkhorn's comb, or its
// input where the Sinkhorn runs later (!a.sinkhorn).
template <int HC>
__device__ __forceinline__ void hc_post_comb_warp(const HcFinishArgs& a, int64_t t, const float* raw, int lane) {
  constexpr int kMix = (2 + HC) * HC;
  const float r = hc_mix_norm_factor<HC, kMix>(a, raw);
  if (lane < HC)
    a.post[t * HC + lane] = __fmul_rn(
        2.0f, core::sigmoid_f32(__fadd_rn(__fmul_rn(__fmul_rn(raw[HC + lane], r), a.scale[1]), a.base[HC + lane])));
  if constexpr (HC * HC <= 32) {
    const int e = lane < HC * HC ? lane : 0;
    const float c = __fadd_rn(__fmul_rn(__fmul_rn(raw[2 * HC + e], r), a.scale[2]), a.base[2 * HC + e]);
    const float v = a.sinkhorn ? sinkhorn_warp<HC>(c, a.sinkhorn_iters, a.hc_eps) : c;  // (uniform branch)
    if (lane < HC * HC) a.comb[t * HC * HC + lane] = v;
  } else if (lane == 0) {
    float c[HC * HC];
#pragma unroll
    for (int i = 0; i < HC * HC; ++i)
      c[i] = __fadd_rn(__fmul_rn(__fmul_rn(raw[2 * HC + i], r), a.scale[2]), a.base[2 * HC + i]);
    if (a.sinkhorn) sinkhorn_ref<HC>(c, a.sinkhorn_iters, a.hc_eps);
#pragma unroll
    for (int i = 0; i < HC * HC; ++i) a.comb[t * HC * HC + i] = c[i];
  }
}

// One CTA per row. kHead: hc_head (pre weights only, no post/comb).
// The row's partials (S x 32 floats, 128 bytes per slice, 64 KB apart) are first
// copied to shared memory by every thread, 16 bytes each, all loads in flight at
// once; the kMix + 1 sums then read them in slice order. (Each summing thread
// loading its own column, 16 loads at a time, took 8 dependent memory round trips:
// ~11 µs a launch at batch 1, ncu at the GPU's own clocks.)
//
// The kernel is a latency chain (one CTA per row; ~10 µs a launch at every batch
// size before, ncu): its memory reads are therefore all issued at entry (the norm
// weights before the dependency wait, the row's X and the partials after it), the
// x pass keeps X and its x in registers for the norm (no reload), and with !kHead a
// ninth warp computes post and the Sinkhorn comb while warps 0-7 form x and xn
// (before, the norm waited for the Sinkhorn at a block barrier). The arithmetic and
// its order are unchanged: x, xn, post and comb keep their bits (the x pass and the
// norm use rms_norm_row's thread partition, c = tid, tid + 256, ..., and block_sum's
// warp order).
constexpr int kHcMaxStagedSlices = 256;  // 32 KB of shared memory; more slices load directly
constexpr int kHcXThreads = 256;         // warps 0-7: x and xn, as rms_norm_row's 256 threads
constexpr int kHcChunksInRegisters = 2;  // x chunks a thread holds: D <= 4096 at VEC = 8 in one pass
constexpr int kHcStageAhead = 4;         // partial pieces a thread loads before X's (128 slices x 8 at 256 threads)

// VEC bf16 values held two to a 32-bit register (BfVec<8> takes eight registers
// once unpacked: hc_finish_kernel's X, weights and x at HC = 4 spilled with it).
template <int VEC>
struct BfRegs {
  uint32_t w[(VEC + 1) / 2];
  __device__ __forceinline__ void load(const uint16_t* p) {
    if constexpr (VEC == 8) {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
    } else if constexpr (VEC == 2) {
      w[0] = *reinterpret_cast<const uint32_t*>(p);
    } else {
#pragma unroll
      for (int i = 0; i < (VEC + 1) / 2; ++i) w[i] = 0;
#pragma unroll
      for (int e = 0; e < VEC; ++e) set(e, p[e]);
    }
  }
  __device__ __forceinline__ void store(uint16_t* p) const {
    if constexpr (VEC == 8) {
      *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    } else if constexpr (VEC == 2) {
      *reinterpret_cast<uint32_t*>(p) = w[0];
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) p[e] = get(e);
    }
  }
  __device__ __forceinline__ uint16_t get(int e) const { return uint16_t((e & 1) ? w[e >> 1] >> 16 : w[e >> 1]); }
  __device__ __forceinline__ void set(int e, uint16_t h) {
    w[e >> 1] = (e & 1) ? (w[e >> 1] & 0xffffu) | (uint32_t(h) << 16) : (w[e >> 1] & 0xffff0000u) | h;
  }
};

// A barrier of warps 0-7 only (named barrier 1), while warp 8 runs the Sinkhorn.
__device__ __forceinline__ void x_warps_barrier() { asm volatile("bar.sync 1, %0;" ::"n"(kHcXThreads) : "memory"); }

// block_sum over warps 0-7 only.
__device__ __forceinline__ float x_warps_sum(float v, float* red /* [8] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  x_warps_barrier();
  float total = 0.0f;
  for (int w = 0; w < kHcXThreads / 32; ++w) total += red[w];
  return total;
}

struct HcFinishSmem {
  float4 staged[kHcMaxStagedSlices * 8];
  float raw[32];
  float pre[4];
  float red[kHcXThreads / 32];
};

// hc_mix_finish_kernel's hand-over: every CTA counts itself into `done` once its slice
// (if any) is stored; the last `finishers` to do so run a finish row each, once `done`
// reaches `arrivals`; the last of them past that wait zeroes the two counters.
// quick (DSV4_CUDA_HC_QUICK_HAND_OVER, default on; the same bits): the last arrival does
// not poll `done` (its own acquiring add read the complete count), and a finisher counts
// itself into `left` after the CTA barrier that follows its wait, a release add whose
// result is read only once the row's partials are staged, so neither round trip lies on
// the row's path; with one finisher there is no `left` count at all. At batch 1 the one
// finisher is the last arrival, and its path had lost two dependent L2 round trips (the
// poll, then the add on `left`) before the partials' loads could go out. Measured -0.9% a
// step at batch 1 (bench-1g, H200, 3 rounds apart; 16-256 rows, which take the two
// launches, within 0.3%; fifty-eighth session).
struct HcHandOver {
  int* sync = nullptr;  // [done, left]; null: hc_finish_kernel (no hand-over)
  int arrivals = 0;     // the grid's CTAs
  int finishers = 0;    // rows x parts
  int parts = 1;        // finishers a row (hc_row_finishers): each forms the row's whole x, stores its part
  bool x_from_mix = false;  // the mix forms X (an hc_post source): read it after the hand-over
  bool quick = true;
};

// Row t of hc_finish by this CTA's threads (kHcXThreads, + the Sinkhorn warp where !kHead).
// arrived_last: this CTA's count completed `done` (hc_mix_finish_kernel).
// part (of hand.parts): which 128-value blocks of x, xn and the codes this CTA stores. Every
// part forms the whole x, since the norm's sum needs all of it: the same sums in the same
// order as one finisher, so the same bits; what the parts divide is the norm's pass and the
// stores. Only part 0's Sinkhorn warp writes post and comb.
template <int HC, bool kHead, int VEC>
__device__ __forceinline__ void hc_finish_row(const HcFinishArgs& a, int64_t t, HcFinishSmem& sm,
                                              const HcHandOver& hand, bool arrived_last = false, int part = 0) {
  constexpr int kMix = kHead ? HC : (2 + HC) * HC;
  constexpr int kRegs = kHcChunksInRegisters;
  static_assert(kMix < 32 && HC <= 4, "the sums of one slice fit its 32 partials");
  float* const raw = sm.raw;
  float* const pre = sm.pre;
  float* const red = sm.red;
  float4* const staged = sm.staged;
  const int tid = int(threadIdx.x);
  const bool x_thread = tid < kHcXThreads;
  const bool fused = hand.sync != nullptr;
  // (the probe's marks 3-6 and 8-10 of either kernel: handed_over, staged, sums, x_done, norm_sum,
  // norm_factor, xn_done)
  const CtaProbeSite probe_site = fused ? CtaProbeSite::kHcMixFinish : CtaProbeSite::kHcFinishRow;
  const int64_t n = HC * a.D;
  const int chunks = int(a.D / VEC);
  const bool norm = a.xn != nullptr;
  // Chunk k of this thread in a pass starting at chunk `base`: base + tid + 256 k.
  auto chunk = [&](int base, int k) { return base + tid + kHcXThreads * k; };
  // Whether this part stores chunk c: parts take whole runs of 16 chunks (a half warp's, one
  // 128-value block at VEC = 8), so a block's codes and scale come from one CTA.
  const int parts = hand.parts, runs = (chunks + 15) / 16;
  auto owned = [&](int c) { return parts == 1 || (c / 16) * parts / runs == part; };
  BfRegs<VEC> wv[kRegs];  // the first pass's norm weights (weights: no kernel writes them)
  if (norm && x_thread) {
#pragma unroll
    for (int k = 0; k < kRegs; ++k)
      if (chunk(0, k) < chunks) wv[k].load(a.norm_w + int64_t(chunk(0, k)) * VEC);
  }
  if (fused) {
    wait_for_predecessor();  // (passed in the slice; the dependents launch once every slice is done, below)
  } else {
    wait_then_release_dependents();
    DSV4_CTA_PROBE(probe_site, 3, a.base);  // handed_over (the mix launch has ended)
  }
  BfRegs<VEC> xs[kRegs][HC];  // the first pass's X
  auto load_x = [&](int base) {
#pragma unroll
    for (int k = 0; k < kRegs; ++k)
      if (chunk(base, k) < chunks) {
#pragma unroll
        for (int i = 0; i < HC; ++i) xs[k][i].load(a.X + (t * HC + i) * a.D + int64_t(chunk(base, k)) * VEC);
      }
  };
  // X formed just before (by the mix launch, or by this launch's slices where x_from_mix) is
  // loaded after the partials' loads have gone out (below): the sums need the partials
  // first, X only once `pre` is known. X already in memory at the launch is loaded here.
  const bool x_late = !fused || hand.x_from_mix;
  if (x_thread && !x_late) load_x(0);
  int left = -1;  // quick: thread 0's count into `left` (its old value), read after the staging
  if (fused) {
    // The CTAs not yet counted wait on nothing (their predecessor aside) and need one SM
    // slot among those this CTA and the other finishers leave, so `done` comes. A bug
    // that breaks that fails the launch (~9 s, an illegal-instruction error) instead of
    // hanging the process.
    if (tid == 0) {
      if (!(hand.quick && arrived_last)) {
        unsigned polls = 0;
        while (ld_acquire_gpu(hand.sync) < hand.arrivals) {
          __nanosleep(32);
          if (++polls == (1u << 28)) __trap();
        }
      }
      if (!hand.quick && atom_add_acq_rel_gpu(hand.sync + 1, 1) == hand.finishers - 1) {  // the last one past the wait
        hand.sync[0] = 0;
        hand.sync[1] = 0;
      }
      allow_dependents_to_launch();  // (once a CTA: the first thread's counts)
    }
    __syncthreads();  // (thread 0's acquire, then this barrier: the slices' partials and X visible to all)
    DSV4_CTA_PROBE(probe_site, 3, a.base);  // handed_over
    // (after the barrier: this CTA's wait is over, whichever thread ran it)
    if (hand.quick && tid == 0 && hand.finishers > 1) left = atom_add_release_gpu(hand.sync + 1, 1);
  }
  const int slices = int(a.slices);
  const bool stage = slices <= kHcMaxStagedSlices;
  // Piece i (16 bytes) of the row's partials: slice i / 8, floats 4 (i % 8) ..
  auto partial_piece = [&](int i) {
    return reinterpret_cast<const float4*>(a.partial + (int64_t(i / 8) * kHcMaxRowsPerLaunch + t) * 32)[i % 8];
  };
  if (stage) {
    // The first kHcStageAhead pieces a thread (every piece at 128 slices) into registers,
    // then X's loads, then the stores into shared memory: the partials' 16 KB ahead of X's
    // 32 KB (HC = 4, D = 4096) in the SM's queue to the L2. The CTA probe put the staging at
    // ~2 µs of the batch-1 finisher's chain with X issued first, ~1.0 µs since; the step -0.2 to
    // -0.8% at 1-64 rows (bench-1g, H200, sixty-first session).
    const int pieces = slices * 8;
    float4 ahead[kHcStageAhead];
#pragma unroll
    for (int u = 0; u < kHcStageAhead; ++u) {
      const int i = tid + u * int(blockDim.x);
      if (i < pieces) ahead[u] = partial_piece(i);
    }
    if (x_thread && x_late) load_x(0);
#pragma unroll
    for (int u = 0; u < kHcStageAhead; ++u) {
      const int i = tid + u * int(blockDim.x);
      if (i < pieces) staged[i] = ahead[u];
    }
    for (int i = tid + kHcStageAhead * int(blockDim.x); i < pieces; i += int(blockDim.x)) staged[i] = partial_piece(i);
    __syncthreads();
    DSV4_CTA_PROBE(probe_site, 4, a.base);  // staged
  } else if (x_thread && x_late) {
    load_x(0);
  }
  if (fused && hand.quick && tid == 0 && (hand.finishers == 1 || left == hand.finishers - 1)) {
    // Every finisher is past its wait (one finisher: this one), so no poll reads `done` again
    // in this launch; the next launch on the counters reads them after its own wait.
    if (hand.finishers > 1) fence_acq_rel_gpu();
    hand.sync[0] = 0;
    hand.sync[1] = 0;
  }
  if (tid <= kMix) {
    float s = 0.0f;  // in slice order
    if (stage) {
      const float* st = reinterpret_cast<const float*>(staged);
      // 16 slices' loads in flight ahead of their adds (the adds stay in slice order).
#pragma unroll 16
      for (int sl = 0; sl < slices; ++sl) s = __fadd_rn(s, st[sl * 32 + tid]);
    } else {
#pragma unroll 16
      for (int sl = 0; sl < slices; ++sl)
        s = __fadd_rn(s, a.partial[(int64_t(sl) * kHcMaxRowsPerLaunch + t) * 32 + tid]);
    }
    raw[tid] = s;
  }
  __syncthreads();
  DSV4_CTA_PROBE(probe_site, 5, a.base);  // sums
  // The mix's norm factor, formed by each thread that needs it (the same bits).
  if (!x_thread) {  // warp 8 (!kHead only): post and the Sinkhorn comb, from here on alone
    if constexpr (!kHead)
      if (part == 0) hc_post_comb_warp<HC>(a, t, raw, tid - kHcXThreads);
    return;
  }
  if (tid < HC) pre[tid] = hc_pre_value<HC, kMix>(a, raw, tid);
  x_warps_barrier();
  // Warps 0-7: x = sum_i pre_i X_i (bf16), and for the norm the sum of squares of x
  // in rms_norm_row's order (this thread's chunks ascending, their values in order).
  float p[HC];
#pragma unroll
  for (int i = 0; i < HC; ++i) p[i] = pre[i];
  constexpr int kPass = kHcXThreads * kRegs;
  BfRegs<VEC> xo[kRegs] = {};  // the last pass's x
  float ss = 0.0f;
  for (int base = 0; base < chunks; base += kPass) {
    if (base > 0) load_x(base);
#pragma unroll
    for (int k = 0; k < kRegs; ++k) {
      const int c = chunk(base, k);
      if (c >= chunks) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < HC; ++i) s = __fadd_rn(s, __fmul_rn(p[i], bf2f(xs[k][i].get(e))));
        xo[k].set(e, f2bf(s));
        const float xv = bf2f(xo[k].get(e));
        ss = fmaf(xv, xv, ss);
      }
      if (owned(c)) xo[k].store(a.x + t * a.D + int64_t(c) * VEC);
    }
  }
  DSV4_CTA_PROBE(probe_site, 6, a.base);  // x_done
  if (!norm) return;
  // hc_pre_norm: xn = rms_norm(x), rms_norm_row's arithmetic.
  const float total = x_warps_sum(ss, red);
  DSV4_CTA_PROBE(probe_site, 8, a.base);  // norm_sum (every warp's x done)
  const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(total, float(a.D)), a.rms_eps)));
  DSV4_CTA_PROBE(probe_site, 9, a.base);  // norm_factor
  const int last = (chunks - 1) / kPass * kPass;  // the pass whose x is in xo
  const bool quant = VEC == 8 && a.xq != nullptr;
  for (int base = 0; base < chunks; base += kPass) {
#pragma unroll
    for (int k = 0; k < kRegs; ++k) {
      const int c = chunk(base, k);
      const bool live = c < chunks && owned(c);  // one value for each half warp when quant (D % 128 == 0)
      if (!live && !quant) continue;
      BfRegs<VEC> o{};
      if (live) {
        // Earlier passes (D > 4096 at VEC = 8, or VEC < 8): this thread's own x, reloaded.
        BfRegs<VEC> v = xo[k], w = wv[k];
        if (base != last) v.load(a.x + t * a.D + int64_t(c) * VEC);
        if (base != 0) w.load(a.norm_w + int64_t(c) * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) o.set(e, f2bf(__fmul_rn(bf2f(w.get(e)), __fmul_rn(bf2f(v.get(e)), r))));
        o.store(a.xn + t * a.D + int64_t(c) * VEC);
      }
      if constexpr (VEC == 8) {
        if (quant) {  // all lanes of the warp (quant_chunk8's shuffles)
          float f[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) f[e] = bf2f(o.get(e));
          quant_chunk8(f, live, c, a.xq + t * a.D, a.xs + t * (a.D / 128));
        }
      }
    }
  }
  DSV4_CTA_PROBE(probe_site, 10, a.base);  // xn_done (this thread's xn and codes stored)
}

template <int HC, bool kHead, int VEC>
__global__ void __launch_bounds__(kHcXThreads + 32, 2) hc_finish_kernel(HcFinishArgs a) {
  __shared__ HcFinishSmem sm;
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kHcFinishRow, a.base);
  hc_finish_row<HC, kHead, VEC>(a, blockIdx.x, sm, HcHandOver{});
}

// hc_mix_partial_kernel's tiles and hc_finish_kernel's rows in one launch, up to
// kHcPostMaxRows rows (one row tile): max(slices, rows x parts) CTAs; CTA b < slices runs
// the mix of slice b, then every CTA counts itself done (an acquire-release add that also
// gives its order of arrival), and the last `rows x parts` to arrive run a part of a finish
// row each (hc_finish_row), once the count is complete. The same tile and row code as the
// two launches: the same bits. Why: at 1-16 rows the pair is a latency chain, and the
// boundary between the launches (the mix grid's end, then the finish grid's wait) is one
// of its links, twice a layer; here the first finishers have their norm weights (and X,
// without an hc_post source) loaded when the last slice ends. No CTA waits before it is
// counted, so the count completes whatever order CTAs start in and however few fit at once
// (more than the finishers, which hold their SMs while they poll), and the counters are
// used only after the wait for the predecessor, whose launch on them has ended. Why the
// last arrivals and not CTAs of their own (the first form: slices + rows CTAs by ticket,
// two an SM): at 96 registers, two CTAs of 288 threads an SM, the 16-row tile took ~4 µs
// longer than alone at 122; here one CTA an SM, as many registers as the tile takes.
struct HcFusedArgs {
  const uint16_t* X;
  const float* fn;
  int64_t rows, n;
  int mix;
  float* partial;
  HcPostSource src;
  HcFinishArgs fin;
  HcHandOver hand;
  int slices;
};

template <int HC, bool kHead, int kPostHc, int kPostRows>
__global__ void __launch_bounds__(kHcXThreads + 32, 1) hc_mix_finish_kernel(const __grid_constant__ HcFusedArgs f) {
  __shared__ __align__(16) union {
    HcMixTileSmem<4> mix;
    HcFinishSmem fin;
  } sm;
  __shared__ int s_arrival;
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kHcMixFinish, f.fin.base);
  if (int(blockIdx.x) < f.slices) {
    if (threadIdx.x < kHcXThreads)  // (the finishers' Sinkhorn warp is idle here)
      hc_mix_partial_tile<4, kPostHc, kPostRows, true>(f.X, f.fn, f.rows, f.n, f.mix, f.partial, f.src, blockIdx.x, 0,
                                                       sm.mix, f.fin.base);
  } else {
    wait_for_predecessor();  // (before the count: the previous launch on the counters has ended)
  }
  __syncthreads();  // every partial (and Y) store of the CTA issued, its shared memory free again
  DSV4_CTA_PROBE(CtaProbeSite::kHcMixFinish, 1, f.fin.base);  // slice_done
  // The release half publishes them (cumulative through the barrier above).
  if (threadIdx.x == 0) s_arrival = atom_add_acq_rel_gpu(f.hand.sync, 1);
  __syncthreads();
  DSV4_CTA_PROBE(CtaProbeSite::kHcMixFinish, 2, f.fin.base);  // counted
  const int finisher = s_arrival - (f.hand.arrivals - f.hand.finishers);
  if (finisher < 0) return;
  hc_finish_row<HC, kHead, 8>(f.fin, finisher / f.hand.parts, sm.fin, f.hand, s_arrival == f.hand.arrivals - 1,
                              finisher % f.hand.parts);
}

// ---- the mix and finish in one cluster (1-2 rows) -------------------------------
// hc_mix_finish_kernel's work by one cluster of kHcClusterCtas CTAs, no global hand-over.
// Why: at one row that launch is a chain of dependent global round trips: the slices'
// partial stores and their counted arrival, then the finisher's staging of 128 slices'
// partials and its loads of X, which the slices had just formed (the CTA probe, H200:
// ~5-7 µs of a 10-15 µs launch after the hand-over, twice a layer). Here CTA r holds the
// 128-wide column groups r and r + 16 of every stream (HC x D / 2048 slices: 8 at HC = 4,
// D = 4096), so it has all HC streams of the 256 columns it finishes: it forms or loads X
// there into shared memory once, runs its slices' mixes, and pushes the partials into
// every CTA's shared memory; after a cluster barrier each CTA adds all partials in slice
// order itself (the same sums as the finisher's), and finishes its columns from the X it
// holds. The norm's sum of squares crosses CTAs the same way (a second barrier).
// The bits are hc_finish_row's: CTA r's warp t runs row t's x and norm code of the lanes of
// hc_finish_row's warp r / 2 whose chunks (tid, tid + 256) lie in its groups (half r % 2
// of them), the other half idle but in the shuffles; each CTA then runs x_warps_sum's
// shuffle tree and warp order on all 256 lanes' sums (every CTA the same total).
// Cost: fn, a weight, is spread over 16 CTAs (96 KB of shared memory each), not 128.
// Measured (H100, bench-1g, 3 rounds apart; docs/design/cuda-attention.md, "The mix and finish
// by one cluster"): +0.5% a step at one row with fn by cp.async, +3.3% by bulk copies from
// warp 0, +2.8% from the last warp; the fn bytes into 16 SMs held the path either way
// (the probe: the Y formation's loads ended ~6 µs after the wait behind them, ~2 µs in the
// fused launch). Off by default (DSV4_CUDA_HC_CLUSTER_ROWS), kept with its tests for A/Bs.
constexpr int kHcClusterCtas = 16;
constexpr int kHcClusterGroups = 2;  // 128-wide column groups of a stream a CTA holds, at most (D <= 4096)

template <int HC, bool kHead, int kRows>
struct HcClusterSmem {
  static constexpr int kMix = kHead ? HC : (2 + HC) * HC;
  static constexpr int kSlices = HC * kHcClusterGroups;            // this CTA's slices, at most
  static constexpr int kAllSlices = kHcClusterCtas * kSlices;      // the launch's, at most (128 at HC = 4)
  static constexpr int kPad = kHcSlice + 4;                        // as HcMixTileSmem: conflict-free float4 rows
  float fn_s[kSlices][kMix][kPad];
  float x_s[kSlices][kRows][kPad];                                 // this CTA's columns of X (or Y), as floats
  float part[kAllSlices][kRows][kMix + 1];                         // every slice's partials, pushed by its CTA
  float ss[kRows][kHcXThreads];                                    // hc_finish_row's lanes' sums of squares, pushed
  float raw[kRows][32];
  float pre[kRows][HC];
  float red[kRows][kHcXThreads / 32];
  float post_s[kRows][HC], comb_s[kRows][HC * HC];                 // the hc_post source's (kPostHc)
  int32_t slot_id[kRows][kHcMaxSlots];
  int slot_order[kRows][kHcMaxSlots], slot_count[kRows];
  uint64_t fn_landed;  // the mbarrier fn's bulk copies complete
};

template <int HC, bool kHead, int kPostHc, int kRows>
__global__ void __launch_bounds__(kHcXThreads + 32, 1)
    hc_mix_finish_cluster_kernel(const __grid_constant__ HcFusedArgs f) {
  using S = HcClusterSmem<HC, kHead, kRows>;
  constexpr int kMix = S::kMix;
  static_assert(kMix + kRows <= 32 && HC <= 4, "a lane a mix, then one a row's sum of squares");
  extern __shared__ __align__(16) uint8_t hc_cluster_raw[];
  S& sm = *reinterpret_cast<S*>(hc_cluster_raw);
  const HcFinishArgs& a = f.fin;
  DSV4_CTA_PROBE_SCOPE(CtaProbeSite::kHcCluster, a.base);
  const int tid = int(threadIdx.x), nthreads = int(blockDim.x);
  const int rank = int(cluster_cta_rank());
  const int64_t D = a.D, n = f.n;
  const int groups = int(D / kHcSlice);        // a stream's 128-wide groups (32 at D = 4096)
  const int G = groups / kHcClusterCtas;       // this CTA's: rank, rank + 16 (the host checks 1 or 2)
  const int my_slices = HC * G;
  const int rows = int(f.rows);
  const int lane = tid & 31;
  // Local slice ls: stream ls / G, group rank + 16 (ls % G); its global slice index.
  auto slice_of = [&](int ls) { return (ls / G) * groups + rank + kHcClusterCtas * (ls % G); };
  cluster_arrive_relaxed();  // (waited for before the first push: every CTA of the cluster has started)
  // fn (a weight) before the dependency wait, straight into shared memory by the TMA: a
  // bulk copy a slice's fn row (512 bytes), counted on one mbarrier and issued by the last
  // warp, which has nothing else to do until the mixes (at 1-2 rows). Why: by 16-byte
  // cp.async from every thread the 96 KB held each thread's path to the dependency wait
  // ~2 µs, and issued by warp 0 (which forms Y) ~5 µs (the CTA probe at one row, H100).
  const uint32_t fn_bar = shared_address(&sm.fn_landed);
  if (tid >> 5 == nthreads / 32 - 1) {
    if (lane == 0) {
      mbar_init(fn_bar, 1);
      mbar_init_fence();
      mbar_expect_tx(fn_bar, uint32_t(my_slices * kMix * kHcSlice * 4));
    }
    __syncwarp();
    for (int i = lane; i < my_slices * kMix; i += 32) {
      const int ls = i / kMix, m = i % kMix;
      tma_bulk_load(shared_address(&sm.fn_s[ls][m][0]), f.fn + int64_t(m) * n + int64_t(slice_of(ls)) * kHcSlice,
                    uint32_t(kHcSlice * 4), fn_bar);
    }
  }
  // The finish's lanes: lane l of warp t (row t) stands for hc_finish_row's thread 32 (rank / 2)
  // + l, whose chunks tid_o + 256 k lie in this CTA's groups where l / 16 == rank % 2.
  const int tid_o = 32 * (rank / 2) + lane;
  const int row_of_warp = tid >> 5;  // (the finish's warps: row_of_warp < rows)
  const bool fin_lane = lane / 16 == rank % 2;
  const int chunks = int(D / 8);
  const bool norm = a.xn != nullptr;
  BfRegs<8> wv[kHcChunksInRegisters];
  if (norm && fin_lane && row_of_warp < rows) {
#pragma unroll
    for (int k = 0; k < kHcChunksInRegisters; ++k)
      if (tid_o + kHcXThreads * k < chunks) wv[k].load(a.norm_w + int64_t(tid_o + kHcXThreads * k) * 8);
  }
  wait_for_predecessor();
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 1, a.base);  // waited
  // This CTA's columns of X into x_s: loaded, or formed from the hc_post source (stored as Y).
  if constexpr (kPostHc == 0) {
    const int pieces = rows * my_slices * (kHcSlice / 8);
    for (int i = tid; i < pieces; i += nthreads) {
      const int t = i / (my_slices * (kHcSlice / 8)), ls = (i / (kHcSlice / 8)) % my_slices,
                c = (i % (kHcSlice / 8)) * 8;
      const uint4 v = *reinterpret_cast<const uint4*>(f.X + t * n + int64_t(slice_of(ls)) * kHcSlice + c);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        sm.x_s[ls][t][c + 2 * e] = bf2f(uint16_t(w[e] & 0xffffu));
        sm.x_s[ls][t][c + 2 * e + 1] = bf2f(uint16_t(w[e] >> 16));
      }
    }
  } else {
    // Y[t, j, d] = bf16(post_j f + sum_i comb[i][j] R_i) (hc_post_value), f the sublayer's
    // output or bf16(routed + shared) (stored to y once: this CTA owns column d); routed read
    // or summed from the MoE slots in moe_slot_order's order (by ranks, as the mix tile).
    const HcPostSource& src = f.src;
    if (tid < rows * (HC + HC * HC)) {
      const int t = tid / (HC + HC * HC), i = tid % (HC + HC * HC);
      if (i < HC) sm.post_s[t][i] = src.post[t * HC + i];
      else sm.comb_s[t][i - HC] = src.comb[t * HC * HC + i - HC];
    }
    if (src.slot_out) {
      const int k = src.k;
      const bool slot_thread = tid < rows * k;
      const int slot_row = slot_thread ? tid / k : 0, slot = slot_thread ? tid % k : 0;
      const int32_t id = slot_thread ? src.ids[tid] : -1;
      if (slot_thread) sm.slot_id[slot_row][slot] = id;
      __syncthreads();
      if (slot_thread) {
        int count;
        const int place = moe_slot_place(sm.slot_id[slot_row], k, slot, &count);
        if (id >= 0) sm.slot_order[slot_row][place] = slot;
        if (slot == 0) sm.slot_count[slot_row] = count;
      }
    }
    __syncthreads();
    // Thread v: row t, group gi, 8 columns from c8, every stream.
    const int per_row = G * (kHcSlice / 8);
    if (tid < rows * per_row) {
      const int t = tid / per_row, q = tid % per_row, gi = q / (kHcSlice / 8), c8 = (q % (kHcSlice / 8)) * 8;
      const int64_t d = int64_t(rank + kHcClusterCtas * gi) * kHcSlice + c8;
      uint16_t fb[8];
      BfRegs<8> rv[HC];
#pragma unroll
      for (int i = 0; i < HC; ++i) rv[i].load(src.R + (int64_t(t) * HC + i) * D + d);
      if (src.f) {
        BfRegs<8> fr;
        fr.load(src.f + t * D + d);
#pragma unroll
        for (int e = 0; e < 8; ++e) fb[e] = fr.get(e);
      } else {
        float routed[8];
        if (src.slot_out) {
          moe_slot_sum<8>(src.slot_out + int64_t(t) * src.k * D + d, D, sm.slot_order[t], sm.slot_count[t], routed);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) routed[e] = src.routed[t * D + d + e];
        }
        BfRegs<8> sh, yo;
        sh.load(src.shared + t * D + d);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          fb[e] = moe_output_value(routed[e], sh.get(e));
          yo.set(e, fb[e]);
        }
        yo.store(src.y + t * D + d);
      }
#pragma unroll
      for (int j = 0; j < HC; ++j) {
        float cm[HC];
#pragma unroll
        for (int i = 0; i < HC; ++i) cm[i] = sm.comb_s[t][i * HC + j];
        const float pj = sm.post_s[t][j];
        BfRegs<8> o;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          uint16_t r[HC];
#pragma unroll
          for (int i = 0; i < HC; ++i) r[i] = rv[i].get(e);
          const uint16_t v = hc_post_value<HC>(pj, fb[e], cm, r);
          o.set(e, v);
          sm.x_s[j * G + gi][t][c8 + e] = bf2f(v);
        }
        o.store(src.Y + (int64_t(t) * HC + j) * D + d);
      }
    }
  }
  __syncthreads();
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 2, a.base);  // x_formed
  mbar_wait(fn_bar, 0);
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 3, a.base);  // fn_landed
  cluster_wait_acquire();  // (the arrival at the start: every CTA runs, its shared memory can be written)
  // The slices' mixes (hc_mix_partial_tile's lanes and FMA order), pushed into every CTA's
  // part[]: warp w runs local slices w, w + 8, ..; lane m < kMix mix m of each row, lane
  // kMix + t row t's sum of squares.
  if (tid < kHcXThreads && lane < kMix + rows) {
    for (int ls = tid >> 5; ls < my_slices; ls += kHcXThreads / 32) {
      const float* wrow = lane < kMix ? &sm.fn_s[ls][lane][0] : &sm.x_s[ls][lane - kMix][0];
      float acc[kRows];
      hc_slice_dots<kRows, S::kPad>(wrow, &sm.x_s[ls][0], acc);
      const int s = slice_of(ls);
#pragma unroll
      for (int t = 0; t < kRows; ++t) {
        if (t >= rows || (lane >= kMix && lane - kMix != t)) continue;  // (a sum-of-squares lane: its own row)
        const uint32_t at = shared_address(&sm.part[s][t][lane < kMix ? lane : kMix]);
#pragma unroll 4
        for (int q = 0; q < kHcClusterCtas; ++q) st_cluster_f32(cluster_map(at, uint32_t(q)), acc[t]);
      }
    }
  }
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 4, a.base);  // pushed (warp 0's slice)
  cluster_sync_all();  // every slice's partials in every CTA
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 5, a.base);  // partials_in
  if (tid == 0) allow_dependents_to_launch();
  // The sums in slice order (hc_finish_row's), by every CTA.
  const int slices = int(f.slices);
  if (tid <= kMix) {
    for (int t = 0; t < rows; ++t) {
      float s = 0.0f;
#pragma unroll 16
      for (int sl = 0; sl < slices; ++sl) s = __fadd_rn(s, sm.part[sl][t][tid]);
      sm.raw[t][tid] = s;
    }
  }
  __syncthreads();
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 6, a.base);  // sums
  if (tid >= kHcXThreads) {  // warp 8 (!kHead) of CTA 0: post and comb
    if constexpr (!kHead) {
      if (rank == 0)
        for (int t = 0; t < rows; ++t) hc_post_comb_warp<HC>(a, t, sm.raw[t], tid - kHcXThreads);
    }
  } else {
    if (tid < rows * HC) sm.pre[tid / HC][tid % HC] = hc_pre_value<HC, kMix>(a, sm.raw[tid / HC], tid % HC);
    x_warps_barrier();
  }
  // Warp t (row t): x = sum_i pre_i X_i of the finish's chunks, and the norm's sum of squares
  // (the lane's chunks ascending, their values in order), as hc_finish_row's thread tid_o.
  BfRegs<8> xo[kHcChunksInRegisters] = {};
  if (row_of_warp < rows) {
    {
      const int t = row_of_warp;
      float p[HC];
#pragma unroll
      for (int i = 0; i < HC; ++i) p[i] = sm.pre[t][i];
      float ss = 0.0f;
#pragma unroll
      for (int k = 0; k < kHcChunksInRegisters; ++k) {
        const int c = tid_o + kHcXThreads * k;
        if (!fin_lane || c >= chunks) continue;
        const int off = (c % (kHcSlice / 8)) * 8;  // (group rank + 16 k: local slice i * G + k)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          float s = 0.0f;
#pragma unroll
          for (int i = 0; i < HC; ++i) s = __fadd_rn(s, __fmul_rn(p[i], sm.x_s[i * G + k][t][off + e]));
          xo[k].set(e, f2bf(s));
          const float xv = bf2f(xo[k].get(e));
          ss = fmaf(xv, xv, ss);
        }
        xo[k].store(a.x + int64_t(t) * D + int64_t(c) * 8);
      }
      if (norm && fin_lane) {
        const uint32_t at = shared_address(&sm.ss[t][tid_o]);
#pragma unroll 4
        for (int q = 0; q < kHcClusterCtas; ++q) st_cluster_f32(cluster_map(at, uint32_t(q)), ss);
      }
    }
  }
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 7, a.base);  // x_done
  if (!norm) return;  // (the same for every CTA: no shared memory of another CTA is touched after this)
  cluster_sync_all();  // every lane's sum of squares in every CTA
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 8, a.base);  // ss_in
  if (tid >= kHcXThreads) return;
  // x_warps_sum over hc_finish_row's 256 lanes: warp w its warp's shuffle tree, then the warps in order.
  for (int t = 0; t < rows; ++t) {
    float v = sm.ss[t][tid];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) sm.red[t][tid >> 5] = v;
  }
  x_warps_barrier();
  if (row_of_warp >= rows) return;
  const bool quant = a.xq != nullptr;
  {
    const int t = row_of_warp;
    float total = 0.0f;
    for (int w = 0; w < kHcXThreads / 32; ++w) total += sm.red[t][w];
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(total, float(D)), a.rms_eps)));
#pragma unroll
    for (int k = 0; k < kHcChunksInRegisters; ++k) {
      const int c = tid_o + kHcXThreads * k;
      const bool live = fin_lane && c < chunks;
      if (!live && !quant) continue;
      BfRegs<8> o{};
      if (live) {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          o.set(e, f2bf(__fmul_rn(bf2f(wv[k].get(e)), __fmul_rn(bf2f(xo[k].get(e)), r))));
        o.store(a.xn + int64_t(t) * D + int64_t(c) * 8);
      }
      if (quant) {  // (all lanes of the warp: quant_chunk8's shuffles stay in a half warp)
        float fq[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) fq[e] = bf2f(o.get(e));
        quant_chunk8(fq, live, c, a.xq + int64_t(t) * D, a.xs + int64_t(t) * (D / 128));
      }
    }
  }
  DSV4_CTA_PROBE(CtaProbeSite::kHcCluster, 9, a.base);  // xn_done
}

// ---- hc_post -------------------------------------------------------------------
// Y[t, j] = bf16(post_j f + sum_i comb[i][j] R_i): one thread per 8 values of a row
// across all HC streams. Roofline: (1 + 2 HC) * D * 2 bytes per row (~150 KB at
// D = 4096, HC = 4): bandwidth-bound, 16-byte accesses.
// kFromMoe (moe_output_hc_post): f is formed here as moe_output does, f = bf16(routed
// + shared), and also stored to y, one launch instead of two on the layer's critical
// path; the same bits.
struct MoeOutputArgs {
  const float* routed = nullptr;    // [T, D]
  const uint16_t* shared = nullptr;  // [T, D]
  uint16_t* y = nullptr;             // [T, D]
};

// Y[t, j, d .. d + VEC) of every stream j from f's and R's values there (hc_post_value).
template <int HC, int VEC>
__device__ __forceinline__ void hc_post_store(const BfVec<VEC>& fv, const BfVec<VEC> (&rv)[HC],
                                              const float* __restrict__ post, const float* __restrict__ comb,
                                              int64_t t, int64_t d, int64_t D, uint16_t* __restrict__ Y) {
  const float* cm = comb + t * HC * HC;
#pragma unroll
  for (int j = 0; j < HC; ++j) {
    const float pj = post[t * HC + j];
    float c[HC];
#pragma unroll
    for (int i = 0; i < HC; ++i) c[i] = cm[i * HC + j];
    BfVec<VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      uint16_t r[HC];
#pragma unroll
      for (int i = 0; i < HC; ++i) r[i] = rv[i].v[k];
      o.v[k] = hc_post_value<HC>(pj, fv.v[k], c, r);
    }
    store_bf<VEC>(Y + (t * HC + j) * D + d, o);
  }
}

template <int HC, int VEC, bool kFromMoe = false>
__global__ void hc_post_kernel(const uint16_t* __restrict__ f, const uint16_t* __restrict__ R,
                               const float* __restrict__ post, const float* __restrict__ comb, int64_t T, int64_t D,
                               uint16_t* __restrict__ Y, const MoeOutputArgs moe = {}) {
  wait_then_release_dependents();
  const int64_t chunks = T * (D / VEC);
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = c / (D / VEC), d = (c % (D / VEC)) * VEC;
    BfVec<VEC> fv;
    if constexpr (kFromMoe) {
      const BfVec<VEC> sv = load_bf<VEC>(moe.shared + t * D + d);
#pragma unroll
      for (int k = 0; k < VEC; ++k) fv.v[k] = moe_output_value(moe.routed[t * D + d + k], sv.v[k]);
      store_bf<VEC>(moe.y + t * D + d, fv);
    } else {
      fv = load_bf<VEC>(f + t * D + d);
    }
    BfVec<VEC> rv[HC];
#pragma unroll
    for (int i = 0; i < HC; ++i) rv[i] = load_bf<VEC>(R + (t * HC + i) * D + d);
    hc_post_store<HC, VEC>(fv, rv, post, comb, t, d, D, Y);
  }
}

// hc_post from the MoE slots (HcPostInput::of_moe_slots) at rows the mix does not take:
// routed = moe_reduce(slot_out, ids) (moe_slot_sum in moe_slot_order's order, as
// moe_reduce_kernel), f = bf16(routed + shared) stored to y (moe_output_value), then
// hc_post's Y, all in one launch where moe_reduce and moe_output_hc_post were two on
// the layer's chain; routed is not stored. The same bits. CTA (column block of 256 x 8
// values, row): the row's slot order by ranks in shared memory (its k <= kHcMaxSlots threads),
// a thread 8 columns. R's and shared's values are loaded before the order's two barriers.
template <int HC>
__global__ void __launch_bounds__(256) hc_post_slots_kernel(const uint16_t* __restrict__ slot_out,
                                                            const int32_t* __restrict__ ids, int k,
                                                            const uint16_t* __restrict__ shared,
                                                            const uint16_t* __restrict__ R,
                                                            const float* __restrict__ post,
                                                            const float* __restrict__ comb, int64_t D,
                                                            uint16_t* __restrict__ y, uint16_t* __restrict__ Y) {
  wait_then_release_dependents();
  __shared__ int32_t s_id[kHcMaxSlots];
  __shared__ int s_order[kHcMaxSlots], s_count;
  const int64_t t = blockIdx.y, d = (int64_t(blockIdx.x) * 256 + threadIdx.x) * 8;
  const int tid = int(threadIdx.x);
  const bool live = d < D;
  BfVec<8> sv, rv[HC];
  if (live) {
    sv = load_bf<8>(shared + t * D + d);
#pragma unroll
    for (int i = 0; i < HC; ++i) rv[i] = load_bf<8>(R + (t * HC + i) * D + d);
  }
  if (tid < k) s_id[tid] = ids[t * k + tid];
  __syncthreads();
  if (tid < k) {
    int count;
    const int place = moe_slot_place(s_id, k, tid, &count);
    if (s_id[tid] >= 0) s_order[place] = tid;
    if (tid == 0) s_count = count;
  }
  __syncthreads();
  if (!live) return;
  float acc[8];
  moe_slot_sum<8>(slot_out + t * k * D + d, D, s_order, s_count, acc);
  BfVec<8> fv;
#pragma unroll
  for (int i = 0; i < 8; ++i) fv.v[i] = moe_output_value(acc[i], sv.v[i]);
  store_bf<8>(y + t * D + d, fv);
  hc_post_store<HC, 8>(fv, rv, post, comb, t, d, D, Y);
}

// ---- moe_reduce / moe_output ---------------------------------------------------
// routed[t] = sum of the row's slots in ascending expert id (stable), ids < 0
// skipped. CTA (row, column block of 128 x VEC values): its thread 0 orders the k
// slots (insertion sort, stable), then one thread per VEC columns. Roofline:
// (k * 2 + 4) * D bytes per row. One CTA per row took ~14 µs at batch 1 (ncu,
// real clocks), 4 per row (D = 4096) spread the row's loads over 4 SMs.
constexpr int kMoeReduceThreads = 128;
constexpr int kMaxMoeSlots = 64;

template <int VEC>
__global__ void moe_reduce_kernel(const uint16_t* __restrict__ slot_out, const int32_t* __restrict__ ids, int64_t k,
                                  int64_t D, float* __restrict__ routed) {
  wait_then_release_dependents();
  __shared__ int order[kMaxMoeSlots];
  __shared__ int32_t row_ids[kMaxMoeSlots];
  __shared__ int count;
  const int64_t t = blockIdx.x;
  for (int s = int(threadIdx.x); s < k; s += blockDim.x) row_ids[s] = ids[t * k + s];
  __syncthreads();
  if (threadIdx.x == 0) count = moe_slot_order(row_ids, int(k), order);
  __syncthreads();
  const int n = count;
  const int64_t c = int64_t(blockIdx.y) * kMoeReduceThreads + threadIdx.x;
  if (c < D / VEC) {
    float acc[VEC];
    moe_slot_sum<VEC>(slot_out + t * k * D + c * VEC, D, order, n, acc);
    float* out = routed + t * D + c * VEC;
    if constexpr (VEC == 8) {
      reinterpret_cast<float4*>(out)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      reinterpret_cast<float4*>(out)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = acc[i];
    }
  }
}

template <int VEC>
__global__ void moe_output_kernel(const float* __restrict__ routed, const uint16_t* __restrict__ shared, int64_t n,
                                  uint16_t* __restrict__ y) {
  wait_then_release_dependents();
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < n / VEC; c += int64_t(gridDim.x) * blockDim.x) {
    const BfVec<VEC> s = load_bf<VEC>(shared + c * VEC);
    BfVec<VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = moe_output_value(routed[c * VEC + i], s.v[i]);
    store_bf<VEC>(y + c * VEC, o);
  }
}

}  // namespace

// ---- launchers -------------------------------------------------------------------

void CudaBackend::do_embed(const Tensor& table, const BatchView& batch, const Tensor& X) {
  const int64_t T = X.size(0), hc = X.size(1), D = X.size(2), V = table.size(0);
  if (T == 0 || hc == 0 || D == 0) return;
  const bool v8 = D % 8 == 0 && aligned16(table.data()) && aligned16(X.data());
  if (v8)
    embed_kernel<8><<<unsigned(T), 128, 0, stream_>>>(table.as<uint16_t>(), V, batch.token_ids, hc, D,
                                                     X.as<uint16_t>());
  else
    embed_kernel<1><<<unsigned(T), 128, 0, stream_>>>(table.as<uint16_t>(), V, batch.token_ids, hc, D,
                                                     X.as<uint16_t>());
  check_launch(stream_);
}

void CudaBackend::do_gather_rows(const Tensor& src, const Tensor& rows, const Tensor& dst) {
  const int64_t R = rows.size(0), src_rows = src.size(0);
  if (R == 0) return;
  const size_t row_bytes = src_rows == 0 ? 0 : src.nbytes() / size_t(src_rows);
  DSV4_CHECK(dst.nbytes() == size_t(R) * row_bytes, "gather_rows: dst holds {} bytes, {} rows of {} expected",
             dst.nbytes(), R, row_bytes);
  if (row_bytes == 0) return;
  if (row_bytes % 16 == 0 && aligned16(src.data()) && aligned16(dst.data()))
    gather_rows_kernel<uint4><<<unsigned(R), 128, 0, stream_>>>(src.as<uint4>(), src_rows, rows.as<int32_t>(),
                                                                int64_t(row_bytes / 16), dst.as<uint4>());
  else
    gather_rows_kernel<uint8_t><<<unsigned(R), 128, 0, stream_>>>(src.as<uint8_t>(), src_rows, rows.as<int32_t>(),
                                                                  int64_t(row_bytes), dst.as<uint8_t>());
  check_launch(stream_);
}

void CudaBackend::do_add_broadcast(const Tensor& e, const Tensor& h, const Tensor& X) {
  const int64_t T = h.size(0), hc = h.size(1), D = h.size(2);
  if (T * hc * D == 0) return;
  const bool v8 = D % 8 == 0 && aligned16(e.data()) && aligned16(h.data()) && aligned16(X.data());
  const int threads = 256;
  if (v8)
    add_broadcast_kernel<8><<<grid_for(T * hc * D / 8, threads), threads, 0, stream_>>>(
        e.as<uint16_t>(), h.as<uint16_t>(), T, hc, D, X.as<uint16_t>());
  else
    add_broadcast_kernel<1><<<grid_for(T * hc * D, threads), threads, 0, stream_>>>(
        e.as<uint16_t>(), h.as<uint16_t>(), T, hc, D, X.as<uint16_t>());
  check_launch(stream_);
}

// The norms' early form (rms_norm_row_early: the weights before the dependency wait, x
// kept in registers): its chunks a thread at 256 threads a row, 1 or 2 (N <= 4096), or 0
// for the late form (larger rows, or DSV4_CUDA_NORM_EARLY=0 for A/B runs; a test hook may
// force either). The same bits. Measured within 0.1% of the late form at 1-256 rows on an
// H100 (eighty-first session): at one row the norms' links shortened and the kernels after
// them on the chain took the time back. On by default as the same bits and not slower.
namespace {
constexpr int kNormThreads = 256;
int norm_early_chunks(int64_t N) {
  static const bool from_env = !env_is("DSV4_CUDA_NORM_EARLY", "0");
  if (!forced_or(g_force_norm_early, from_env) || N % 8 != 0) return 0;
  const int64_t chunks = (N / 8 + kNormThreads - 1) / kNormThreads;
  if (chunks > 2) return 0;
  g_norm_early_launches.fetch_add(1, std::memory_order_relaxed);
  return int(chunks);
}
}  // namespace

void CudaBackend::do_rms_norm(const Tensor& x, const Tensor& weight, float eps, const Tensor& y) {
  const int64_t T = x.size(0), N = x.size(1);
  if (T == 0 || N == 0) return;
  const bool v8 = N % 8 == 0 && aligned16(x.data()) && aligned16(y.data()) && aligned16(weight.data());
  const int early = v8 ? norm_early_chunks(N) : 0;
  const uint16_t* xp = x.as<uint16_t>();
  const uint16_t* wp = weight.as<uint16_t>();
  uint16_t* yp = y.as<uint16_t>();
  if (early == 1)
    rms_norm_kernel<8, 1><<<unsigned(T), kNormThreads, 0, stream_>>>(xp, wp, N, eps, yp);
  else if (early == 2)
    rms_norm_kernel<8, 2><<<unsigned(T), kNormThreads, 0, stream_>>>(xp, wp, N, eps, yp);
  else if (v8)
    rms_norm_kernel<8><<<unsigned(T), kNormThreads, 0, stream_>>>(xp, wp, N, eps, yp);
  else
    rms_norm_kernel<1><<<unsigned(T), kNormThreads, 0, stream_>>>(xp, wp, N, eps, yp);
  check_launch(stream_);
}

// One launch fewer than rms_norm then linear (_pair): the norm quantizes its output
// for the GEMM (quantized_linear.h). Same bits.
void CudaBackend::do_rms_norm_linear(const Tensor& x, const Tensor& norm_weight, float eps, const Tensor& xn,
                                     const QuantLinear& wa, const Tensor& ya, const QuantLinear* wb,
                                     const Tensor* yb) {
  const int64_t T = x.size(0), N = x.size(1);
  if (T == 0) return;
  if (N % 128 != 0 || !aligned16(x.data()) || !aligned16(xn.data()) || !aligned16(norm_weight.data()) ||
      !linears_take_quantized_rows(wa, wb)) {
    Backend::do_rms_norm_linear(x, norm_weight, eps, xn, wa, ya, wb, yb);
    return;
  }
  const QuantizedRows q = linear_activation_scratch(*this, T, N);
  const int early = norm_early_chunks(N);
  const uint16_t* xp = x.as<uint16_t>();
  const uint16_t* wp = norm_weight.as<uint16_t>();
  uint16_t* yp = xn.as<uint16_t>();
  const int entry = T <= cuda_entry_release_rows() ? 1 : 0;
  if (early == 1)
    rms_norm_quant_kernel<1><<<unsigned(T), kNormThreads, 0, stream_>>>(xp, wp, N, eps, yp, q.codes, q.scales, entry);
  else if (early == 2)
    rms_norm_quant_kernel<2><<<unsigned(T), kNormThreads, 0, stream_>>>(xp, wp, N, eps, yp, q.codes, q.scales, entry);
  else
    rms_norm_quant_kernel<0><<<unsigned(T), kNormThreads, 0, stream_>>>(xp, wp, N, eps, yp, q.codes, q.scales, entry);
  check_launch(stream_);
  linears_on_quantized_rows(*this, q, T, wa, ya, wb, yb);
}

void CudaBackend::do_q_norm_rope(const Tensor& q, const BatchView& batch, const RopeTable& rope, float eps) {
  const int64_t T = q.size(0), H = q.size(1), Dh = q.size(2), rd = rope.rope_dim;
  if (T == 0 || H == 0) return;
  DSV4_CHECK(Dh % 2 == 0 && rd % 2 == 0, "q_norm_rope: head_dim {} and rope_dim {} must be even", Dh, rd);
  DSV4_CHECK(H * Dh < (int64_t(1) << 31), "q_norm_rope: {} heads x {} dims exceed 32-bit indexing", H, Dh);
  const int64_t hpc = std::min<int64_t>(H, 8);  // heads per CTA: one per warp
  const size_t plane = size_t((hpc * (Dh + 8) * 2 + 15) / 16 * 16), tables = size_t(rd) * sizeof(float);
  const size_t limit = size_t(properties().sharedMemPerBlockOptin);
  DSV4_CHECK(plane + tables <= limit, "q_norm_rope: {} heads x {} dims need {} bytes of shared memory", hpc, Dh,
             plane + tables);
  const size_t smem = plane + tables;
  const bool v8 = Dh % 8 == 0 && aligned16(q.data());
  const int threads = 256;
  const dim3 grid(unsigned(T), unsigned((H + hpc - 1) / hpc));
  if (v8) {
    if (smem > 48 * 1024)
      DSV4_CUDA_CHECK(cudaFuncSetAttribute(q_norm_rope_kernel<8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(smem)));
    q_norm_rope_kernel<8><<<grid, threads, smem, stream_>>>(q.as<uint16_t>(), batch.positions,
                                                            rope.inv_freq.as<float>(), H, Dh, rd, eps, hpc);
  } else {
    DSV4_CHECK(aligned4(q.data()), "q_norm_rope: q is not 4-byte aligned");
    if (smem > 48 * 1024)
      DSV4_CUDA_CHECK(cudaFuncSetAttribute(q_norm_rope_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(smem)));
    q_norm_rope_kernel<2><<<grid, threads, smem, stream_>>>(q.as<uint16_t>(), batch.positions,
                                                            rope.inv_freq.as<float>(), H, Dh, rd, eps, hpc);
  }
  check_launch(stream_);
}

void CudaBackend::do_kv_rope_quant(const Tensor& kv, const BatchView& batch, const RopeTable& rope) {
  const int64_t T = kv.size(0), Dh = kv.size(1), rd = rope.rope_dim;
  if (T == 0) return;
  DSV4_CHECK(Dh % 8 == 0 && rd % 2 == 0 && rd <= kKvMaxRopeDim && aligned16(kv.data()),
             "kv_rope_quant: head_dim {} must be a multiple of 8, rope_dim {} even and at most {}, kv 16-byte aligned",
             Dh, rd, kKvMaxRopeDim);
  const int warps = 8;
  kv_rope_quant_kernel<<<unsigned((T + warps - 1) / warps), warps * 32, size_t(warps * rd) * sizeof(float),
                         stream_>>>(kv.as<uint16_t>(), T, batch.positions, rope.inv_freq.as<float>(), Dh, rd);
  check_launch(stream_);
}

namespace {

// The two mHC stages for rows [0, T) in launches of at most kHcMaxRowsPerLaunch rows.
// norm (hc_pre_norm): xn = rms_norm(x, norm->weight, norm->eps) in the same launch.
struct HcNorm {
  const Tensor* weight;
  float eps;
  const Tensor* xn;
  QuantizedRows xq = {};  // codes / scales of xn for the FP8 linears (VEC = 8), or none
};

// hc_mix_rows_kernel from kHcRowMixMinRows rows (DSV4_CUDA_HC_ROW_MIX=0: never, for
// A/B runs), hc_mix_partial_kernel below. Same bits either way.
bool row_mix(int64_t rows) {
  static const bool from_env = !env_is("DSV4_CUDA_HC_ROW_MIX", "0");
  const int forced = g_force_row_mix.load(std::memory_order_relaxed);
  return forced >= 0 ? forced == 1 : from_env && rows >= kHcRowMixMinRows;
}

// hc_mix_rows_kernel's kSplit: DSV4_CUDA_HC_ROW_SPLIT=2 (the default, measured best), 1
// or 4; a test hook may force it. Same bits for any.
int row_mix_split() {
  static const int from_env = [] {
    const char* v = std::getenv("DSV4_CUDA_HC_ROW_SPLIT");
    if (v == nullptr || *v == '\0') return 2;
    const std::string s(v);
    DSV4_CHECK(s == "1" || s == "2" || s == "4", "DSV4_CUDA_HC_ROW_SPLIT='{}': expected 1, 2 or 4", s);
    return s[0] - '0';
  }();
  const int forced = g_force_row_split.load(std::memory_order_relaxed);
  return forced > 0 ? forced : from_env;
}

template <int kMix, int kSplit>
void launch_hc_mix_rows(CudaBackend& be, const uint16_t* X, const float* fn, int64_t rows, int64_t n,
                        int64_t slices, float* partial) {
  constexpr int64_t block_rows = kHcRowMixThreads / kSplit;  // the kernel's kBlockRows
  hc_mix_rows_kernel<kMix, kSplit><<<dim3(unsigned(slices), unsigned((rows + block_rows - 1) / block_rows)),
                                     kHcRowMixThreads, 0, be.stream()>>>(X, fn, rows, n, partial);
}

// The instance for `split` parts a row: 4 where kMix allows it, else 2 where it
// allows that, else 1.
template <int kMix>
void launch_hc_mix_rows(CudaBackend& be, int split, const uint16_t* X, const float* fn, int64_t rows, int64_t n,
                        int64_t slices, float* partial) {
  if constexpr (kMix % 4 == 0)
    if (split == 4) return launch_hc_mix_rows<kMix, 4>(be, X, fn, rows, n, slices, partial);
  if constexpr (kMix % 2 == 0)
    if (split >= 2) return launch_hc_mix_rows<kMix, 2>(be, X, fn, rows, n, slices, partial);
  launch_hc_mix_rows<kMix, 1>(be, X, fn, rows, n, slices, partial);
}

// A row limit from the environment (0 .. kHcPostMaxRows), or `fallback`.
int64_t hc_rows_from_env(const char* name, int64_t fallback) { return env_integer(name, fallback, 0, kHcPostMaxRows); }

// The fused mix and finish (hc_mix_finish_kernel) where it applies: up to
// DSV4_CUDA_HC_FUSED_ROWS rows (default 4; 0: never), 16-byte rows (X, x and fn). A test
// hook may force it on (up to kHcPostMaxRows rows) or off. Same bits either way.
// Measured (bench-1g, H200, A/Bs of the two launches, docs/BENCHMARKS.md): -0.2% a step at
// batch 1, -0.1% at 8 (not apart), +0.4% at 16, where the mix tiles of 16 rows ran slower
// than alone (not explained; forty-eighth session); a limit of 4 against 2: -0.2 / -0.3% at
// 3 / 4 rows; off against on at 6 rows: -0.4% (forty-ninth). With the quick hand-over
// (fifty-eighth), a limit of 16 against 4 read -0.3% at 16 rows on two grants and +0.3%
// on a third (each apart), -0.2 / +0.1 / +0.2% at 6 / 8 / 12: no change worth making. With
// the finisher's partials loaded ahead of X (sixty-first session): -0.4% at 16 rows, -0.1% at
// 8 (s70b); on the next grant, with the slot sums in the mix to 16 rows, +0.5 / +1.0 / +0.7% at
// 8 / 12 / 16 (s70c, apart). Left at 4.
bool hc_fused(int64_t rows, bool v8, bool fn16, int64_t slices) {
  static const int64_t max_rows = hc_rows_from_env("DSV4_CUDA_HC_FUSED_ROWS", 4);
  const int forced = g_force_hc_fused.load(std::memory_order_relaxed);
  const int64_t limit = forced >= 0 ? (forced == 1 ? kHcPostMaxRows : 0) : max_rows;
  return rows <= limit && v8 && fn16 && slices <= kHcMaxStagedSlices &&
         g_force_row_mix.load(std::memory_order_relaxed) != 1;
}

// The mix sums the MoE slots itself (HcPostInput::of_moe_slots) up to DSV4_CUDA_HC_SLOT_ROWS
// rows (default 16; a test hook may set it), else moe_reduce runs first. Measured (bench-1g,
// H200, docs/BENCHMARKS.md), the slots summed here against moe_reduce's launch: -0.3% a
// step at batch 1, +0.5% at 8 (with the fused mix and finish at 8), +0.7% at 16
// (forty-eighth session); with the fused pair off: +0.4 / +0.3% at 5 / 6 rows without
// them, -0.2% at 7 and 8 rows with them (forty-ninth). A limit of 16 against 8 (sixty-first
// session, the slots' order by ranks since the fifty-ninth): -0.8% at 16 rows (s70b), -0.7% at
// 12 and 16 (s70d), both apart.
int64_t hc_slot_rows() {
  static const int64_t from_env = hc_rows_from_env("DSV4_CUDA_HC_SLOT_ROWS", kHcPostMaxRows);
  const int forced = g_force_slot_rows.load(std::memory_order_relaxed);
  return forced >= 0 ? forced : from_env;
}

// hc_post_slots_kernel for the MoE slots beyond kHcPostMaxRows rows (where moe_reduce and
// moe_output_hc_post ran before): DSV4_CUDA_HC_POST_SLOTS=0 turns it off (A/B runs); a test
// hook may force it. Same bits either way.
bool hc_post_slots_enabled() {
  static const bool from_env = !env_is("DSV4_CUDA_HC_POST_SLOTS", "0");
  return forced_or(g_force_hc_post_slots, from_env);
}

// HcHandOver::quick: DSV4_CUDA_HC_QUICK_HAND_OVER=0 turns it off (A/B runs); a test hook
// may force it. Same bits either way.
bool hc_quick_hand_over() {
  static const bool from_env = !env_is("DSV4_CUDA_HC_QUICK_HAND_OVER", "0");
  return forced_or(g_force_hc_quick, from_env);
}

// Finishers a row in the fused launch (HcHandOver::parts): two at 2 rows, one elsewhere;
// DSV4_CUDA_HC_ROW_FINISHERS=1|2 sets it at every row count (A/B runs), and a test hook may
// force it. Same bits either way. Why two: in the CTA probe (eighty-second session, H100)
// the one finisher took ~3.2 µs from the norm's factor to its last code, for two chunks a
// thread; with two finishers each thread has one. The cost: the second finisher is an
// earlier arrival, so it polls for the count. Measured (H100, bench-1g, 3 rounds; the
// eighty-fourth session): -0.7% a step at 2 rows (apart), 0.0% at 1, -0.1% at 4.
int hc_row_finishers(int64_t rows) {
  static const int from_env = int(env_integer("DSV4_CUDA_HC_ROW_FINISHERS", 0, 0, 2));
  const int n = forced_mode(g_force_hc_row_finishers, from_env);  // (0: the rule)
  return n >= 1 ? n : rows == 2 ? 2 : 1;
}

// The mix and finish by one cluster (hc_mix_finish_cluster_kernel) where it applies: up to
// DSV4_CUDA_HC_CLUSTER_ROWS rows (default 0: never, measured slower; at most 2), hc <= 4, D a multiple of
// 2048 up to 4096, 16-byte rows, and a cluster of kHcClusterCtas that fits the GPU (checked
// once a device). A test hook may force it on (up to 2 rows) or off. Same bits either way.
constexpr int64_t kHcClusterMaxRows = 2;
bool hc_cluster(int64_t rows, int hc, int64_t D, bool aligned) {
  static const int64_t max_rows = env_integer("DSV4_CUDA_HC_CLUSTER_ROWS", 0, 0, kHcClusterMaxRows);
  const int forced = g_force_hc_cluster.load(std::memory_order_relaxed);
  const int64_t limit = forced >= 0 ? (forced == 1 ? kHcClusterMaxRows : 0) : max_rows;
  return rows >= 1 && rows <= limit && hc <= 4 && D % (kHcClusterCtas * kHcSlice) == 0 &&
         D <= kHcClusterGroups * kHcClusterCtas * kHcSlice && aligned;
}

// Whether `kernel`'s cluster fits this device, its attributes set on the first call a device
// (shared-memory limit, the non-portable cluster size of 16). Where it does not fit, the
// caller takes the fused launch; that is said once.
template <typename K>
bool hc_cluster_fits(K kernel, unsigned threads, int smem, int device, std::atomic<uint64_t>& checked,
                     std::atomic<uint64_t>& fits) {
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (checked.load(std::memory_order_acquire) & bit) return fits.load(std::memory_order_acquire) & bit;
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  DSV4_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t cfg =
      cluster_launch_config(dim3(kHcClusterCtas), dim3(kHcClusterCtas), threads, size_t(smem), nullptr, cluster);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    clusters = 0;
  }
  if (clusters > 0) fits.fetch_or(bit, std::memory_order_acq_rel);
  else
    std::fprintf(stderr,
                 "dsv4: hc: a cluster of %d CTAs with %d KB of shared memory each does not fit GPU %d; "
                 "the mHC mix runs as the fused launch\n",
                 kHcClusterCtas, smem / 1024, device);
  checked.fetch_or(bit, std::memory_order_acq_rel);
  return clusters > 0;
}

// hc_mix_finish_cluster_kernel for these shapes, or false where its cluster does not fit.
template <int HC, bool kHead, int kPostHc, int kRows>
bool launch_hc_cluster(CudaBackend& be, const HcFusedArgs& f, unsigned threads) {
  static std::atomic<uint64_t> checked{0}, fits{0};
  const auto kernel = hc_mix_finish_cluster_kernel<HC, kHead, kPostHc, kRows>;
  constexpr int smem = int(sizeof(HcClusterSmem<HC, kHead, kRows>));
  if (!hc_cluster_fits(kernel, threads, smem, be.device_index(), checked, fits)) return false;
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t cfg =
      cluster_launch_config(dim3(kHcClusterCtas), dim3(kHcClusterCtas), threads, size_t(smem), be.stream(), cluster);
  DSV4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, f));
  check_launch(be.stream());
  g_hc_cluster_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

template <int HC, bool kHead, int kPostHc>
bool launch_hc_cluster_rows(CudaBackend& be, const HcFusedArgs& f, unsigned threads) {
  if constexpr (HC > 4) {
    return false;
  } else {
    return f.rows == 1 ? launch_hc_cluster<HC, kHead, kPostHc, 1>(be, f, threads)
                       : launch_hc_cluster<HC, kHead, kPostHc, 2>(be, f, threads);
  }
}

// The fused kernel's counters [done, left], zeroed when allocated; every launch leaves
// them zeroed.
HcHandOver hc_hand_over(CudaBackend& be, int64_t grid, int64_t rows, int parts, bool x_from_mix) {
  DSV4_CHECK(grid >= rows * parts, "hc: a fused launch of {} CTAs for {} rows x {} finishers", grid, rows, parts);
  bool fresh = false;
  int* sync = static_cast<int*>(be.scratch("hc_hand_over", 2 * sizeof(int), &fresh));
  if (fresh) DSV4_CUDA_CHECK(cudaMemsetAsync(sync, 0, 2 * sizeof(int), be.stream()));
  HcHandOver h;
  h.sync = sync;
  h.arrivals = int(grid);
  h.finishers = int(rows) * parts;
  h.parts = parts;
  h.x_from_mix = x_from_mix;
  h.quick = hc_quick_hand_over();
  return h;
}

// src (hc_post_pre_norm, at most kHcPostMaxRows rows): X is formed by the mix kernel
// from src and written, then read by hc_finish.
template <int HC, bool kHead>
void hc_launch(CudaBackend& be, const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& x,
               const Tensor& post, const Tensor& comb, const HcNorm* norm, const HcPostSource* src) {
  const int64_t T = X.size(0), D = X.size(2), n = HC * D;
  constexpr int kMix = kHead ? HC : (2 + HC) * HC;
  static_assert(kMix <= 28, "one lane per mix plus four for the sums of squares (hc_mix_partial_kernel)");
  DSV4_CHECK(n % kHcSlice == 0, "hc: hc*D = {} must be a multiple of {}", n, kHcSlice);
  const int64_t slices = n / kHcSlice;
  float* partial = static_cast<float*>(
      be.scratch("hc_partial", size_t(slices) * kHcMaxRowsPerLaunch * 32 * sizeof(float)));
  const bool v8 = D % 8 == 0 && aligned16(X.data()) && aligned16(x.data());
  const unsigned threads = kHead ? kHcXThreads : kHcXThreads + 32;  // + the Sinkhorn warp
  if (src)
    DSV4_CHECK(T <= kHcPostMaxRows && src->Y == X.as<uint16_t>() && src->hc == HC,
               "hc: an hc_post source needs <= {} rows, its hc and X = its Y", kHcPostMaxRows);
  for (int64_t r0 = 0; r0 < T; r0 += kHcMaxRowsPerLaunch) {
    const int64_t rows = std::min<int64_t>(kHcMaxRowsPerLaunch, T - r0);
    const uint16_t* Xr = X.as<uint16_t>() + r0 * n;
    HcFinishArgs a;
    a.X = Xr;
    a.partial = partial;
    a.base = w.base.as<float>();
    a.scale = w.scale.as<float>();
    a.slices = slices;
    a.D = D;
    a.norm_eps = c.norm_eps;
    a.hc_eps = c.hc_eps;
    a.sinkhorn_iters = c.sinkhorn_iters;
    a.sinkhorn = !c.sinkhorn_later;
    a.x = x.as<uint16_t>() + r0 * D;
    a.post = kHead ? nullptr : post.as<float>() + r0 * HC;
    a.comb = kHead ? nullptr : comb.as<float>() + r0 * HC * HC;
    a.norm_w = norm ? norm->weight->as<uint16_t>() : nullptr;
    a.rms_eps = norm ? norm->eps : 0.0f;
    a.xn = norm ? norm->xn->as<uint16_t>() + r0 * D : nullptr;
    if (norm && norm->xq.codes) {
      DSV4_CHECK(v8 && D % 128 == 0, "hc_pre_norm_linear_pair: quantizing xn needs D % 128 == 0 and 16-byte rows");
      a.xq = norm->xq.codes + r0 * D;
      a.xs = norm->xq.scales + r0 * (D / 128);
    }
    const bool src_aligned = !src || (aligned16(src->R) && aligned16(src->Y) && (!src->f || aligned16(src->f)) &&
                                      (!src->shared || aligned16(src->shared)) && (!src->y || aligned16(src->y)) &&
                                      (!src->slot_out || aligned16(src->slot_out)));
    if (hc_cluster(rows, HC, D, v8 && aligned16(w.fn.data()) && src_aligned)) {
      HcFusedArgs f{Xr, w.fn.as<float>(), rows, n, kMix, partial, src ? *src : HcPostSource{}, a, HcHandOver{},
                    int(slices)};
      bool launched = false;
      if (!src) launched = launch_hc_cluster_rows<HC, kHead, 0>(be, f, threads);
      else if constexpr (!kHead) launched = launch_hc_cluster_rows<HC, false, HC>(be, f, threads);
      if (launched) continue;
    }
    if (hc_fused(rows, v8, aligned16(w.fn.data()), slices)) {
      const int parts = hc_row_finishers(rows);
      const int64_t grid = std::max(slices, rows * parts);
      HcFusedArgs f{Xr, w.fn.as<float>(), rows, n, kMix, partial, src ? *src : HcPostSource{}, a,
                    hc_hand_over(be, grid, rows, parts, src != nullptr), int(slices)};
      auto launch = [&](auto kernel) { kernel<<<unsigned(grid), threads, 0, be.stream()>>>(f); };
      if (!src)
        launch(hc_mix_finish_kernel<HC, kHead, 0, 8>);
      else if constexpr (!kHead) {
        if (rows <= 8) launch(hc_mix_finish_kernel<HC, false, HC, 8>);
        else launch(hc_mix_finish_kernel<HC, false, HC, 16>);
      } else {
        core::fail("hc_head: no hc_post source is taken");
      }
      check_launch(be.stream());
      g_hc_fused_launches.fetch_add(1, std::memory_order_relaxed);
      if (parts == 2) g_hc_two_finisher_launches.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (src) {
      const dim3 grid(unsigned(slices), 1);
      if (rows <= 8)
        hc_mix_partial_kernel<4, HC, 8><<<grid, 256, 0, be.stream()>>>(Xr, w.fn.as<float>(), rows, n, kMix, partial,
                                                                       *src);
      else
        hc_mix_partial_kernel<4, HC, 16><<<grid, 256, 0, be.stream()>>>(Xr, w.fn.as<float>(), rows, n, kMix,
                                                                        partial, *src);
    } else if (row_mix(rows) && aligned16(Xr) && aligned16(w.fn.data())) {
      launch_hc_mix_rows<kMix>(be, row_mix_split(), Xr, w.fn.as<float>(), rows, n, slices, partial);
      g_row_mix_launches.fetch_add(1, std::memory_order_relaxed);
    } else if (rows > 64 && kMix + 8 <= 32 && aligned16(Xr) && aligned16(w.fn.data()))
      hc_mix_partial_kernel<8><<<dim3(unsigned(slices), unsigned((rows + 63) / 64)), 256, 0, be.stream()>>>(
          Xr, w.fn.as<float>(), rows, n, kMix, partial);
    else
      hc_mix_partial_kernel<4><<<dim3(unsigned(slices), unsigned((rows + 31) / 32)), 256, 0, be.stream()>>>(
          Xr, w.fn.as<float>(), rows, n, kMix, partial);
    check_launch(be.stream());
    if (v8) hc_finish_kernel<HC, kHead, 8><<<unsigned(rows), threads, 0, be.stream()>>>(a);
    else hc_finish_kernel<HC, kHead, 1><<<unsigned(rows), threads, 0, be.stream()>>>(a);
    check_launch(be.stream());
  }
}

template <bool kHead>
void hc_dispatch(CudaBackend& be, const Tensor& X, const HcWeights& w, const HcConfig& c, const Tensor& x,
                 const Tensor& post, const Tensor& comb, const HcNorm* norm = nullptr,
                 const HcPostSource* src = nullptr) {
  switch (c.hc_mult) {
    case 1: return hc_launch<1, kHead>(be, X, w, c, x, post, comb, norm, src);
    case 2: return hc_launch<2, kHead>(be, X, w, c, x, post, comb, norm, src);
    case 3: return hc_launch<3, kHead>(be, X, w, c, x, post, comb, norm, src);
    case 4: return hc_launch<4, kHead>(be, X, w, c, x, post, comb, norm, src);
    default: core::fail("hc_pre/hc_head: hc_mult {} is not supported by the CUDA backend (1..4)", c.hc_mult);
  }
}

}  // namespace

void CudaBackend::do_hc_pre(const Tensor& X, const HcWeights& w, const HcConfig& config, const Tensor& x,
                            const Tensor& post, const Tensor& comb) {
  if (X.size(0) == 0) return;
  hc_dispatch<false>(*this, X, w, config, x, post, comb);
}

void CudaBackend::do_hc_pre_norm(const Tensor& X, const HcWeights& w, const HcConfig& config, const Tensor& norm_weight,
                                 float eps, const Tensor& x, const Tensor& xn, const Tensor& post, const Tensor& comb) {
  if (X.size(0) == 0) return;
  // One launch pair when the row norm can run as rms_norm_kernel<8> does (same bits).
  const int64_t D = X.size(2);
  if (D % 8 != 0 || !aligned16(X.data()) || !aligned16(x.data()) || !aligned16(xn.data()) ||
      !aligned16(norm_weight.data())) {
    Backend::do_hc_pre_norm(X, w, config, norm_weight, eps, x, xn, post, comb);
    return;
  }
  const HcNorm norm{&norm_weight, eps, &xn};
  hc_dispatch<false>(*this, X, w, config, x, post, comb, &norm);
}

// One launch fewer than hc_pre_norm then linear_pair: hc_finish quantizes xn as it
// writes it, the GEMM reads those codes (quantized_linear.h). Same bits.
void CudaBackend::do_hc_pre_norm_linear_pair(const Tensor& X, const HcWeights& w, const HcConfig& config,
                                             const Tensor& norm_weight, float eps, const Tensor& x, const Tensor& xn,
                                             const Tensor& post, const Tensor& comb, const QuantLinear& wa,
                                             const Tensor& ya, const QuantLinear& wb, const Tensor& yb) {
  const int64_t T = X.size(0), D = X.size(2);
  if (T == 0) return;
  if (D % 128 != 0 || !aligned16(X.data()) || !aligned16(x.data()) || !aligned16(xn.data()) ||
      !aligned16(norm_weight.data()) || !linears_take_quantized_rows(wa, &wb)) {
    Backend::do_hc_pre_norm_linear_pair(X, w, config, norm_weight, eps, x, xn, post, comb, wa, ya, wb, yb);
    return;
  }
  const QuantizedRows q = linear_activation_scratch(*this, T, D);
  const HcNorm norm{&norm_weight, eps, &xn, q};
  hc_dispatch<false>(*this, X, w, config, x, post, comb, &norm);
  linears_on_quantized_rows(*this, q, T, wa, ya, &wb, &yb);
}

// Y = hc_post(in) from the MoE slots by hc_post_slots_kernel, y too; false (nothing
// launched) where it is off or does not apply: the caller then reduces the slots first.
bool CudaBackend::hc_post_slots(const HcPostInput& in, const Tensor& Y) {
  const int64_t T = Y.size(0), hc = Y.size(1), D = Y.size(2), k = in.slot_out.size(1);
  if (!hc_post_slots_enabled() || k < 1 || k > kHcMaxSlots || D % 8 != 0 || hc < 1 || hc > 4 || T > 65535 ||
      !aligned16(in.slot_out.data()) || !aligned16(in.shared.data()) || !aligned16(in.y.data()) ||
      !aligned16(in.R.data()) || !aligned16(Y.data()))
    return false;
  const dim3 grid(unsigned((D / 8 + 255) / 256), unsigned(T));
  const auto* so = in.slot_out.as<uint16_t>();
  const auto* id = in.ids.as<int32_t>();
  const auto* sh = in.shared.as<uint16_t>();
  const auto* R = in.R.as<uint16_t>();
  const float *po = in.post.as<float>(), *cm = in.comb.as<float>();
  auto* y = in.y.as<uint16_t>();
  auto* Yp = Y.as<uint16_t>();
  switch (hc) {
    case 1: hc_post_slots_kernel<1><<<grid, 256, 0, stream_>>>(so, id, int(k), sh, R, po, cm, D, y, Yp); break;
    case 2: hc_post_slots_kernel<2><<<grid, 256, 0, stream_>>>(so, id, int(k), sh, R, po, cm, D, y, Yp); break;
    case 3: hc_post_slots_kernel<3><<<grid, 256, 0, stream_>>>(so, id, int(k), sh, R, po, cm, D, y, Yp); break;
    default: hc_post_slots_kernel<4><<<grid, 256, 0, stream_>>>(so, id, int(k), sh, R, po, cm, D, y, Yp); break;
  }
  check_launch(stream_);
  g_hc_post_slots_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// Up to kHcPostMaxRows rows, the mix kernel forms the stream from the hc_post's
// inputs (and stores it) instead of reading it: one launch (hc_post's) fewer; more
// rows take the ops in sequence. Same bits. From MoE slots (of_moe_slots, up to
// kHcMaxSlots a row) the mix also forms routed, which it does not store, up to
// hc_slot_rows() rows: moe_reduce's launch fewer.
void CudaBackend::do_hc_post_pre_norm(const HcPostInput& in, const Tensor& Y, const HcWeights& w,
                                      const HcConfig& config, const Tensor& norm_weight, float eps, const Tensor& x,
                                      const Tensor& xn, const Tensor& post, const Tensor& comb, const QuantLinear* wa,
                                      const Tensor* ya, const QuantLinear* wb, const Tensor* yb) {
  const int64_t T = Y.size(0), hc = Y.size(1), D = Y.size(2);
  if (T == 0) return;
  const bool moe = in.f.ndim() == 0, slots = moe && in.slot_out.ndim() > 0;
  if (slots && T > kHcPostMaxRows && hc_post_slots(in, Y)) {  // the stream formed, then the mix reads it
    if (wa) do_hc_pre_norm_linear_pair(Y, w, config, norm_weight, eps, x, xn, post, comb, *wa, *ya, *wb, *yb);
    else do_hc_pre_norm(Y, w, config, norm_weight, eps, x, xn, post, comb);
    return;
  }
  if (T > kHcPostMaxRows || D % 128 != 0 || hc < 1 || hc > 4 || !aligned16(Y.data()) || !aligned16(x.data()) ||
      !aligned16(xn.data()) || !aligned16(norm_weight.data()) || (wa && !linears_take_quantized_rows(*wa, wb)) ||
      (slots && (in.slot_out.size(1) == 0 || in.slot_out.size(1) > kHcMaxSlots || !aligned16(in.slot_out.data())))) {
    Backend::do_hc_post_pre_norm(in, Y, w, config, norm_weight, eps, x, xn, post, comb, wa, ya, wb, yb);
    return;
  }
  HcPostSource src;
  src.f = moe ? nullptr : in.f.as<uint16_t>();
  src.routed = moe && !slots ? in.routed.as<float>() : nullptr;
  if (slots && T > hc_slot_rows()) {  // moe_reduce's launch, then the stream formed from routed
    do_moe_reduce(in.slot_out, in.ids, in.routed);
    src.routed = in.routed.as<float>();
  } else if (slots) {
    src.slot_out = in.slot_out.as<uint16_t>();
    src.ids = in.ids.as<int32_t>();
    src.k = int(in.slot_out.size(1));
  }
  src.shared = moe ? in.shared.as<uint16_t>() : nullptr;
  src.y = moe ? in.y.as<uint16_t>() : nullptr;
  src.R = in.R.as<uint16_t>();
  src.post = in.post.as<float>();
  src.comb = in.comb.as<float>();
  src.Y = Y.as<uint16_t>();
  src.hc = int(hc);
  src.D = D;
  const QuantizedRows q = wa ? linear_activation_scratch(*this, T, D) : QuantizedRows{};
  const HcNorm norm{&norm_weight, eps, &xn, q};
  hc_dispatch<false>(*this, Y, w, config, x, post, comb, &norm, &src);
  if (wa) linears_on_quantized_rows(*this, q, T, *wa, *ya, wb, yb);
}

void CudaBackend::do_hc_sinkhorn(const Tensor& comb, const HcConfig& config) {
  const int64_t T = comb.size(0);
  if (T == 0) return;
  const unsigned blocks = unsigned((T + kSinkhornRowsPerBlock - 1) / kSinkhornRowsPerBlock);
  constexpr unsigned threads = 32 * kSinkhornRowsPerBlock;
  float* c = comb.as<float>();
  const int64_t iters = config.sinkhorn_iters;
  const float eps = config.hc_eps;
  switch (config.hc_mult) {
    case 1: hc_sinkhorn_kernel<1><<<blocks, threads, 0, stream()>>>(c, T, iters, eps); break;
    case 2: hc_sinkhorn_kernel<2><<<blocks, threads, 0, stream()>>>(c, T, iters, eps); break;
    case 3: hc_sinkhorn_kernel<3><<<blocks, threads, 0, stream()>>>(c, T, iters, eps); break;
    case 4: hc_sinkhorn_kernel<4><<<blocks, threads, 0, stream()>>>(c, T, iters, eps); break;
    default: core::fail("hc_sinkhorn: hc_mult {} is not supported by the CUDA backend (1..4)", config.hc_mult);
  }
  check_launch(stream());
}

void CudaBackend::do_hc_head(const Tensor& X, const HcWeights& w, const HcConfig& config, const Tensor& y) {
  if (X.size(0) == 0) return;
  hc_dispatch<true>(*this, X, w, config, y, Tensor(), Tensor());
}

namespace {
template <int HC>
void hc_post_launch(cudaStream_t stream, const Tensor& f, const Tensor& R, const Tensor& post, const Tensor& comb,
                    const Tensor& Y) {
  const int64_t T = R.size(0), D = R.size(2);
  const bool v8 = D % 8 == 0 && aligned16(f.data()) && aligned16(R.data()) && aligned16(Y.data());
  const int threads = 256;
  if (v8)
    hc_post_kernel<HC, 8><<<grid_for(T * D / 8, threads), threads, 0, stream>>>(
        f.as<uint16_t>(), R.as<uint16_t>(), post.as<float>(), comb.as<float>(), T, D, Y.as<uint16_t>());
  else
    hc_post_kernel<HC, 1><<<grid_for(T * D, threads), threads, 0, stream>>>(
        f.as<uint16_t>(), R.as<uint16_t>(), post.as<float>(), comb.as<float>(), T, D, Y.as<uint16_t>());
  check_launch(stream);
}
}  // namespace

void CudaBackend::do_hc_post(const Tensor& f, const Tensor& R, const Tensor& post, const Tensor& comb,
                             const Tensor& Y) {
  const int64_t T = R.size(0), hc = R.size(1), D = R.size(2);
  if (T == 0 || D == 0 || hc == 0) return;
  switch (hc) {
    case 1: return hc_post_launch<1>(stream_, f, R, post, comb, Y);
    case 2: return hc_post_launch<2>(stream_, f, R, post, comb, Y);
    case 3: return hc_post_launch<3>(stream_, f, R, post, comb, Y);
    case 4: return hc_post_launch<4>(stream_, f, R, post, comb, Y);
    default: core::fail("hc_post: {} streams are not supported by the CUDA backend (1..4)", hc);
  }
}

namespace {
template <int HC>
void moe_output_hc_post_launch(cudaStream_t stream, const Tensor& routed, const Tensor& shared, const Tensor& R,
                               const Tensor& post, const Tensor& comb, const Tensor& y, const Tensor& Y) {
  const int64_t T = R.size(0), D = R.size(2);
  const MoeOutputArgs moe{routed.as<float>(), shared.as<uint16_t>(), y.as<uint16_t>()};
  const bool v8 = D % 8 == 0 && aligned16(routed.data()) && aligned16(shared.data()) && aligned16(y.data()) &&
                  aligned16(R.data()) && aligned16(Y.data());
  const int threads = 256;
  if (v8)
    hc_post_kernel<HC, 8, true><<<grid_for(T * D / 8, threads), threads, 0, stream>>>(
        nullptr, R.as<uint16_t>(), post.as<float>(), comb.as<float>(), T, D, Y.as<uint16_t>(), moe);
  else
    hc_post_kernel<HC, 1, true><<<grid_for(T * D, threads), threads, 0, stream>>>(
        nullptr, R.as<uint16_t>(), post.as<float>(), comb.as<float>(), T, D, Y.as<uint16_t>(), moe);
  check_launch(stream);
}
}  // namespace

void CudaBackend::do_moe_output_hc_post(const Tensor& routed, const Tensor& shared, const Tensor& R,
                                        const Tensor& post, const Tensor& comb, const Tensor& y, const Tensor& Y) {
  const int64_t T = R.size(0), hc = R.size(1), D = R.size(2);
  if (T == 0 || D == 0 || hc == 0) return;
  switch (hc) {
    case 1: return moe_output_hc_post_launch<1>(stream_, routed, shared, R, post, comb, y, Y);
    case 2: return moe_output_hc_post_launch<2>(stream_, routed, shared, R, post, comb, y, Y);
    case 3: return moe_output_hc_post_launch<3>(stream_, routed, shared, R, post, comb, y, Y);
    case 4: return moe_output_hc_post_launch<4>(stream_, routed, shared, R, post, comb, y, Y);
    default: core::fail("moe_output_hc_post: {} streams are not supported by the CUDA backend (1..4)", hc);
  }
}

void CudaBackend::do_moe_reduce(const Tensor& slot_out, const Tensor& ids, const Tensor& routed) {
  const int64_t T = slot_out.size(0), k = slot_out.size(1), D = slot_out.size(2);
  if (T == 0 || D == 0) return;
  DSV4_CHECK(k <= kMaxMoeSlots, "moe_reduce: {} slots per row, at most {}", k, kMaxMoeSlots);
  const bool v8 = D % 8 == 0 && aligned16(slot_out.data()) && aligned16(routed.data());
  const int64_t col_blocks = (D / (v8 ? 8 : 1) + kMoeReduceThreads - 1) / kMoeReduceThreads;
  DSV4_CHECK(col_blocks <= 65535, "moe_reduce: D={} too large", D);
  const dim3 grid{unsigned(T), unsigned(col_blocks), 1};
  if (v8)
    moe_reduce_kernel<8><<<grid, kMoeReduceThreads, 0, stream_>>>(slot_out.as<uint16_t>(), ids.as<int32_t>(), k, D,
                                                                  routed.as<float>());
  else
    moe_reduce_kernel<1><<<grid, kMoeReduceThreads, 0, stream_>>>(slot_out.as<uint16_t>(), ids.as<int32_t>(), k, D,
                                                                  routed.as<float>());
  check_launch(stream_);
}

void CudaBackend::do_moe_output(const Tensor& routed, const Tensor& shared, const Tensor& y) {
  const int64_t n = routed.numel();
  if (n == 0) return;
  const bool v8 = n % 8 == 0 && aligned16(routed.data()) && aligned16(shared.data()) && aligned16(y.data());
  const int threads = 256;
  if (v8)
    moe_output_kernel<8><<<grid_for(n / 8, threads), threads, 0, stream_>>>(routed.as<float>(),
                                                                           shared.as<uint16_t>(), n,
                                                                           y.as<uint16_t>());
  else
    moe_output_kernel<1><<<grid_for(n, threads), threads, 0, stream_>>>(routed.as<float>(), shared.as<uint16_t>(),
                                                                       n, y.as<uint16_t>());
  check_launch(stream_);
}

void cuda_hc_force_row_mix(int on) { g_force_row_mix.store(on, std::memory_order_relaxed); }
int64_t cuda_hc_row_mix_launches() { return g_row_mix_launches.load(std::memory_order_relaxed); }
void cuda_hc_force_row_split(int parts) { g_force_row_split.store(parts, std::memory_order_relaxed); }
void cuda_hc_force_fused(int on) { g_force_hc_fused.store(on, std::memory_order_relaxed); }
int64_t cuda_hc_fused_launches() { return g_hc_fused_launches.load(std::memory_order_relaxed); }
int64_t cuda_hc_two_finisher_launches() { return g_hc_two_finisher_launches.load(std::memory_order_relaxed); }
void cuda_hc_force_cluster(int on) { g_force_hc_cluster.store(on, std::memory_order_relaxed); }
int64_t cuda_hc_cluster_launches() { return g_hc_cluster_launches.load(std::memory_order_relaxed); }
void cuda_hc_force_slot_rows(int rows) { g_force_slot_rows.store(rows, std::memory_order_relaxed); }
void cuda_hc_force_quick_hand_over(int on) { g_force_hc_quick.store(on, std::memory_order_relaxed); }
void cuda_hc_force_row_finishers(int n) { g_force_hc_row_finishers.store(n, std::memory_order_relaxed); }
void cuda_hc_force_post_slots(int on) { g_force_hc_post_slots.store(on, std::memory_order_relaxed); }
int64_t cuda_hc_post_slots_launches() { return g_hc_post_slots_launches.load(std::memory_order_relaxed); }
void cuda_force_norm_early(int on) { g_force_norm_early.store(on, std::memory_order_relaxed); }
int64_t cuda_norm_early_launches() { return g_norm_early_launches.load(std::memory_order_relaxed); }

}  // namespace dsv4::ops
