// The wide FP8 GEMM with its warps specialised (opt-in, DSV4_CUDA_WIDE_WS=1; thirtieth
// session, not yet measured): the tile, the per-element accumulation sequence and the
// epilogue of gemm_wide_kernel<FP8, R, kTwoSets> (gemm_wide_kernel.cuh), so the same
// bits, with the work of a stage split by role instead of done by every thread in step:
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
// folding at once between two block barriers a stage).
#pragma once

#include "ops/cuda/gemm_wide_kernel.cuh"

namespace dsv4::ops::linear_kernels {

constexpr int kWsProducerThreads = 128;
constexpr int kWsConsumerThreads = 256;  // two warpgroups, 64 weight rows each
constexpr int kWsThreads = kWsProducerThreads + kWsConsumerThreads;
constexpr int kWsStages = 4;

// Dynamic shared memory of gemm_wide_ws_kernel<R, kTwoSets>: gemm_wide_kernel<FP8>'s
// layout (stage buffers, totals, activation scales, block-scale row) at kWsStages,
// then a full and an empty barrier a stage.
template <int R, bool kTwoSets>
__host__ __device__ constexpr int gemm_wide_ws_smem_bytes() {
  constexpr int S = kWsStages;
  return 1024 /* alignment slack */ + S * (kTileN * 128 + R * 128) + (kTwoSets ? kWsConsumerThreads * (R / 2) * 4 : 0) +
         S * R * 4 + kMaxScaleBlocks + 2 * S * 8;
}

__device__ __forceinline__ void mbar_arrive(uint32_t a) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(a) : "memory");
}
// The barrier at `a` receives one arrival once every cp.async this thread has issued so
// far has landed (.noinc: that arrival is one of the count the barrier was set up with).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t a) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}

template <int R, bool kTwoSets>
__global__ void __launch_bounds__(kWsThreads, 1) gemm_wide_ws_kernel(const GemmParams p) {
  constexpr int S = kWsStages;
  static_assert(R == 64 || R == 128, "wide tiles: 64 or 128 activation rows");
  static_assert(gemm_wide_ws_smem_bytes<R, kTwoSets>() <= 227 * 1024, "wide tiles: shared memory");
  constexpr int NQ = R / 8, NA = R / 2;
  constexpr int kStageBytes = kTileN * 128;
  constexpr int kPieceRows = kWsProducerThreads / 8;  // rows a producer pass covers (8 pieces a row)
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint32_t misalign = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023;
  uint8_t* smem = smem_raw + ((1024 - misalign) & 1023);
  uint8_t* s_w = smem;                                                         // [S][128 rows][128 B]
  uint8_t* s_a = s_w + S * kStageBytes;                                        // [S][R rows][128 B]
  float* s_tot = reinterpret_cast<float*>(s_a + S * R * 128);                  // kTwoSets: [NA][256] totals
  float* s_as = s_tot + (kTwoSets ? NA * kWsConsumerThreads : 0);              // [S][R]
  uint8_t* s_bs = reinterpret_cast<uint8_t*>(s_as + S * R);                    // block-scale row
  const uint32_t bar0 = smem_u32(s_bs + kMaxScaleBlocks);                      // full[S], then empty[S]
  auto full_bar = [&](int s) { return bar0 + 8 * s; };
  auto empty_bar = [&](int s) { return bar0 + 8 * (S + s); };

  const int tid = threadIdx.x;
  const int linear = int(blockIdx.y * gridDim.x + blockIdx.x);
  const int m_tile = linear % int(gridDim.y), tile_n = linear / int(gridDim.y);
  const int row_base = m_tile * R, rows = min(R, p.m - row_base);
  const int n0 = tile_n * kTileN, valid_n = min(kTileN, p.n - n0);
  const bool second = n0 >= p.n_split;  // a stacked pair: this tile reads w1 (host keeps n_split % 128 == 0)
  const uint8_t* w = second ? p.w1 : p.w0;
  const uint8_t* sc = second ? p.s1 : p.s0;
  const int64_t wrow0 = n0 - (second ? p.n_split : 0);
  const int stages_total = p.k / 128, per_slice = stages_total / p.slices;
  // The tile's 128 rows lie in one 128-row scale block (wrow0 % 128 == 0).
  const uint8_t* const scale_row = sc + (wrow0 / 128) * p.s_row_stride;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(full_bar(s), kWsProducerThreads);
      mbar_init(empty_bar(s), kWsConsumerThreads);
    }
    mbar_init_fence();
  }
  // The block-scale row: by the producer's cp.async (it lands with stage 0), or where the
  // row or the buffer is not aligned for that, by every thread before the barrier below.
  const bool scale_async = scale_row_piece(s_bs, scale_row, p.s_row_stride) > 0;
  if (!scale_async)
    for (int i = tid; i < p.s_row_stride; i += kWsThreads) s_bs[i] = scale_row[i];
  __syncthreads();

  float cur[NA];  // the consumers' p_s (their thread's slice sum)
  const int ctid = tid - kWsProducerThreads, cw = ctid >> 7, lane = tid & 31, t = lane & 3;
  if (tid < kWsProducerThreads) {
    // ---- producer: every copy of every stage ----
    const int c_row = tid >> 3, c_part = tid & 7;
    const uint8_t* const w_src = w + (wrow0 + c_row) * p.w_row_bytes + c_part * 16;
    const int64_t w_step = int64_t(kPieceRows) * p.w_row_bytes;
    auto load_weights = [&](int st, int buf) {
      uint8_t* dw = s_w + buf * kStageBytes;
      const uint8_t* src = w_src + int64_t(st) * 128;
#pragma unroll
      for (int i = 0; i < kTileN / kPieceRows; ++i, src += w_step) {
        const int r = c_row + kPieceRows * i;
        const bool ok = r < valid_n;
        cp_async16_l2_128(dw + sw128_offset(r, c_part), ok ? src : w, ok ? 16 : 0);
      }
    };
#pragma unroll
    for (int s = 0; s < S; ++s)  // the weights nobody writes stream in before the dependency wait
      if (s < stages_total) load_weights(s, s);
    if (scale_async) copy_scale_row_async(s_bs, scale_row, p.s_row_stride, tid, kWsProducerThreads);
    wait_for_predecessor();
    constexpr int kAPieces = R / kPieceRows;
    const uint8_t* a_src[kAPieces];
#pragma unroll
    for (int i = 0; i < kAPieces; ++i) {
      const int r = c_row + kPieceRows * i;
      const int src_row = r < rows ? (p.in_rows ? p.in_rows[row_base + r] : row_base + r) : -1;
      a_src[i] = src_row >= 0 ? p.a + int64_t(src_row) * p.a_row_bytes + c_part * 16 : nullptr;
    }
    const float* as_src = nullptr;  // activation scales of tile row tid
    if (tid < R && tid < rows) {
      const int src_row = p.in_rows ? p.in_rows[row_base + tid] : row_base + tid;
      as_src = p.a_scale + int64_t(src_row) * p.a_scale_stride;
    }
    auto load_acts = [&](int st, int buf) {
      uint8_t* da = s_a + buf * R * 128;
#pragma unroll
      for (int i = 0; i < kAPieces; ++i)
        cp_async16(da + sw128_offset(c_row + kPieceRows * i, c_part), a_src[i] ? a_src[i] + int64_t(st) * 128 : p.a,
                   a_src[i] ? 16 : 0);
      if (tid < R) cp_async4(s_as + buf * R + tid, as_src ? as_src + st : p.a_scale, as_src ? 4 : 0);
    };
    for (int it = 0; it < stages_total; ++it) {
      const unsigned uit = unsigned(it);
      const int buf = int(uit % S);
      if (it >= S) {  // the consumers are done with the buffer's previous stage
        mbar_wait(empty_bar(buf), ((uit / S) - 1) & 1);
        load_weights(it, buf);
      }
      load_acts(it, buf);
      cp_async_mbar_arrive(full_bar(buf));
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
  } else {
    // ---- consumers: chain, fold, release ----
    wait_for_predecessor();  // (the epilogue's stores: the predecessor may still read y)
    float d[NA];
#pragma unroll
    for (int i = 0; i < NA; ++i) cur[i] = d[i] = 0.0f;
    if constexpr (kTwoSets) {
#pragma unroll
      for (int i = 0; i < NA; ++i) s_tot[i * kWsConsumerThreads + ctid] = 0.0f;
    }
    int slice_pos = 0;
    for (int it = 0; it < stages_total; ++it) {
      const bool slice_last = slice_pos == per_slice - 1;
      slice_pos = slice_last ? 0 : slice_pos + 1;
      const unsigned uit = unsigned(it);
      const int buf = int(uit % S);
      mbar_wait(full_bar(buf), (uit / S) & 1);
      fence_proxy_async();  // the producer's copies, seen through the barrier, to the wgmmas
      const uint32_t a_lo = wgmma_desc_lo(smem_u32(s_w + buf * kStageBytes + cw * 64 * 128));
      const uint32_t b_lo = wgmma_desc_lo(smem_u32(s_a + buf * R * 128));
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wide_mma<WFmt::kFp8, R>(d, wgmma_desc_at(a_lo, 32 * j), wgmma_desc_at(b_lo, 32 * j), j == 0 ? 0 : 1);
      wgmma_commit();
      wgmma_wait_all();
      const float wsc = core::e8m0_to_float(s_bs[uit]);
      const float* as = s_as + buf * R;
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const float2 a2 = *reinterpret_cast<const float2*>(as + 8 * q + 2 * t);
        const float c0 = wsc * a2.x, c1 = wsc * a2.y;
#pragma unroll
        for (int e = 0; e < 4; ++e) cur[4 * q + e] = fmaf(d[4 * q + e], e & 1 ? c1 : c0, cur[4 * q + e]);
      }
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
  // Every consumer is past its last stage, and so past every copy: the stage buffers
  // take the output tile (each consumer thread's R / 2 values; row stride padded by 16
  // bytes, as gemm_wide_kernel's).
  __syncthreads();
  const int esize = p.y_f32 ? 4 : 2, stride = kTileN * esize + 16;
  if (tid >= kWsProducerThreads) {
    const int warp = (ctid >> 5) & 3, g = lane >> 2;
#pragma unroll
    for (int q = 0; q < NQ; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 64 * cw + 16 * warp + g + 8 * (e >> 1), c = 8 * q + 2 * t + (e & 1);
        const float v = kTwoSets ? s_tot[(4 * q + e) * kWsConsumerThreads + ctid] : 0.0f + cur[4 * q + e];
        if (p.y_f32) *reinterpret_cast<float*>(smem + c * stride + 4 * r) = v;
        else *reinterpret_cast<uint16_t*>(smem + c * stride + 2 * r) = core::float_to_bf16(v);
      }
  }
  allow_dependents_to_launch();  // only the stores are left
  __syncthreads();

  const bool to_y1 = second && p.y1 != nullptr;  // linear_pair: the second weight's own output
  void* const y_out = to_y1 ? p.y1 : p.y;
  const int64_t ld_out = to_y1 ? p.ldy1 : p.ldy, col_out = to_y1 ? int64_t(n0) - p.n_split : int64_t(n0);
  // 16-byte pieces: 8 a row (f32) or 16 (bf16), whole where the row and the piece allow.
  const int pieces = kTileN * esize / 16, per = 16 / esize;
  const bool vec = (ld_out * esize) % 16 == 0 && (col_out * esize) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(y_out) % 16 == 0;
  for (int i = tid; i < rows * pieces; i += kWsThreads) {
    const int c = i / pieces, piece = i % pieces, r0 = piece * per;
    if (r0 >= valid_n) continue;
    const int64_t orow = p.out_rows ? p.out_rows[row_base + c] : row_base + c;
    uint8_t* dst = static_cast<uint8_t*>(y_out) + (orow * ld_out + col_out + r0) * esize;
    const uint8_t* src = smem + c * stride + r0 * esize;
    if (vec && r0 + per <= valid_n) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int k = 0; k < per && r0 + k < valid_n; ++k)
        for (int b = 0; b < esize; ++b) dst[k * esize + b] = src[k * esize + b];
    }
  }
}

}  // namespace dsv4::ops::linear_kernels
