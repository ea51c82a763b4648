// mbarriers by shared-memory address and the TMA's bulk copy into shared memory
// counted on one (sm_90): the linears' TMA stages and the mHC cluster kernel's fn.
// Header-only device code with no kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::ops {

// Barriers by shared-memory address (computed once, outside the stage loop).
__device__ __forceinline__ void mbar_init(uint32_t a, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}
// Initialised barriers made visible to the async proxy (the TMA's complete_tx).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t a, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(a), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t a, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n"
      "}\n" ::"r"(a),
      "r"(parity)
      : "memory");
}
// `bytes` (a multiple of 16) from global src to shared d by the TMA's bulk copy, both
// 16-byte aligned, counted on the barrier at b.
__device__ __forceinline__ void tma_bulk_load(uint32_t d, const void* src, uint32_t bytes, uint32_t b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(d),
               "l"(src), "r"(bytes), "r"(b)
               : "memory");
}

}  // namespace dsv4::ops
