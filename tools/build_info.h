// What this binary is: version, the commit it was built from and whether the tree had
// changes, build type, CUDA backend in or out. Written at build time (cmake/build_info.cmake);
// `dsv4 --version` prints it and the benchmarks record it with their results.
#pragma once

#include <string>

namespace dsv4::tools {

struct BuildInfo {
  const char* version;
  const char* commit;  // 12 hex digits, $DSV4_COMMIT where the tree had no git, or "unknown"
  bool dirty;          // tracked files differed from the commit
  const char* build_type;
  bool cuda;
};

BuildInfo build_info();

// "dsv4 0.1.0 (commit 0ebe151a2b3c, with local changes; Release; CUDA backend)".
std::string build_info_text();

}  // namespace dsv4::tools
