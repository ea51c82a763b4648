// Programmatic dependent launch (sm_90): inside a captured decode graph a kernel
// may be launched while its predecessor still runs (CudaBackend::capture turns the
// kernel-to-kernel edges into programmatic ones), so its launch latency and its
// prologue overlap the predecessor's tail. Every kernel of the ops layer therefore
// calls wait_for_predecessor() before it touches memory another kernel writes (at
// entry; the plain GEMMs after their first weight copies): it returns once the
// kernels it depends on have finished and their writes are visible. Outside such
// a graph it returns at once. The kernels other than the GEMMs call it through
// wait_then_release_dependents(), so that their own dependents launch under them.
#pragma once

namespace dsv4::ops {

__device__ __forceinline__ void wait_for_predecessor() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// Lets the kernels that depend on this one launch before it has finished (their
// blocks still wait in wait_for_predecessor() for its end). A block that exits
// counts as having called it.
__device__ __forceinline__ void allow_dependents_to_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// wait_for_predecessor(), then allow_dependents_to_launch(): the next kernel launches
// while this one still runs, so its launch latency and its prologue (a GEMM's first
// weight copies, issued before its own wait) hide under this kernel's work instead of
// following its last block's exit. For kernels whose output only the next kernel's
// wait guards (all of them: that wait still returns only once this grid has finished
// and flushed). Called after this kernel's own wait, never at entry: the dependent,
// in turn, releases its own dependent only once it runs, so at most one kernel a
// chain sits waiting on the SMs (entry-time release, as the launch-completion edge
// did, made whole chains resident at once; cuda_backend.cu). The hardware releases
// the dependents once every block of the grid has called it or exited, i.e. once
// the grid's last blocks are resident, so they never take a slot this grid needs.
__device__ __forceinline__ void wait_then_release_dependents() {
  wait_for_predecessor();
  allow_dependents_to_launch();
}

}  // namespace dsv4::ops
