// Host side of the exhaustive bit checks (e4m3 and bf16 casts and decodes): runs a
// check kernel over a grid-stride range and returns how many inputs it counted as
// mismatching, with the first one it saw in *first.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/cuda_check.h"

namespace dsv4::ops {

// kernel(count, first): each thread walks its inputs by the grid's stride, adds 1 to
// *count for each mismatch and writes *first for the mismatch that took count from 0.
inline int64_t count_mismatches(void (*kernel)(unsigned long long*, uint32_t*), uint32_t* first) {
  unsigned long long* d_count = nullptr;
  uint32_t* d_first = nullptr;
  DSV4_CUDA_CHECK(cudaMalloc(&d_count, sizeof(unsigned long long)));
  DSV4_CUDA_CHECK(cudaMalloc(&d_first, sizeof(uint32_t)));
  DSV4_CUDA_CHECK(cudaMemset(d_count, 0, sizeof(unsigned long long)));
  DSV4_CUDA_CHECK(cudaMemset(d_first, 0, sizeof(uint32_t)));
  kernel<<<4096, 256>>>(d_count, d_first);
  DSV4_CUDA_CHECK(cudaGetLastError());
  unsigned long long count = 0;
  DSV4_CUDA_CHECK(cudaMemcpy(&count, d_count, sizeof count, cudaMemcpyDeviceToHost));
  DSV4_CUDA_CHECK(cudaMemcpy(first, d_first, sizeof(uint32_t), cudaMemcpyDeviceToHost));
  DSV4_CUDA_CHECK(cudaFree(d_count));
  DSV4_CUDA_CHECK(cudaFree(d_first));
  return int64_t(count);
}

}  // namespace dsv4::ops
