#include "engine/kv_pool.h"

#include "core/error.h"
#include "ops/batch.h"

namespace dsv4::engine {

IndexPool::IndexPool(int32_t capacity) : capacity_(capacity), used_(size_t(capacity), false) {
  free_.reserve(size_t(capacity));
  for (int32_t i = capacity - 1; i >= 0; --i) free_.push_back(i);  // hand out low indices first
}

int32_t IndexPool::allocate() {
  if (free_.empty()) return -1;
  int32_t i = free_.back();
  free_.pop_back();
  used_[size_t(i)] = true;
  return i;
}

bool IndexPool::allocate(int32_t n, std::vector<int32_t>* out) {
  if (n > num_free()) return false;
  for (int32_t i = 0; i < n; ++i) out->push_back(allocate());
  return true;
}

void IndexPool::release(int32_t index) {
  DSV4_CHECK(index >= 0 && index < capacity_ && used_[size_t(index)], "releasing index {} that is not allocated",
             index);
  used_[size_t(index)] = false;
  free_.push_back(index);
}

void IndexPool::release(const std::vector<int32_t>& indices) {
  for (int32_t i : indices) release(i);
}

int32_t pages_for_positions(int64_t num_positions) {
  return int32_t((num_positions + ops::kPageTokens - 1) / ops::kPageTokens);
}

}  // namespace dsv4::engine
