// Test hooks: one bf16 tensor-core step on the hardware, so the tests can hold the
// CPU model of it (ref::hopper_bf16_mma16) against both instructions the kernels
// use: mma.sync m16n8k16 (the attention kernel) and wgmma m64n8k16 (the GEMMs); and
// chains of e4m3 k32 steps with an accumulator, to measure the step a per-128 FP8
// fold would rest on (docs/design/cuda-linear.md, next step 15); and one 64-wide stage
// of `wo_a` on f16 operands against the same on bf16 ("An f16 stage for wo_a").
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/cuda_test_hooks.h"
#include "ops/cuda/wgmma.cuh"

namespace dsv4::ops {

namespace {

namespace tc = tensor_core;

__global__ void __launch_bounds__(128) e4m3_mma_probe_kernel(const uint8_t* __restrict__ A,
                                                             const uint8_t* __restrict__ B,
                                                             const float* __restrict__ C, int chunks,
                                                             float* __restrict__ D) {
  __shared__ __align__(1024) uint8_t raw[72 * 128 + 1024];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
  uint8_t* as = raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);  // 64 rows of 128 bytes, then B's 8
  uint8_t* bs = as + 64 * 128;
  const int64_t blk = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int kb = 32 * chunks;  // bytes a row
  const uint8_t* a = A + blk * 64 * kb;
  const uint8_t* b = B + blk * 8 * kb;
  for (int i = tid; i < 72 * 128; i += 128) {  // byte k of row r at its place in the swizzled row; zeros past kb
    const int r = i >> 7, k = i & 127;
    const uint8_t v = k < kb ? (r < 64 ? a[r * kb + k] : b[(r - 64) * kb + k]) : uint8_t(0);
    (r < 64 ? as : bs)[tc::sw128_offset(r & 63, k >> 4) + (k & 15)] = v;
  }
  tc::fence_proxy_async();
  __syncthreads();
  const int r0 = 16 * warp + g, r1 = r0 + 8;
  const int o[4] = {r0 * 8 + 2 * t, r0 * 8 + 2 * t + 1, r1 * 8 + 2 * t, r1 * 8 + 2 * t + 1};
  const float* c = C + blk * 64 * 8;
  float w[4] = {c[o[0]], c[o[1]], c[o[2]], c[o[3]]};
  const uint32_t lo_a = tc::wgmma_desc_lo(static_cast<uint32_t>(__cvta_generic_to_shared(as)));
  const uint32_t lo_b = tc::wgmma_desc_lo(static_cast<uint32_t>(__cvta_generic_to_shared(bs)));
  tc::wgmma_fence();
  for (int j = 0; j < chunks; ++j) tc::wgmma_e4m3_ss<1>(w, tc::wgmma_desc_at(lo_a, 32 * j), tc::wgmma_desc_at(lo_b, 32 * j), 1);
  tc::wgmma_commit();
  tc::wgmma_wait_all();
  for (int e = 0; e < 4; ++e) D[blk * 64 * 8 + o[e]] = w[e];
}

__global__ void __launch_bounds__(128) bf16_mma_probe_kernel(const uint16_t* __restrict__ A,
                                                             const uint16_t* __restrict__ B,
                                                             const float* __restrict__ C, float* __restrict__ Dm,
                                                             float* __restrict__ Dw) {
  __shared__ __align__(1024) uint8_t raw[2048];
  // The 128-byte swizzle needs a 1024-byte aligned atom.
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
  uint8_t* bs = raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
  const int64_t blk = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const uint16_t* a = A + blk * 64 * 16;
  const uint16_t* b = B + blk * 8 * 16;
  const float* c = C + blk * 64 * 8;
  {  // B as wgmma reads it: row n of 128 bytes, k at byte 2k, 16-byte piece p stored at p ^ (n % 8)
    const int n = tid >> 4, k = tid & 15;
    *reinterpret_cast<uint16_t*>(bs + tc::sw128_offset(n, k >> 3) + (k & 7) * 2) = b[n * 16 + k];
  }
  tc::fence_proxy_async();
  __syncthreads();
  const int r0 = 16 * warp + g, r1 = r0 + 8;
  const auto pair = [](const uint16_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 16); };
  // The m16n8k16 A layout: {row g, k 2t}, {row g+8, k 2t}, {row g, k 8+2t}, {row g+8, k 8+2t}.
  const uint32_t af[4] = {pair(a + r0 * 16 + 2 * t), pair(a + r1 * 16 + 2 * t), pair(a + r0 * 16 + 8 + 2 * t),
                          pair(a + r1 * 16 + 8 + 2 * t)};
  // B (".col"): k 2t, 2t+1 and 8+2t, 9+2t of column g.
  const uint32_t bf[2] = {pair(b + g * 16 + 2 * t), pair(b + g * 16 + 8 + 2 * t)};
  const int o[4] = {r0 * 8 + 2 * t, r0 * 8 + 2 * t + 1, r1 * 8 + 2 * t, r1 * 8 + 2 * t + 1};
  float d[4] = {c[o[0]], c[o[1]], c[o[2]], c[o[3]]};
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "r"(bf[0]), "r"(bf[1]));
  for (int e = 0; e < 4; ++e) Dm[blk * 64 * 8 + o[e]] = d[e];
  float w[4] = {c[o[0]], c[o[1]], c[o[2]], c[o[3]]};  // the wgmma accumulator layout is the same
  tc::wgmma_fence();
  tc::wgmma_bf16_rs<1>(w, af, tc::wgmma_desc(static_cast<uint32_t>(__cvta_generic_to_shared(bs))), 1);
  tc::wgmma_commit();
  tc::wgmma_wait_all();
  for (int e = 0; e < 4; ++e) Dw[blk * 64 * 8 + o[e]] = w[e];
}

__global__ void __launch_bounds__(128) f16_stage_probe_kernel(const uint8_t* __restrict__ A8,
                                                              const uint16_t* __restrict__ Abf,
                                                              const uint16_t* __restrict__ B, const int* __restrict__ S,
                                                              const float* __restrict__ C, float* __restrict__ Dbf,
                                                              float* __restrict__ Dh) {
  __shared__ __align__(1024) uint8_t raw[3 * 1024];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
  uint8_t* bs = raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);  // bf16 B: 8 rows of 128 bytes
  uint8_t* hs = bs + 1024;                                          // f16 B, the same layout
  const int64_t blk = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const uint8_t* a8 = A8 + blk * 64 * 64;
  const uint16_t* abf = Abf + blk * 64 * 64;
  const uint16_t* b = B + blk * 8 * 64;
  const int* s = S + blk * 8;
  for (int i = tid; i < 8 * 64; i += 128) {  // element k of row n at its place in the swizzled row
    const int n = i >> 6, k = i & 63;
    const int off = tc::sw128_offset(n, k >> 3) + (k & 7) * 2;
    *reinterpret_cast<uint16_t*>(bs + off) = b[i];
    const __half h = __float2half_rn(ldexpf(core::bf16_to_float(b[i]), s[n]));
    *reinterpret_cast<__half*>(hs + off) = h;
  }
  tc::fence_proxy_async();
  __syncthreads();
  const int r0 = 16 * warp + g, r1 = r0 + 8;
  const int o[4] = {r0 * 8 + 2 * t, r0 * 8 + 2 * t + 1, r1 * 8 + 2 * t, r1 * 8 + 2 * t + 1};
  const float* c = C + blk * 64 * 8;
  float wb[4], wh[4];
  for (int e = 0; e < 4; ++e) {
    wb[e] = c[o[e]];
    wh[e] = ldexpf(c[o[e]], s[o[e] % 8]);
  }
  const auto pair16 = [](const uint16_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 16); };
  const auto pair8 = [](const uint8_t* p) {  // two codes -> f16x2 (lower k in the low half)
    const uint16_t codes = uint16_t(p[0] | (p[1] << 8));
    uint32_t h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h) : "h"(codes));
    return h;
  };
  const uint32_t lo_b = tc::wgmma_desc_lo(static_cast<uint32_t>(__cvta_generic_to_shared(bs)));
  const uint32_t lo_h = tc::wgmma_desc_lo(static_cast<uint32_t>(__cvta_generic_to_shared(hs)));
  uint32_t fb[4][4], fh[4][4];
  for (int j = 0; j < 4; ++j) {  // the m16n8k16 A layout of chunk j (k 16j ..)
    const int k0 = 16 * j + 2 * t, k1 = k0 + 8;
    fb[j][0] = pair16(abf + r0 * 64 + k0), fb[j][1] = pair16(abf + r1 * 64 + k0);
    fb[j][2] = pair16(abf + r0 * 64 + k1), fb[j][3] = pair16(abf + r1 * 64 + k1);
    fh[j][0] = pair8(a8 + r0 * 64 + k0), fh[j][1] = pair8(a8 + r1 * 64 + k0);
    fh[j][2] = pair8(a8 + r0 * 64 + k1), fh[j][3] = pair8(a8 + r1 * 64 + k1);
  }
  tc::wgmma_fence();
  for (int j = 0; j < 4; ++j) tc::wgmma_bf16_rs<1>(wb, fb[j], tc::wgmma_desc_at(lo_b, 32 * j), 1);
  tc::wgmma_commit();
  tc::wgmma_wait_all();
  tc::wgmma_fence();
  for (int j = 0; j < 4; ++j) tc::wgmma_f16_rs<1>(wh, fh[j], tc::wgmma_desc_at(lo_h, 32 * j), 1);
  tc::wgmma_commit();
  tc::wgmma_wait_all();
  for (int e = 0; e < 4; ++e) {
    Dbf[blk * 64 * 8 + o[e]] = wb[e];
    Dh[blk * 64 * 8 + o[e]] = ldexpf(wh[e], -s[o[e] % 8]);
  }
}

}  // namespace

void cuda_bf16_mma_probe(const uint16_t* a, const uint16_t* b, const float* c, int64_t blocks, float* d_mma,
                         float* d_wgmma) {
  if (blocks <= 0) return;
  const size_t na = size_t(blocks) * 64 * 16, nb = size_t(blocks) * 8 * 16, nc = size_t(blocks) * 64 * 8;
  uint16_t *da = nullptr, *db = nullptr;
  float *dc = nullptr, *dm = nullptr, *dw = nullptr;
  DSV4_CUDA_CHECK(cudaMalloc(&da, na * 2));
  DSV4_CUDA_CHECK(cudaMalloc(&db, nb * 2));
  DSV4_CUDA_CHECK(cudaMalloc(&dc, nc * 4));
  DSV4_CUDA_CHECK(cudaMalloc(&dm, nc * 4));
  DSV4_CUDA_CHECK(cudaMalloc(&dw, nc * 4));
  DSV4_CUDA_CHECK(cudaMemcpy(da, a, na * 2, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(db, b, nb * 2, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(dc, c, nc * 4, cudaMemcpyHostToDevice));
  bf16_mma_probe_kernel<<<unsigned(blocks), 128>>>(da, db, dc, dm, dw);
  DSV4_CUDA_CHECK(cudaGetLastError());
  DSV4_CUDA_CHECK(cudaMemcpy(d_mma, dm, nc * 4, cudaMemcpyDeviceToHost));
  DSV4_CUDA_CHECK(cudaMemcpy(d_wgmma, dw, nc * 4, cudaMemcpyDeviceToHost));
  for (void* p : {static_cast<void*>(da), static_cast<void*>(db), static_cast<void*>(dc), static_cast<void*>(dm),
                  static_cast<void*>(dw)})
    DSV4_CUDA_CHECK(cudaFree(p));
}

void cuda_e4m3_mma_probe(const uint8_t* a, const uint8_t* b, const float* c, int64_t blocks, int chunks, float* d) {
  DSV4_CHECK(chunks >= 1 && chunks <= 4, "cuda_e4m3_mma_probe: {} chunks, 1 to 4", chunks);
  if (blocks <= 0) return;
  const size_t na = size_t(blocks) * 64 * 32 * chunks, nb = size_t(blocks) * 8 * 32 * chunks,
               nc = size_t(blocks) * 64 * 8;
  uint8_t *da = nullptr, *db = nullptr;
  float *dc = nullptr, *dd = nullptr;
  DSV4_CUDA_CHECK(cudaMalloc(&da, na));
  DSV4_CUDA_CHECK(cudaMalloc(&db, nb));
  DSV4_CUDA_CHECK(cudaMalloc(&dc, nc * 4));
  DSV4_CUDA_CHECK(cudaMalloc(&dd, nc * 4));
  DSV4_CUDA_CHECK(cudaMemcpy(da, a, na, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(db, b, nb, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(dc, c, nc * 4, cudaMemcpyHostToDevice));
  e4m3_mma_probe_kernel<<<unsigned(blocks), 128>>>(da, db, dc, chunks, dd);
  DSV4_CUDA_CHECK(cudaGetLastError());
  DSV4_CUDA_CHECK(cudaMemcpy(d, dd, nc * 4, cudaMemcpyDeviceToHost));
  for (void* p : {static_cast<void*>(da), static_cast<void*>(db), static_cast<void*>(dc), static_cast<void*>(dd)})
    DSV4_CUDA_CHECK(cudaFree(p));
}

void cuda_f16_stage_probe(const uint8_t* a_codes, const uint16_t* a_bf16, const uint16_t* b, const int* s,
                          const float* c, int64_t blocks, float* d_bf16, float* d_f16) {
  if (blocks <= 0) return;
  const size_t na = size_t(blocks) * 64 * 64, nb = size_t(blocks) * 8 * 64, ns = size_t(blocks) * 8,
               nc = size_t(blocks) * 64 * 8;
  uint8_t* da8 = nullptr;
  uint16_t *dabf = nullptr, *db = nullptr;
  int* ds = nullptr;
  float *dc = nullptr, *dbf = nullptr, *dh = nullptr;
  DSV4_CUDA_CHECK(cudaMalloc(&da8, na));
  DSV4_CUDA_CHECK(cudaMalloc(&dabf, na * 2));
  DSV4_CUDA_CHECK(cudaMalloc(&db, nb * 2));
  DSV4_CUDA_CHECK(cudaMalloc(&ds, ns * 4));
  DSV4_CUDA_CHECK(cudaMalloc(&dc, nc * 4));
  DSV4_CUDA_CHECK(cudaMalloc(&dbf, nc * 4));
  DSV4_CUDA_CHECK(cudaMalloc(&dh, nc * 4));
  DSV4_CUDA_CHECK(cudaMemcpy(da8, a_codes, na, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(dabf, a_bf16, na * 2, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(db, b, nb * 2, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(ds, s, ns * 4, cudaMemcpyHostToDevice));
  DSV4_CUDA_CHECK(cudaMemcpy(dc, c, nc * 4, cudaMemcpyHostToDevice));
  f16_stage_probe_kernel<<<unsigned(blocks), 128>>>(da8, dabf, db, ds, dc, dbf, dh);
  DSV4_CUDA_CHECK(cudaGetLastError());
  DSV4_CUDA_CHECK(cudaMemcpy(d_bf16, dbf, nc * 4, cudaMemcpyDeviceToHost));
  DSV4_CUDA_CHECK(cudaMemcpy(d_f16, dh, nc * 4, cudaMemcpyDeviceToHost));
  for (void* p : {static_cast<void*>(da8), static_cast<void*>(dabf), static_cast<void*>(db), static_cast<void*>(ds),
                  static_cast<void*>(dc), static_cast<void*>(dbf), static_cast<void*>(dh)})
    DSV4_CUDA_CHECK(cudaFree(p));
}

}  // namespace dsv4::ops
