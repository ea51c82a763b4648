// Checked CUDA / cuBLAS calls: every call names itself in the error.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "core/error.h"

#define DSV4_CUDA_CHECK(call)                                                                     \
  do {                                                                                            \
    cudaError_t dsv4_err_ = (call);                                                               \
    if (dsv4_err_ != cudaSuccess)                                                                 \
      ::dsv4::core::fail("CUDA error at {}:{}: {} returned {} ({})", __FILE__, __LINE__, #call,   \
                         cudaGetErrorName(dsv4_err_), cudaGetErrorString(dsv4_err_));             \
  } while (0)

#define DSV4_CUBLAS_CHECK(call)                                                                   \
  do {                                                                                            \
    cublasStatus_t dsv4_st_ = (call);                                                             \
    if (dsv4_st_ != CUBLAS_STATUS_SUCCESS)                                                        \
      ::dsv4::core::fail("cuBLAS error at {}:{}: {} returned {}", __FILE__, __LINE__, #call,      \
                         int(dsv4_st_));                                                          \
  } while (0)

namespace dsv4::ops {

// After every launch: the launch error always; in debug builds also a sync of
// the stream, so a faulting kernel is named where it runs (skipped while the
// stream is being captured into a graph, where synchronising is illegal).
inline void check_launch(cudaStream_t stream) {
  DSV4_CUDA_CHECK(cudaGetLastError());
#ifndef NDEBUG
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  DSV4_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status == cudaStreamCaptureStatusNone) DSV4_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
}

// Whether environment variable `name` is set to `value` (the kernel switches;
// callers keep the answer in a static: read once).
inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// Environment variable `name` as an integer in [min, max]; `fallback` where unset or empty;
// a clear error naming it otherwise, never a silent stand-in (callers keep the answer in a
// static). tools/env_switches.cpp lists each switch's range for `dsv4 env`.
inline int64_t env_integer(const char* name, int64_t fallback, int64_t min, int64_t max) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long r = std::strtoll(v, &end, 10);
  const bool digits = *v == '-' || (*v >= '0' && *v <= '9');  // (strtoll would skip spaces and take '+')
  DSV4_CHECK(digits && *end == '\0' && errno == 0 && r >= min && r <= max, "{}='{}': expected an integer {}..{}", name,
             v, min, max);
  return int64_t(r);
}

// Up to this many rows (DSV4_CUDA_ENTRY_RELEASE_ROWS, default 4; 0: never) the plain GEMMs
// of at most DSV4_CUDA_ENTRY_RELEASE_MB of weights (GemmParams::release_at_entry) and
// rms_norm_quant let their dependents launch at entry, before their own dependency wait,
// not after it (grid_dependency.cuh). A GEMM's dependent is then resident while the GEMM
// still streams, with its own first weight copies or weight loads in flight. Why it pays
// is not traced; the guess: wo_b's first stages go out under wo_a, whose decode leaves HBM
// time to spare (wo_a reads ~1.8 TB/s at one row). Measured on bench-1g (H100,
// 3 rounds apart; docs/BENCHMARKS.md, eighty-third session):
// - every layer GEMM (64 MB, not the LM head) and the norm: -0.5% a step at 1 row, -0.3 to
//   -0.4% at 2, -0.4% at 4, +0.3% at 8 (hence 4 rows);
// - only the GEMMs of at most 7 MB and the norm: +0.4 / +0.2% at 1 / 2 rows (wq_b's copies
//   then start under the mHC finisher's tail, which slowed by what wq_b gained);
// - the norm alone 0.0 / -0.1%; the LM head as well (2000 MB) -0.1 / 0.0 / +0.1% at 1 / 4 /
//   8 rows, within the noise.
inline int64_t cuda_entry_release_rows() {
  static const int64_t rows = env_integer("DSV4_CUDA_ENTRY_RELEASE_ROWS", 4, 0, 65536);
  return rows;
}

// A switch a test hook may force: the hook's value when set (>= 0), else the
// environment's (env_mode: "0" -> 0, "1" -> 1, otherwise -1, the automatic choice).
inline int forced_mode(const std::atomic<int>& forced, int from_env) {
  const int f = forced.load(std::memory_order_relaxed);
  return f >= 0 ? f : from_env;
}
inline int env_mode(const char* name) { return env_is(name, "0") ? 0 : env_is(name, "1") ? 1 : -1; }
// The same for an on/off switch: -1 follows the environment, 0 / 1 force it.
inline bool forced_or(const std::atomic<int>& forced, bool from_env) {
  return forced_mode(forced, from_env ? 1 : 0) == 1;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline bool aligned4(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3u) == 0; }

}  // namespace dsv4::ops
