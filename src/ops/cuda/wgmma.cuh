// Hopper warpgroup MMA (wgmma, sm_90a) building blocks shared by the kernels:
// shared-memory descriptors of the 128-byte swizzled K-major layout, the fences and
// waits, and the wrappers whose A operand comes from registers. Header-only device
// code with no kernels, so any translation unit may include it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::ops::tensor_core {

// ---- wgmma (sm_90a) ----------------------------------------------------------------------
// Hopper runs mma.sync on e4m3 as f16 HMMA after unpacking both operands (2 HMMA and
// 12 conversions per m16n8k32); wgmma takes e4m3 natively. Operands in shared memory
// (the activations always, the FP8 / bf16 weights too) use the K-major layout with
// the 128-byte swizzle: a stage row is 128 bytes, its 16-byte piece p stored at piece
// p ^ (row % 8), 8-row atoms of 1024 bytes (stride offset; 1024-aligned, since the
// tensor core applies the XOR to address bits 4-6 from bits 7-9). The descriptor of
// the 32-byte K chunk j starts 32j bytes into the rows. The layout without swizzle
// (8x16-byte core matrices) was measured first: its wgmma reads conflict ~7-way in
// shared memory, and the bf16 LM head at batch 1 ran at half the copy bandwidth.
// The descriptor's low word (the start address field, bits 0-13: address / 16, and
// the leading byte offset, 1) and the whole descriptor from it (the high word, the
// stride and the swizzle mode, is a constant).
__device__ __forceinline__ uint32_t wgmma_desc_lo(uint32_t smem_addr) {
  return ((smem_addr & 0x3FFFFu) >> 4) | (1u << 16);
}
__device__ __forceinline__ uint64_t wgmma_desc_of_lo(uint32_t lo) {
  return uint64_t(lo) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_addr) {
  return wgmma_desc_of_lo(wgmma_desc_lo(smem_addr));
}
// The descriptor of the same layout `bytes` further on (a multiple of 16), from the
// low word at the start: one 32-bit add instead of a new descriptor. Shared addresses
// stay below 228 KB, so the address field never carries into the next one.
__device__ __forceinline__ uint64_t wgmma_desc_at(uint32_t lo, uint32_t bytes) {
  return wgmma_desc_of_lo(lo + (bytes >> 4));
}
// Byte offset of 16-byte piece p (0..7) of row r in a swizzled stage buffer.
__device__ __forceinline__ int sw128_offset(int r, int p) { return r * 128 + ((p ^ (r & 7)) << 4); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_1() { asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory"); }
// Waits until at most N committed wgmma groups are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared-memory writes of the generic proxy (cp.async) made visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The wgmma wrappers. d holds the m64nN accumulators, N/2 floats per thread:
// d[4q + e] is row 16*warp + g + 8*(e/2), column 8q + 2t + e%2 of the 64 x N tile.
// DSV4_WG_NAMES_R / DSV4_WG_D_R: the asm names and constraints of R = 4*NT of them
// (operands %0..%R-1; the other operands follow from %R on); they stay defined for
// the wrappers of other kernels (linear_kernels.cuh: both operands in shared memory).
#define DSV4_WG_NAMES_4 "%0, %1, %2, %3"
#define DSV4_WG_NAMES_8 DSV4_WG_NAMES_4 ", %4, %5, %6, %7"
#define DSV4_WG_NAMES_16 DSV4_WG_NAMES_8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define DSV4_WG_NAMES_32 \
  DSV4_WG_NAMES_16 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define DSV4_WG_D_4 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
#define DSV4_WG_D_8 DSV4_WG_D_4, "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define DSV4_WG_D_16 \
  DSV4_WG_D_8, "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define DSV4_WG_D_32                                                                                              \
  DSV4_WG_D_16, "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),      \
      "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), \
      "+f"(d[31])

// d = A * B (scale-d = 0), A 64x32 e4m3 in registers (the m16n8k32 A layout per
// warp), B 32 x 8*NT e4m3 from shared memory. A: "{%R..%R+3}", B's descriptor %R+4.
template <int NT>
__device__ __forceinline__ void wgmma_e4m3(float (&d)[4 * NT], const uint32_t (&a)[4], uint64_t desc);
#define DSV4_WGMMA_E4M3_RS(NT, N, R, OPS)                                                                         \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_e4m3<NT>(float (&d)[R], const uint32_t (&a)[4], uint64_t desc) {         \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 {" DSV4_WG_NAMES_##R "}, " OPS \
                 ", 0, 1, 1;\n"                                                                                   \
                 : DSV4_WG_D_##R                                                                                  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                                      \
  }
DSV4_WGMMA_E4M3_RS(1, 8, 4, "{%4, %5, %6, %7}, %8")
DSV4_WGMMA_E4M3_RS(2, 16, 8, "{%8, %9, %10, %11}, %12")
DSV4_WGMMA_E4M3_RS(4, 32, 16, "{%16, %17, %18, %19}, %20")
#undef DSV4_WGMMA_E4M3_RS

// d = A * B + (scale_d ? d : 0), A 64x16 bf16 (wgmma_bf16_rs) or f16 (wgmma_f16_rs) in
// registers (the m16n8k16 A layout per warp), B 16 x 8*NT of the same type from shared
// memory. A, B's descriptor, then scale_d (PRED). The f16 form is the f16 stage probe's
// (cuda-linear.md, "An f16 stage for wo_a").
template <int NT>
__device__ __forceinline__ void wgmma_bf16_rs(float (&d)[4 * NT], const uint32_t (&a)[4], uint64_t db, int scale_d);
template <int NT>
__device__ __forceinline__ void wgmma_f16_rs(float (&d)[4 * NT], const uint32_t (&a)[4], uint64_t db, int scale_d);
#define DSV4_WGMMA_RS(NAME, TYPE, NT, N, R, OPS, PRED)                                                             \
  template <>                                                                                                     \
  __device__ __forceinline__ void NAME<NT>(float (&d)[R], const uint32_t (&a)[4], uint64_t db, int scale_d) {    \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                                               \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " {" DSV4_WG_NAMES_##R "}, " OPS \
                 ", p, 1, 1, 0;\n}\n"                                                                             \
                 : DSV4_WG_D_##R                                                                                  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));                          \
  }
DSV4_WGMMA_RS(wgmma_bf16_rs, "bf16", 1, 8, 4, "{%4, %5, %6, %7}, %8", "%9")
DSV4_WGMMA_RS(wgmma_bf16_rs, "bf16", 2, 16, 8, "{%8, %9, %10, %11}, %12", "%13")
DSV4_WGMMA_RS(wgmma_bf16_rs, "bf16", 4, 32, 16, "{%16, %17, %18, %19}, %20", "%21")
DSV4_WGMMA_RS(wgmma_bf16_rs, "bf16", 8, 64, 32, "{%32, %33, %34, %35}, %36", "%37")
DSV4_WGMMA_RS(wgmma_f16_rs, "f16", 1, 8, 4, "{%4, %5, %6, %7}, %8", "%9")
#undef DSV4_WGMMA_RS

// d = A * B + (scale_d ? d : 0), both operands from shared memory, K-major with the
// 128-byte swizzle: A 64 rows x 32 bytes, B 32 bytes x 8*NT rows (e4m3: k32; bf16:
// k16). The two descriptors, then scale_d (a predicate).
template <int NT>
__device__ __forceinline__ void wgmma_e4m3_ss(float (&d)[4 * NT], uint64_t da, uint64_t db, int scale_d);
template <int NT>
__device__ __forceinline__ void wgmma_bf16_ss(float (&d)[4 * NT], uint64_t da, uint64_t db, int scale_d);
#define DSV4_WGMMA_SS(NAME, NT, SHAPE, TAIL, R, OPS, PRED)                                                       \
  template <>                                                                                                     \
  __device__ __forceinline__ void NAME<NT>(float (&d)[R], uint64_t da, uint64_t db, int scale_d) {              \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                                               \
                 "wgmma.mma_async.sync.aligned." SHAPE " {" DSV4_WG_NAMES_##R "}, " OPS ", p, 1, 1" TAIL ";\n}\n" \
                 : DSV4_WG_D_##R                                                                                  \
                 : "l"(da), "l"(db), "r"(scale_d));                                                               \
  }
DSV4_WGMMA_SS(wgmma_e4m3_ss, 1, "m64n8k32.f32.e4m3.e4m3", "", 4, "%4, %5", "%6")
DSV4_WGMMA_SS(wgmma_e4m3_ss, 2, "m64n16k32.f32.e4m3.e4m3", "", 8, "%8, %9", "%10")
DSV4_WGMMA_SS(wgmma_e4m3_ss, 4, "m64n32k32.f32.e4m3.e4m3", "", 16, "%16, %17", "%18")
DSV4_WGMMA_SS(wgmma_e4m3_ss, 8, "m64n64k32.f32.e4m3.e4m3", "", 32, "%32, %33", "%34")
DSV4_WGMMA_SS(wgmma_bf16_ss, 1, "m64n8k16.f32.bf16.bf16", ", 0, 0", 4, "%4, %5", "%6")
DSV4_WGMMA_SS(wgmma_bf16_ss, 2, "m64n16k16.f32.bf16.bf16", ", 0, 0", 8, "%8, %9", "%10")
DSV4_WGMMA_SS(wgmma_bf16_ss, 4, "m64n32k16.f32.bf16.bf16", ", 0, 0", 16, "%16, %17", "%18")
DSV4_WGMMA_SS(wgmma_bf16_ss, 8, "m64n64k16.f32.bf16.bf16", ", 0, 0", 32, "%32, %33", "%34")
#undef DSV4_WGMMA_SS

}  // namespace dsv4::ops::tensor_core
