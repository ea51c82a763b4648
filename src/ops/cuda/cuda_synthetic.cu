// GPU builders of synthetic weights (cuda_synthetic.h): the CPU generator's
// arithmetic (model/synthetic_weights.cpp) element for element. Mul and add are
// kept apart where the host keeps them apart (__fmul_rn / __fadd_rn: nvcc would
// otherwise contract them into an FMA); the remaining expressions of
// core/synthetic_values.h contract only where the product is exact. The device
// logf / cosf (random_normal) and exp2f (fp8_block_gain) may differ from the host
// libm by an ulp.
#include "ops/cuda/cuda_synthetic.h"

#include <algorithm>

#include "core/error.h"
#include "core/random.h"
#include "core/scalar_math.h"
#include "core/synthetic_values.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/fp4_device_layout.h"
#include "ops/cuda/fp8_bf16_layout.h"
#include "ops/cuda/grid_dependency.cuh"

namespace dsv4::ops::cuda_synthetic {

namespace {

using core::DType;
using core::Tensor;


// Roofline: writes 2 or 4 B per element, ~100 integer/SFU instructions each (compute-bound, ~0.1 ns/element).
__global__ void fill_normal_kernel(void* out, int64_t n, int f32, uint64_t seed, uint64_t stream, float mean,
                                   float std) {
  wait_for_predecessor();
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const float v = __fadd_rn(mean, __fmul_rn(std, core::random_normal(seed, stream, uint64_t(i))));
    if (f32) static_cast<float*>(out)[i] = v;
    else static_cast<uint16_t*>(out)[i] = core::float_to_bf16(v);
  }
}

// One CTA per 128x128 block: the block's amax, its UE8M0 exponent, then the e4m3 codes
// (values recomputed rather than staged: they are pure functions of the index), in
// checkpoint order or, for grouped_linear's weights (grouped), in fp8_bf16_layout.h's.
__global__ void __launch_bounds__(256) fill_fp8_kernel(uint8_t* weight, uint8_t* scale, int64_t N, int64_t K,
                                                       uint64_t seed, uint64_t stream, float std, int grouped) {
  wait_for_predecessor();
  const int64_t kb = (K + 127) / 128;
  const int64_t n0 = int64_t(blockIdx.y) * 128, k0 = int64_t(blockIdx.x) * 128;
  const int64_t rows = min(int64_t(128), N - n0), cols = min(int64_t(128), K - k0);
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x)
    amax = fmaxf(amax, fabsf(core::fp8_weight_value(seed, stream, std, K, n0 + i / cols, k0 + i % cols)));
  __shared__ float s_max[8];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) s_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = 0.0f;
  for (int w = 0; w < int(blockDim.x >> 5); ++w) amax = fmaxf(amax, s_max[w]);
  const int e = core::weight_scale_exponent(amax, 1.0f / 448.0f, 1e-4f);
  const float inv = core::pow2_float(-e);
  for (int64_t i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    const float v = core::fp8_weight_value(seed, stream, std, K, n0 + r, k0 + c);
    const int64_t at = grouped ? fp8_bf16_layout::element_offset(n0 + r, k0 + c, N, K) : (n0 + r) * K + k0 + c;
    weight[at] = core::float_to_e4m3(core::clamp_f32(v * inv, -448.0f, 448.0f));
  }
  if (threadIdx.x == 0) scale[int64_t(blockIdx.y) * kb + blockIdx.x] = core::e8m0_from_exponent(e);
}

// One warp per (row, group of 32): lane i draws element 32g + i; even lanes write
// the byte of the pair (low nibble = even k, spec §2.8) and lane 0 the scale where
// the CUDA backend stores them (ops/cuda/fp4_device_layout.h).
__global__ void fill_fp4_kernel(uint8_t* weight, uint8_t* scale, int64_t N, int64_t K, uint64_t seed, uint64_t stream,
                                float std) {
  wait_for_predecessor();
  const int64_t groups = K / 32;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; w < N * groups; w += nwarps) {
    const int64_t n = w / groups, g = w % groups;
    const float v = core::fp4_weight_value(seed, stream, std, K, n, g * 32 + lane);
    float amax = fabsf(v);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const int e = core::weight_scale_exponent(amax, 1.0f / 6.0f, 6.0f * 1.1754943508222875e-38f);
    const uint32_t code = core::float_to_e2m1(core::clamp_f32(v * core::pow2_float(-e), -6.0f, 6.0f));
    const uint32_t hi = __shfl_down_sync(0xffffffffu, code, 1);
    const int64_t kk = g * 32 + lane;
    if ((lane & 1) == 0)
      weight[fp4_layout::element_offset(n, kk, N, K / fp4_layout::kBlockElements)] =
          fp4_layout::spread_byte(uint8_t(code | (hi << 4)));
    if (lane == 0)  // (scale byte g % 4 of stage g / 4, where the CUDA backend stores it)
      scale[fp4_layout::scale_offset(n, g / 4, N, K / fp4_layout::kBlockElements) + g % 4] =
          core::e8m0_from_exponent(e);
  }
}

__global__ void fill_expert_ids_kernel(int64_t* out, int64_t rows, int64_t k, uint64_t seed, uint64_t stream,
                                       int64_t num_experts) {
  wait_for_predecessor();
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < rows; t += step)
    core::expert_ids_row(seed, stream, t, num_experts, k, out + t * k);
}

unsigned grid_for(int64_t threads) { return unsigned(std::clamp<int64_t>((threads + 255) / 256, 1, 65536)); }

void check_device(const Tensor& t, const char* what) {
  DSV4_CHECK(t.device() == core::Device::kCuda && (t.numel() == 0 || t.data() != nullptr),
             "cuda_synthetic: {} must be a device tensor", what);
}

}  // namespace

void fill_normal(CudaBackend& be, const Tensor& out, uint64_t seed, uint64_t stream_id, float mean, float std) {
  check_device(out, "fill_normal output");
  DSV4_CHECK(out.dtype() == DType::kBF16 || out.dtype() == DType::kF32, "fill_normal: dtype {} is not bf16 or f32",
             core::dtype_name(out.dtype()));
  const int64_t n = out.numel();
  if (n == 0) return;
  fill_normal_kernel<<<grid_for(n), 256, 0, be.stream()>>>(out.data(), n, out.dtype() == DType::kF32 ? 1 : 0, seed,
                                                            stream_id, mean, std);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

void fill_fp8_weight(CudaBackend& be, const Tensor& weight, const Tensor& scale, int64_t n, int64_t k, uint64_t seed,
                     uint64_t stream_id, float std, TensorRole role) {
  DSV4_CHECK(role == TensorRole::kPlain || role == TensorRole::kGroupedFp8Weight,
             "fill_fp8_weight: an FP8 weight is plain or grouped_linear's, not role {}", int(role));
  check_device(weight, "FP8 weight");
  check_device(scale, "FP8 scale");
  DSV4_CHECK(weight.nbytes() == size_t(n * k) && scale.nbytes() == size_t(((n + 127) / 128) * ((k + 127) / 128)),
             "fill_fp8_weight: weight {} / scale {} do not hold an FP8 [{}, {}] matrix", weight.shape_string(),
             scale.shape_string(), n, k);
  if (n == 0 || k == 0) return;
  const dim3 grid(unsigned((k + 127) / 128), unsigned((n + 127) / 128));
  DSV4_CHECK(grid.y <= 65535, "fill_fp8_weight: {} rows", n);
  fill_fp8_kernel<<<grid, 256, 0, be.stream()>>>(weight.as<uint8_t>(), scale.as<uint8_t>(), n, k, seed, stream_id,
                                                 std, role == TensorRole::kGroupedFp8Weight ? 1 : 0);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

void fill_fp4_weight(CudaBackend& be, const Tensor& weight, const Tensor& scale, int64_t n, int64_t k, uint64_t seed,
                     uint64_t stream_id, float std) {
  check_device(weight, "FP4 weight");
  check_device(scale, "FP4 scale");
  DSV4_CHECK(k % fp4_layout::kBlockElements == 0,
             "fill_fp4_weight: K={} is not a multiple of {} (the CUDA backend's FP4 rows are whole 64-byte blocks)", k,
             fp4_layout::kBlockElements);
  DSV4_CHECK(weight.nbytes() == size_t(n * k / 2) && scale.nbytes() == size_t(n * k / 32),
             "fill_fp4_weight: weight {} / scale {} do not hold an FP4 [{}, {}] matrix", weight.shape_string(),
             scale.shape_string(), n, k);
  if (n == 0 || k == 0) return;
  fill_fp4_kernel<<<grid_for(n * (k / 32) * 32), 256, 0, be.stream()>>>(weight.as<uint8_t>(), scale.as<uint8_t>(), n,
                                                                         k, seed, stream_id, std);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

void fill_expert_ids(CudaBackend& be, const Tensor& out, uint64_t seed, uint64_t stream_id, int64_t num_experts) {
  check_device(out, "expert ids");
  DSV4_CHECK(out.dtype() == DType::kI64 && out.ndim() == 2, "fill_expert_ids: expected i64 [V, k], got {} {}",
             core::dtype_name(out.dtype()), out.shape_string());
  const int64_t rows = out.size(0), k = out.size(1);
  DSV4_CHECK(k <= num_experts, "fill_expert_ids: {} ids per row from {} experts", k, num_experts);
  if (rows == 0 || k == 0) return;
  fill_expert_ids_kernel<<<grid_for(rows), 256, 0, be.stream()>>>(out.as<int64_t>(), rows, k, seed, stream_id,
                                                                   num_experts);
  DSV4_CUDA_CHECK(cudaGetLastError());
}

}  // namespace dsv4::ops::cuda_synthetic
