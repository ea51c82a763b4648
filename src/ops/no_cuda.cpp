// Builds without the CUDA backend still link callers of make_cuda_backend; the
// error says why it is missing.
#include "core/error.h"
#include "ops/backend.h"

namespace dsv4::ops {

std::unique_ptr<Backend> make_cuda_backend(int device) {
  core::fail("this build of dsv4 has no CUDA backend (nvcc was not found at configure time); use --backend cpu");
}

}  // namespace dsv4::ops
