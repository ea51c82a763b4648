// Helpers for CUDA op-vs-reference tests: skip without a GPU, move tensors
// between the CPU reference backend and the CUDA backend.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/tensor.h"
#include "ops/backend.h"
#include "ops/cuda/cuda_backend.h"
#include "op_test_util.h"

namespace dsv4::testing {

// Skips the test (visibly) when no usable CUDA device is present.
#define DSV4_REQUIRE_CUDA()                                                        \
  do {                                                                             \
    std::string dsv4_why_;                                                         \
    if (!::dsv4::ops::cuda_device_available(&dsv4_why_))                           \
      GTEST_SKIP() << "no CUDA device (" << dsv4_why_ << "): GPU test skipped";   \
  } while (0)

// Whether DSV4_CUDA_PDL=0 turned programmatic dependent launch off for captured graphs.
inline bool pdl_disabled() {
  const char* v = std::getenv("DSV4_CUDA_PDL");
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// A device copy of a host tensor (same dtype and shape; role: see ops::TensorRole).
inline core::Tensor to_device(ops::Backend& cuda, const core::Tensor& host,
                              ops::TensorRole role = ops::TensorRole::kPlain) {
  core::Tensor d = cuda.empty(host.dtype(), {host.numel()});
  // (uploaded in its shape: packed FP4's device order depends on it)
  core::Tensor shaped(d.data(), host.dtype(), host.shape(), host.ndim(), core::Device::kCuda, d.owner());
  cuda.upload(shaped, host.data(), host.nbytes(), role);
  return shaped;
}

// A host copy of a device tensor.
inline core::Tensor to_host(ops::Backend& cuda, const core::Tensor& dev, ops::TensorRole role = ops::TensorRole::kPlain) {
  core::Tensor h = core::Tensor::empty_cpu(dev.dtype(), dev.shape(), dev.ndim());
  cuda.download(h.data(), dev, dev.nbytes(), role);
  return h;
}

// An uninitialised device tensor of the given shape, filled with a poison byte
// pattern so unwritten outputs are visible.
inline core::Tensor device_poisoned(ops::CudaBackend& cuda, core::DType dtype, std::initializer_list<int64_t> shape) {
  core::Tensor t = cuda.empty(dtype, shape);
  cudaMemsetAsync(t.data(), 0x7f, t.nbytes(), cuda.stream());
  return t;
}

// The two backends of an op-vs-reference fixture and the moves between them.
// A fixture derives from it and calls create() in SetUp after DSV4_REQUIRE_CUDA().
class CudaAndCpuBackends {
 protected:
  void create(int cpu_threads) {
    cuda_ = ops::make_cuda_backend(0);
    cpu_ = ops::make_cpu_backend(cpu_threads);
  }
  ops::CudaBackend& cuda() { return static_cast<ops::CudaBackend&>(*cuda_); }
  ops::Backend& cpu() { return *cpu_; }
  core::Tensor dev(const core::Tensor& h) { return to_device(cuda(), h); }
  core::Tensor host(const core::Tensor& d) { return to_host(cuda(), d); }
  core::Tensor poisoned(core::DType t, std::initializer_list<int64_t> shape) {
    return device_poisoned(cuda(), t, shape);
  }
  ops::RopeTable dev_rope(const ops::RopeTable& r) { return ops::RopeTable{dev(r.inv_freq), r.rope_dim}; }

  std::unique_ptr<ops::Backend> cuda_, cpu_;
};

// Device copies of a batch's arrays and a view of them.
struct DeviceBatch {
  std::vector<core::Tensor> keep;
  ops::BatchView view;
};

inline DeviceBatch upload_batch(ops::Backend& cuda, const BatchArrays& b) {
  DeviceBatch d;
  auto up = [&](const std::vector<int32_t>& v) -> const int32_t* {
    core::Tensor h = core::Tensor::empty_cpu(core::DType::kI32, {std::max<int64_t>(int64_t(v.size()), 1)});
    if (!v.empty()) std::memcpy(h.data(), v.data(), v.size() * 4);
    d.keep.push_back(to_device(cuda, h));
    return d.keep.back().as<int32_t>();
  };
  d.view = b.view();
  d.view.token_ids = up(b.token_ids);
  d.view.positions = up(b.positions);
  d.view.token_seq = up(b.token_seq);
  d.view.seq_begin = up(b.seq_begin);
  d.view.seq_len = up(b.seq_len);
  d.view.seq_start_pos = up(b.seq_start);
  d.view.seq_slot = up(b.seq_slot);
  d.view.block_table = up(b.block_table);
  return d;
}

// A host RoPE table over the last 64 dims: plain (base 10000) or YaRN (V4's compressed-layer policy).
inline ops::RopeTable host_rope(bool yarn) {
  ops::RopeTable r{core::Tensor::empty_cpu(core::DType::kF32, {32}), 64};
  auto f = yarn ? ops::rope_inv_freq(64, 160000, true, 16, 65536, 32, 1)
                : ops::rope_inv_freq(64, 10000, false, 1, 65536, 32, 1);
  std::copy(f.begin(), f.end(), r.inv_freq.as<float>());
  return r;
}

}  // namespace dsv4::testing
