// Index allocators for per-sequence state: state slots (window rings and
// compressor states, one per live sequence) and pages of compressed rows
// (ops::kPageTokens tokens each). The storage itself lives in the backend's
// LayerCache tensors; these only hand out indices, and can say when all are back.
#pragma once

#include <cstdint>
#include <vector>

namespace dsv4::engine {

class IndexPool {
 public:
  explicit IndexPool(int32_t capacity);
  int32_t capacity() const { return capacity_; }
  int32_t num_free() const { return int32_t(free_.size()); }
  int32_t num_used() const { return capacity_ - num_free(); }
  // Returns -1 when empty.
  int32_t allocate();
  // All or nothing: appends n indices to `out` and returns true, or returns false.
  bool allocate(int32_t n, std::vector<int32_t>* out);
  void release(int32_t index);
  void release(const std::vector<int32_t>& indices);

 private:
  int32_t capacity_;
  std::vector<int32_t> free_;
  std::vector<bool> used_;
};

// Pages needed to hold compressed rows for positions [0, num_positions).
int32_t pages_for_positions(int64_t num_positions);

}  // namespace dsv4::engine
