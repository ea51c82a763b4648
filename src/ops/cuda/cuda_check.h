// Checked CUDA / cuBLAS calls: every call names itself in the error.
#pragma once

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

// After every launch: the launch error always; in debug builds also a device sync,
// so a faulting kernel is named where it runs.
#ifdef NDEBUG
#define DSV4_CUDA_LAUNCH_CHECK() DSV4_CUDA_CHECK(cudaGetLastError())
#else
#define DSV4_CUDA_LAUNCH_CHECK()               \
  do {                                         \
    DSV4_CUDA_CHECK(cudaGetLastError());       \
    DSV4_CUDA_CHECK(cudaDeviceSynchronize());  \
  } while (0)
#endif
