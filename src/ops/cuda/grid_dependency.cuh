// Programmatic dependent launch (sm_90): inside a captured decode graph a kernel
// may be launched while its predecessor still runs (CudaBackend::capture turns the
// kernel-to-kernel edges into programmatic ones), so its launch latency and its
// prologue overlap the predecessor's tail. Every kernel of the ops layer therefore
// calls wait_for_predecessor() before it touches memory another kernel writes (at
// entry; the plain GEMMs after their first weight copies): it returns once the
// kernels it depends on have finished and their writes are visible. Outside such
// a graph it returns at once. The small kernels (pointwise, folds, quantization,
// routing) call it through wait_then_release_dependents(), below.
#pragma once

#include <cstdint>

namespace dsv4::ops {

__device__ __forceinline__ void wait_for_predecessor() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
// wait_for_predecessor() as a callable, for code that takes its wait as a parameter
// (gemm_tile: a fused launch's items wait for a flag of the same grid instead).
struct PredecessorWait {
  __device__ __forceinline__ void operator()() const { wait_for_predecessor(); }
};

// Lets the kernels that depend on this one launch before it has finished (their
// blocks still wait in wait_for_predecessor() for its end). A block that exits
// counts as having called it.
__device__ __forceinline__ void allow_dependents_to_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// wait_for_predecessor(), then, for a grid of at most half as many blocks as the
// GPU has SMs (%nsmid: the count of SM ids, which may exceed the SMs a little),
// allow_dependents_to_launch(): the next kernel launches while this one
// still runs, so its launch latency and its prologue (a GEMM's first weight copies,
// issued before its own wait) hide under this kernel instead of following its last
// block's exit. The dependent's wait still returns only once this grid has finished
// and flushed, so nothing it reads changes. Why after this kernel's own wait and not
// at entry: the dependent then releases its own dependent only once it runs, so at
// most one kernel of a chain sits waiting on the SMs (entry-time release, as the
// launch-completion edge did, made whole chains resident at once; cuda_backend.cu).
// Why only small grids: released from every small kernel (the pointwise ones, the
// folds, quantization, routing) it measured -2.0 / -1.0% a step at 1 / 16 rows but
// +0.7 / +0.8% at 64 / 256 (bench-1g, H200; docs/BENCHMARKS.md, thirty-third
// session). The guess (not measured): a grid of one block a row covers half the SMs
// or more from 64 rows, and the dependent's blocks, placed while it runs, crowd onto
// the others. Half rather than a quarter (forty-second session) adds the 34-66-block
// grids, e.g. moe_reduce and the act_quant before wo_b at 16 rows: -0.0 / -0.3 / -0.1 /
// +0.0% at 1 / 16 / 64 / 256 rows (2 rounds; 16 and 64 apart).
// The exception, at 1-4 rows: the plain GEMMs and rms_norm_quant release at entry
// (cuda_entry_release_rows(), cuda_check.h), so two of them in a row put the kernel after
// them on the SMs early. It cannot hang: a dependent launches only once every block of the
// grid before it has run the release or exited, so each grid ahead of a waiting one is
// wholly resident, and none of them waits on a later grid.
// Whether a grid of `blocks` blocks releases its dependents early on a GPU of `sms`
// SM ids (the rule below; host code that depends on the release asks it too).
__host__ __device__ constexpr bool grid_releases_early(uint64_t blocks, uint64_t sms) { return 2 * blocks <= sms; }
__device__ __forceinline__ void wait_then_release_dependents() {
  wait_for_predecessor();
  unsigned sms;
  asm("mov.u32 %0, %%nsmid;" : "=r"(sms));
  if (grid_releases_early(uint64_t(gridDim.x) * gridDim.y * gridDim.z, sms)) allow_dependents_to_launch();
}

// Flags between the blocks of a running grid (the fused expert step): gpu-scope acquire
// loads, release stores and acquire-release adds.
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_gpu(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// An arrival: the release half publishes the arriving CTA's stores (ordered before it
// by a CTA barrier; PTX release is cumulative), the acquire half lets the last arriver
// read the others'. Against a __threadfence (fence.sc) before a relaxed add: -0.2% a
// step at 16 rows in the fused expert step, within the noise at 64 (bench-1g; without
// any fence, which is not correct, -0.7%: the wait for the stores is most of the cost).
__device__ __forceinline__ int atom_add_acq_rel_gpu(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// A count whose result is needed only later: the release half orders what came before
// (cumulatively, through a CTA barrier); no acquire, so the thread's later loads need not
// wait for it. The one that reads the final count takes fence_acq_rel_gpu() before acting.
__device__ __forceinline__ int atom_add_release_gpu(int* p, int v) {
  int old;
  asm volatile("atom.release.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

}  // namespace dsv4::ops
