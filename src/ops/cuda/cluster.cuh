// Thread-block clusters (sm_90): the cluster barrier in one piece or in its two
// halves, the CTA's rank, loads from and stores to another CTA's shared memory
// (distributed shared memory), and the host's launch configuration of a cluster grid.
// Header-only, no kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::ops {

// Every thread of every CTA of the cluster arrives and waits (release / acquire:
// shared-memory writes before it are visible to the cluster after it).
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The two halves, for work between them: a thread arrives, and later waits for every
// thread of the cluster to have arrived. Each arrive is followed by its wait before
// the thread's next arrive.
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_cta_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// This CTA's shared address `local` as the address of the same offset in cluster CTA
// `rank`'s shared memory (for the ld.shared::cluster forms below).
__device__ __forceinline__ uint32_t cluster_map(uint32_t local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  return remote;
}
__device__ __forceinline__ float ld_cluster_f32(uint32_t remote) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
  return v;
}
__device__ __forceinline__ float2 ld_cluster_f32x2(uint32_t remote) {
  float2 v;
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(remote) : "memory");
  return v;
}
__device__ __forceinline__ uint32_t ld_cluster_u32(uint32_t remote) {
  uint32_t v;
  asm volatile("ld.shared::cluster.u32 %0, [%1];\n" : "=r"(v) : "r"(remote) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t ld_cluster_u64(uint32_t remote) {
  uint64_t v;
  asm volatile("ld.shared::cluster.u64 %0, [%1];\n" : "=l"(v) : "r"(remote) : "memory");
  return v;
}
__device__ __forceinline__ void st_cluster_u32(uint32_t remote, uint32_t v) {
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(remote), "r"(v) : "memory");
}
__device__ __forceinline__ void st_cluster_f32(uint32_t remote, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(remote), "f"(v) : "memory");
}
// The first half of the cluster barrier with no ordering (a CTA's start, before any
// access to another CTA's shared memory; its wait comes before the first such access).
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
}
// A launch of `grid` in clusters of `cluster` CTAs, `threads` a CTA and `smem` bytes of
// dynamic shared memory (host side); `attr` holds the cluster attribute the configuration
// points to, so it must outlive the launch.
inline cudaLaunchConfig_t cluster_launch_config(dim3 grid, dim3 cluster, unsigned threads, size_t smem,
                                                cudaStream_t stream, cudaLaunchAttribute& attr) {
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster.x;
  attr.val.clusterDim.y = cluster.y;
  attr.val.clusterDim.z = cluster.z;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// The shared-window address of `p`, a pointer into this CTA's shared memory (for cluster_map).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// The float at this CTA's shared address `local` in the shared memory of cluster CTA `rank`.
__device__ __forceinline__ float ld_cluster_f32(uint32_t local, uint32_t rank) {
  return ld_cluster_f32(cluster_map(local, rank));
}

}  // namespace dsv4::ops
