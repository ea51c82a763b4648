#include <cctype>

#include "core/error.h"
#include "tools/commands.h"
#if DSV4_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#endif

namespace dsv4::tools {

std::unique_ptr<ops::Backend> make_backend(const std::string& name, int threads) {
  if (name == "cpu") return ops::make_cpu_backend(threads);
  if (name == "cuda") return ops::make_cuda_backend(0);
  core::fail("--backend must be cpu or cuda, not \"{}\"", name);
}

std::string default_backend_name() {
#if DSV4_HAVE_CUDA
  if (ops::cuda_device_available()) return "cuda";
#endif
  return "cpu";
}

uint64_t parse_size(const std::string& text, const char* option) {
  if (text == "auto") return 0;
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (...) {
    core::fail("{}: \"{}\" is not a size (examples: 4096, 64M, 5G, auto)", option, text);
  }
  std::string unit = text.substr(used);
  double mult = 1;
  if (unit == "K" || unit == "KiB") mult = 1024.0;
  else if (unit == "M" || unit == "MiB") mult = 1024.0 * 1024;
  else if (unit == "G" || unit == "GiB") mult = 1024.0 * 1024 * 1024;
  else if (!unit.empty()) core::fail("{}: unknown unit \"{}\" in \"{}\" (use K, M or G)", option, unit, text);
  if (v <= 0) core::fail("{}: size must be positive, got \"{}\"", option, text);
  return uint64_t(v * mult);
}

}  // namespace dsv4::tools
