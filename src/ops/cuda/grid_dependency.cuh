// Programmatic dependent launch (sm_90): inside a captured decode graph a kernel
// may be launched while its predecessor still runs (CudaBackend::capture turns the
// kernel-to-kernel edges into programmatic ones), so its launch latency and its
// prologue overlap the predecessor's tail. Every kernel of the ops layer therefore
// calls wait_for_predecessor() before it touches memory another kernel writes (at
// entry; the plain GEMMs after their first weight copies): it returns once the
// kernels it depends on have finished and their writes are visible. Outside such
// a graph it returns at once.
#pragma once

namespace dsv4::ops {

__device__ __forceinline__ void wait_for_predecessor() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// Lets the kernels that depend on this one launch before it has finished (their
// blocks still wait in wait_for_predecessor() for its end). A block that exits
// counts as having called it.
__device__ __forceinline__ void allow_dependents_to_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

}  // namespace dsv4::ops
