// Checked CUDA / cuBLAS calls: every call names itself in the error.
#pragma once

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

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline bool aligned4(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 3u) == 0; }

}  // namespace dsv4::ops
