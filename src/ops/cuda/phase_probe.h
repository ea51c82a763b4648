// A probe of dependent phases on one GPU (docs/design/batch1-persistent.md): what
// a grid barrier costs inside one persistent cooperative kernel, and what it
// costs to stream the bytes of many dependent phases through such barriers
// against one kernel a phase in a captured graph with programmatic dependent
// launch (how the decode step runs now). `dsv4 bench phases` prints it.
#pragma once

#include <cstdint>

#include "ops/cuda/cuda_backend.h"

namespace dsv4::ops {

struct PhaseProbeOptions {
  int64_t phase_bytes = int64_t(20) << 20;  // bytes each phase reads (~one FP8 linear at batch 1)
  int phases = 40;                          // dependent phases a run
  int barriers = 10000;                     // grid barriers in the barrier-only kernel
  int repeats = 20;                         // timed runs of each variant (median)
  uint64_t seed = 1;                        // of the data the phases read (never zeros)
};

// One way of running the phases: its median time and the checksum of what it read.
struct PhaseRun {
  double ms = 0;
  uint64_t checksum = 0;
};

struct PhaseProbeResult {
  int ctas = 0, threads = 0;  // one CTA an SM, every variant
  double barrier_us = 0;      // one grid barrier (median run / barriers)
  PhaseRun single;            // every phase's bytes as one phase, one kernel: the streaming time alone
  PhaseRun persistent;        // one cooperative kernel, a grid barrier after each phase
  PhaseRun persistent_prefetch;  // the same, the next phase's bytes prefetched to L2 before each barrier
  PhaseRun graph;             // one kernel a phase, captured (programmatic edges)
  PhaseRun graph_prefetch;    // the same, each kernel prefetching its bytes to L2 before its dependency wait
  uint64_t expected_checksum = 0;  // computed on the host from the seed
};

// Runs every variant on `be`'s device and stream. Fails (core::fail) on options
// out of range or where the cooperative launch is not possible.
PhaseProbeResult run_phase_probe(CudaBackend& be, const PhaseProbeOptions& options);

// The checksum the phases' data must give: the sum mod 2^64 of its 32-bit words.
uint64_t phase_probe_expected_checksum(int64_t bytes, uint64_t seed);

}  // namespace dsv4::ops
