#include "core/dtype.h"

#include "core/error.h"

namespace dsv4::core {

namespace {
struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};
constexpr DTypeInfo kInfos[] = {
    {DType::kBF16, "BF16", 2},   {DType::kF32, "F32", 4},         {DType::kI64, "I64", 8},
    {DType::kI32, "I32", 4},     {DType::kI8, "I8", 1},           {DType::kU8, "U8", 1},
    {DType::kF8E4M3, "F8_E4M3", 1}, {DType::kF8E8M0, "F8_E8M0", 1},
};
}  // namespace

size_t dtype_size(DType dtype) {
  for (const auto& info : kInfos)
    if (info.dtype == dtype) return info.size;
  DSV4_CHECK(false, "unknown dtype {}", int(dtype));
}

std::string_view dtype_name(DType dtype) {
  for (const auto& info : kInfos)
    if (info.dtype == dtype) return info.name;
  DSV4_CHECK(false, "unknown dtype {}", int(dtype));
}

bool dtype_from_name(std::string_view name, DType* out) {
  for (const auto& info : kInfos) {
    if (info.name == name) {
      *out = info.dtype;
      return true;
    }
  }
  return false;
}

}  // namespace dsv4::core
