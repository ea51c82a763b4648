#include "core/error.h"

namespace dsv4::core {

void check_failed(const char* condition, const char* file, int line, const std::string& message) {
  throw Error(fmt::format("internal check failed: {} at {}:{}: {}", condition, file, line, message));
}

}  // namespace dsv4::core
