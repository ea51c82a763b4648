// Errors: one exception type for every boundary (config, checkpoint, CLI, HTTP,
// NCCL) and one check macro for internal invariants.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace dsv4::core {

// Thrown for anything a user or an operator can act on: bad input, bad files,
// a peer rank that died. The message says what is wrong and where.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

[[noreturn]] void check_failed(const char* condition, const char* file, int line,
                               const std::string& message);

}  // namespace dsv4::core

// Internal invariant. Prints the condition, file:line and a formatted message.
#define DSV4_CHECK(cond, ...)                                                        \
  do {                                                                               \
    if (!(cond)) [[unlikely]] {                                                      \
      ::dsv4::core::check_failed(#cond, __FILE__, __LINE__, ::fmt::format(__VA_ARGS__)); \
    }                                                                                \
  } while (0)
