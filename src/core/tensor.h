// A tensor is a typed, shaped view of memory on one device, optionally keeping
// its storage alive. Model and op code pass tensors; shapes are checked at op
// boundaries (ops/contracts.h).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv4::core {

enum class Device : uint8_t { kCpu, kCuda };

inline constexpr int kMaxDims = 4;

class Tensor {
 public:
  Tensor() = default;
  Tensor(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = Device::kCpu,
         std::shared_ptr<void> owner = nullptr);
  Tensor(void* data, DType dtype, const int64_t* shape, int ndim, Device device = Device::kCpu,
         std::shared_ptr<void> owner = nullptr);

  // Owning, 64-byte aligned host allocation (contents uninitialised).
  static Tensor empty_cpu(DType dtype, std::initializer_list<int64_t> shape);
  static Tensor empty_cpu(DType dtype, const int64_t* shape, int ndim);
  static Tensor zeros_cpu(DType dtype, std::initializer_list<int64_t> shape);

  bool defined() const { return data_ != nullptr || numel() == 0; }
  void* data() const { return data_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int ndim() const { return ndim_; }
  int64_t size(int dim) const;
  const int64_t* shape() const { return dims_.data(); }
  int64_t numel() const;
  size_t nbytes() const;
  const std::shared_ptr<void>& owner() const { return owner_; }

  // Rows [begin, begin+count) along dim 0; shares storage.
  Tensor rows(int64_t begin, int64_t count) const;
  // Same storage, new shape with the same element count.
  Tensor reshape(std::initializer_list<int64_t> shape) const;

  std::string shape_string() const;  // "[4, 256]"

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCpu;
  int ndim_ = 0;
  std::array<int64_t, kMaxDims> dims_{};
  std::shared_ptr<void> owner_;
};

std::string shape_string(const int64_t* shape, int ndim);

}  // namespace dsv4::core
