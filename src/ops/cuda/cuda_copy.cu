// Byte copies, the slot gather of the expert-parallel combine (the logits rows' argmax is in
// cuda_token_choice.cu).
// gather_slots: memory-bound, 2 x T*k*D*2 bytes; one CTA per (row, slot), 16-byte accesses.
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

}  // namespace

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
