#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

namespace dsv4::core {

Tensor::Tensor(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device,
               std::shared_ptr<void> owner)
    : Tensor(data, dtype, shape.begin(), int(shape.size()), device, std::move(owner)) {}

Tensor::Tensor(void* data, DType dtype, const int64_t* shape, int ndim, Device device,
               std::shared_ptr<void> owner)
    : data_(data), dtype_(dtype), device_(device), ndim_(ndim), owner_(std::move(owner)) {
  DSV4_CHECK(ndim >= 0 && ndim <= kMaxDims, "tensor rank {} out of range", ndim);
  for (int i = 0; i < ndim; ++i) {
    DSV4_CHECK(shape[i] >= 0, "negative dimension {} in {}", shape[i], core::shape_string(shape, ndim));
    dims_[i] = shape[i];
  }
}

Tensor Tensor::empty_cpu(DType dtype, std::initializer_list<int64_t> shape) {
  return empty_cpu(dtype, shape.begin(), int(shape.size()));
}

Tensor Tensor::empty_cpu(DType dtype, const int64_t* shape, int ndim) {
  Tensor t(nullptr, dtype, shape, ndim, Device::kCpu);
  size_t bytes = (t.nbytes() + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
  if (p == nullptr) fail("out of host memory allocating {} bytes for a tensor of shape {}", bytes, t.shape_string());
  t.owner_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data_ = p;
  return t;
}

Tensor Tensor::zeros_cpu(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t = empty_cpu(dtype, shape);
  std::memset(t.data(), 0, t.nbytes());
  return t;
}

int64_t Tensor::size(int dim) const {
  if (dim < 0) dim += ndim_;
  DSV4_CHECK(dim >= 0 && dim < ndim_, "dim {} out of range for shape {}", dim, shape_string());
  return dims_[dim];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= dims_[i];
  return n;
}

size_t Tensor::nbytes() const {
  // Packed FP4 (kI8) tensors are stored with their packed shape, so one byte each.
  return size_t(numel()) * dtype_size(dtype_);
}

Tensor Tensor::rows(int64_t begin, int64_t count) const {
  DSV4_CHECK(ndim_ >= 1 && begin >= 0 && count >= 0 && begin + count <= dims_[0],
             "rows [{}, {}) out of range for shape {}", begin, begin + count, shape_string());
  int64_t row_elems = 1;
  for (int i = 1; i < ndim_; ++i) row_elems *= dims_[i];
  Tensor t = *this;
  t.dims_[0] = count;
  t.data_ = static_cast<char*>(data_) + size_t(begin * row_elems) * dtype_size(dtype_);
  return t;
}

Tensor Tensor::reshape(std::initializer_list<int64_t> shape) const {
  Tensor t(data_, dtype_, shape, device_, owner_);
  DSV4_CHECK(t.numel() == numel(), "cannot reshape {} to {}", shape_string(), t.shape_string());
  return t;
}

std::string Tensor::shape_string() const { return core::shape_string(dims_.data(), ndim_); }

std::string shape_string(const int64_t* shape, int ndim) {
  std::string s = "[";
  for (int i = 0; i < ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace dsv4::core
