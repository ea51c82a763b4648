// Helpers for CUDA op-vs-reference tests: skip without a GPU, move tensors
// between the CPU reference backend and the CUDA backend.
#pragma once

#include <string>

#include <gtest/gtest.h>

#include "core/tensor.h"
#include "ops/backend.h"
#include "ops/cuda/cuda_backend.h"

namespace dsv4::testing {

// Skips the test (visibly) when no usable CUDA device is present.
#define DSV4_REQUIRE_CUDA()                                                        \
  do {                                                                             \
    std::string dsv4_why_;                                                         \
    if (!::dsv4::ops::cuda_device_available(&dsv4_why_))                           \
      GTEST_SKIP() << "no CUDA device (" << dsv4_why_ << "): GPU test skipped";   \
  } while (0)

// A device copy of a host tensor (same dtype and shape).
inline core::Tensor to_device(ops::Backend& cuda, const core::Tensor& host) {
  core::Tensor d = cuda.empty(host.dtype(), {host.numel()});
  cuda.upload(d, host.data(), host.nbytes());
  return core::Tensor(d.data(), host.dtype(), host.shape(), host.ndim(), core::Device::kCuda, d.owner());
}

// A host copy of a device tensor.
inline core::Tensor to_host(ops::Backend& cuda, const core::Tensor& dev) {
  core::Tensor h = core::Tensor::empty_cpu(dev.dtype(), dev.shape(), dev.ndim());
  cuda.download(h.data(), dev, dev.nbytes());
  return h;
}

// An uninitialised device tensor of the given shape, filled with a poison byte
// pattern so unwritten outputs are visible.
inline core::Tensor device_poisoned(ops::CudaBackend& cuda, core::DType dtype, std::initializer_list<int64_t> shape) {
  core::Tensor t = cuda.empty(dtype, shape);
  cudaMemsetAsync(t.data(), 0x7f, t.nbytes(), cuda.stream());
  return t;
}

}  // namespace dsv4::testing
