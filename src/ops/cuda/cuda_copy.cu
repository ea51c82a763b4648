// Byte copies, the slot gather of the expert-parallel combine, the logits rows' argmax.
// gather_slots: memory-bound, 2 x T*k*D*2 bytes; one CTA per (row, slot), 16-byte accesses.
// argmax_rows: memory-bound, R*V*4 bytes (256 rows of a 129,280-token vocabulary: 132 MB,
// ~33 µs at the copy rate, against ~5-13 ms to copy them to the host); one CTA a row.
#include <cuda_profiler_api.h>

#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/grid_dependency.cuh"

namespace dsv4::ops {

namespace {

__global__ void gather_slots_kernel(const uint4* __restrict__ src, const int32_t* __restrict__ index,
                                    uint4* __restrict__ dst, int64_t k, int64_t vecs_per_row) {
  wait_then_release_dependents();
  const int64_t ts = blockIdx.x;  // (row t, slot s) = ts
  const int64_t s = ts % k;
  const int32_t r = index[ts];
  uint4* out = dst + ts * vecs_per_row;
  if (r < 0) {
    for (int64_t i = threadIdx.x; i < vecs_per_row; i += blockDim.x) out[i] = make_uint4(0, 0, 0, 0);
    return;
  }
  const uint4* in = src + (int64_t(r) * k + s) * vecs_per_row;
  for (int64_t i = threadIdx.x; i < vecs_per_row; i += blockDim.x) out[i] = in[i];
}

// A candidate of the argmax: the larger value wins, the lower index among equal values;
// NaNs never compare larger, and "none yet" is (-inf, INT32_MAX), which any non-NaN takes.
struct ArgmaxCandidate {
  float value;
  int32_t index;
};

__device__ __forceinline__ void take_if_better(ArgmaxCandidate& a, float v, int32_t i) {
  if (v > a.value || (v == a.value && i < a.index)) a = ArgmaxCandidate{v, i};
}

constexpr int kArgmaxThreads = 512;

__global__ void __launch_bounds__(kArgmaxThreads) argmax_rows_kernel(const float* __restrict__ logits, int64_t V,
                                                                      bool vec4, int32_t* __restrict__ ids) {
  wait_then_release_dependents();
  const float* row = logits + int64_t(blockIdx.x) * V;
  ArgmaxCandidate best{-INFINITY, INT32_MAX};
  if (vec4) {  // each thread's columns in ascending order, 16 bytes a load
    const float4* row4 = reinterpret_cast<const float4*>(row);
    for (int64_t c = threadIdx.x; c < V / 4; c += kArgmaxThreads) {
      const float4 v = row4[c];
      const int32_t i = int32_t(4 * c);
      take_if_better(best, v.x, i);
      take_if_better(best, v.y, i + 1);
      take_if_better(best, v.z, i + 2);
      take_if_better(best, v.w, i + 3);
    }
  } else {
    for (int64_t c = threadIdx.x; c < V; c += kArgmaxThreads) take_if_better(best, row[c], int32_t(c));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best.value, off);
    const int32_t i = __shfl_xor_sync(0xffffffffu, best.index, off);
    take_if_better(best, v, i);
  }
  __shared__ ArgmaxCandidate warp_best[kArgmaxThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp != 0) return;
  best = lane < kArgmaxThreads / 32 ? warp_best[lane] : ArgmaxCandidate{-INFINITY, INT32_MAX};
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best.value, off);
    const int32_t i = __shfl_xor_sync(0xffffffffu, best.index, off);
    take_if_better(best, v, i);
  }
  // The reference scan starts at column 0: a NaN there is never left; a row of NaNs gives 0.
  if (lane == 0) ids[blockIdx.x] = isnan(row[0]) || best.index == INT32_MAX ? 0 : best.index;
}

}  // namespace

void CudaBackend::do_argmax_rows(const core::Tensor& logits, const core::Tensor& ids) {
  const int64_t R = logits.size(0), V = logits.size(1);
  if (R == 0) return;
  DSV4_CHECK(V < INT32_MAX, "argmax_rows: {} columns do not fit an i32 index", V);
  const bool vec4 = V % 4 == 0 && reinterpret_cast<uintptr_t>(logits.data()) % 16 == 0;
  argmax_rows_kernel<<<unsigned(R), kArgmaxThreads, 0, stream_>>>(logits.as<float>(), V, vec4, ids.as<int32_t>());
  check_launch(stream_);
}

void CudaBackend::bind_to_current_thread() { DSV4_CUDA_CHECK(cudaSetDevice(device_)); }

void CudaBackend::profiler_collect(bool on) {
  DSV4_CUDA_CHECK(cudaStreamSynchronize(stream()));
  DSV4_CUDA_CHECK(on ? cudaProfilerStart() : cudaProfilerStop());
}

void CudaBackend::do_copy(const core::Tensor& dst, const core::Tensor& src) {
  if (src.nbytes())
    DSV4_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(), cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::do_gather_slots(const core::Tensor& src, const core::Tensor& index, const core::Tensor& dst) {
  const int64_t T = dst.size(0), k = dst.size(1), D = dst.size(2);
  DSV4_CHECK(D % 8 == 0, "gather_slots: D={} must be a multiple of 8", D);
  if (T == 0 || k == 0) return;
  gather_slots_kernel<<<unsigned(T * k), 128, 0, stream_>>>(src.as<uint4>(), index.as<int32_t>(), dst.as<uint4>(), k,
                                                             D / 8);
  check_launch(stream_);
}

}  // namespace dsv4::ops

// ---- timers and random cache content (benchmarks) -----------------------------
#include "core/random.h"
#include "ops/kv_format.h"

namespace dsv4::ops {

namespace {

class EventTimer final : public Timer {
 public:
  explicit EventTimer(cudaStream_t stream) : stream_(stream) {
    DSV4_CUDA_CHECK(cudaEventCreate(&start_));
    DSV4_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~EventTimer() override {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  void start() override { DSV4_CUDA_CHECK(cudaEventRecord(start_, stream_)); }
  void stop() override { DSV4_CUDA_CHECK(cudaEventRecord(stop_, stream_)); }
  double elapsed_ms() override {
    DSV4_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    DSV4_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    return ms;
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// KV records: random e4m3 codes (never the NaN codes), N(0,1) bf16 rope values,
// UE8M0 scales between 2^-8 and 1.
__global__ void random_kv_rows_kernel(uint8_t* rows, int64_t num_rows, int64_t row_bytes, int64_t nope,
                                      int64_t rope, uint64_t seed) {
  wait_for_predecessor();
  const int64_t r = blockIdx.x * int64_t(blockDim.y) + threadIdx.y;
  if (r >= num_rows) return;
  uint8_t* row = rows + r * row_bytes;
  for (int64_t i = threadIdx.x; i < nope; i += blockDim.x) {
    uint8_t code = uint8_t(core::random_bits(seed, 1, uint64_t(r * nope + i)));
    if ((code & 0x7f) == 0x7f) code ^= 1;
    row[i] = code;
  }
  uint16_t* rope_values = reinterpret_cast<uint16_t*>(row + nope);
  for (int64_t i = threadIdx.x; i < rope; i += blockDim.x)
    rope_values[i] = core::float_to_bf16(core::random_normal(seed, 2, uint64_t(r * rope + i)));
  for (int64_t i = threadIdx.x; i < nope / 64; i += blockDim.x)
    row[nope + 2 * rope + i] = uint8_t(119 + core::random_bits(seed, 3, uint64_t(r * 64 + i)) % 9);
}

// Indexer records: random e2m1 nibbles, UE8M0 scales between 2^-4 and 1.
__global__ void random_index_rows_kernel(uint8_t* rows, int64_t num_rows, int64_t row_bytes, int64_t di,
                                         uint64_t seed) {
  wait_for_predecessor();
  const int64_t r = blockIdx.x * int64_t(blockDim.y) + threadIdx.y;
  if (r >= num_rows) return;
  uint8_t* row = rows + r * row_bytes;
  for (int64_t i = threadIdx.x; i < di / 2; i += blockDim.x)
    row[i] = uint8_t(core::random_bits(seed, 4, uint64_t(r * di + i)));
  for (int64_t i = threadIdx.x; i < di / 32; i += blockDim.x)
    row[di / 2 + i] = uint8_t(123 + core::random_bits(seed, 5, uint64_t(r * 8 + i)) % 5);
}

__global__ void random_f32_kernel(float* out, int64_t n, uint64_t seed, uint64_t stream) {
  wait_for_predecessor();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = core::random_normal(seed, stream, uint64_t(i));
}

}  // namespace

std::unique_ptr<Timer> CudaBackend::make_timer() { return std::make_unique<EventTimer>(stream_); }

void CudaBackend::randomize_cache(LayerCache& cache, uint64_t seed) {
  constexpr int64_t kRope = 64;
  auto kv_rows = [&](const core::Tensor& t, uint64_t salt) {
    if (t.ndim() == 0 || t.numel() == 0) return;
    const int64_t row_bytes = t.size(-1), num_rows = t.numel() / row_bytes;
    int64_t head_dim = 0;
    for (int64_t d = 64; d <= 4096; d += 64)
      if (kv_row_bytes(d, kRope) == row_bytes) head_dim = d;
    DSV4_CHECK(head_dim > 0, "randomize_cache: {}-byte KV rows match no head_dim", row_bytes);
    const dim3 block(32, 8);
    random_kv_rows_kernel<<<unsigned((num_rows + 7) / 8), block, 0, stream_>>>(
        t.as<uint8_t>(), num_rows, row_bytes, head_dim - kRope, kRope, seed ^ salt);
    check_launch(stream_);
  };
  kv_rows(cache.window, 11);
  kv_rows(cache.rows, 12);
  if (cache.index_rows.ndim() > 0 && cache.index_rows.numel() > 0) {
    const int64_t row_bytes = cache.index_rows.size(-1), num_rows = cache.index_rows.numel() / row_bytes;
    const int64_t di = row_bytes * 32 / 17;  // row_bytes = di/2 + di/32
    const dim3 block(32, 8);
    random_index_rows_kernel<<<unsigned((num_rows + 7) / 8), block, 0, stream_>>>(
        cache.index_rows.as<uint8_t>(), num_rows, row_bytes, di, seed ^ 13);
    check_launch(stream_);
  }
  uint64_t stream = 20;
  for (core::Tensor* t : {&cache.kv_state, &cache.score_state, &cache.index_kv_state, &cache.index_score_state}) {
    ++stream;
    if (t->ndim() == 0 || t->numel() == 0) continue;
    random_f32_kernel<<<1024, 256, 0, stream_>>>(t->as<float>(), t->numel(), seed, stream);
    check_launch(stream_);
  }
}

}  // namespace dsv4::ops
