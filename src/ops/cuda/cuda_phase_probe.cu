// The dependent-phase probe (phase_probe.h): grid barriers in a persistent
// cooperative kernel against one kernel a phase in a captured graph.
// Every variant runs one CTA an SM, and each CTA reads the same contiguous share
// of each phase, so the variants differ only in how phases follow each other.
#include "ops/cuda/phase_probe.h"

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "core/random.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/grid_dependency.cuh"

namespace dsv4::ops {

namespace {

constexpr int kProbeThreads = 512;
constexpr int kUnroll = 8;  // 16-byte loads in flight a thread: 64 KB a CTA

__global__ void fill_kernel(uint64_t* __restrict__ out, int64_t words, uint64_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < words; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = core::mix64(seed + uint64_t(i));
}

// A grid-wide barrier for a cooperative launch (every CTA resident): arrive on a
// counter; the last CTA to arrive resets it and advances the generation the others
// wait on. The generation is read before arriving, so a waiter cannot miss its bump.
struct GridBarrier {
  unsigned int count;
  unsigned int generation;
};

__device__ __forceinline__ unsigned int load_acquire(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void grid_barrier(GridBarrier* b) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned int gen = load_acquire(&b->generation);
    __threadfence();  // this CTA's writes before its arrival
    if (atomicAdd(&b->count, 1u) == gridDim.x - 1) {
      atomicExch(&b->count, 0u);
      __threadfence();
      atomicAdd(&b->generation, 1u);
    } else {
      while (load_acquire(&b->generation) == gen) {
      }
    }
  }
  __syncthreads();
}

// This CTA's share [b, e) of a phase of `vecs` 16-byte vectors.
__device__ __forceinline__ void cta_share(int64_t vecs, int64_t* b, int64_t* e) {
  const int64_t per = (vecs + gridDim.x - 1) / gridDim.x;
  *b = min(vecs, int64_t(blockIdx.x) * per);
  *e = min(vecs, *b + per);
}

// The sum of the 32-bit words of src[b, e) this thread reads (kUnroll loads in flight).
__device__ __forceinline__ uint64_t stream_share(const uint4* __restrict__ src, int64_t b, int64_t e) {
  uint64_t acc = 0;
  const int64_t stride = blockDim.x;
  int64_t i = b + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < e; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc += uint64_t(v[u].x) + v[u].y + v[u].z + v[u].w;
  }
  for (; i < e; i += stride) {
    const uint4 v = __ldg(src + i);
    acc += uint64_t(v.x) + v.y + v.z + v.w;
  }
  return acc;
}

// Asks the L2 to fetch src[b, e) (32 KB bulk prefetches, spread over the threads).
__device__ __forceinline__ void prefetch_share_l2(const uint4* src, int64_t b, int64_t e) {
  const char* base = reinterpret_cast<const char*>(src + b);
  const int64_t bytes = (e - b) * 16;
  constexpr int64_t kPiece = 32768;
  for (int64_t off = int64_t(threadIdx.x) * kPiece; off < bytes; off += int64_t(blockDim.x) * kPiece) {
    const uint32_t n = uint32_t(min(kPiece, bytes - off));  // a multiple of 16
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(base + off), "r"(n) : "memory");
  }
}

__device__ __forceinline__ void add_block_sum(uint64_t acc, unsigned long long* out) {
  __shared__ uint64_t warp_sums[kProbeThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint64_t s = 0;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) s += warp_sums[w];
    atomicAdd(out, static_cast<unsigned long long>(s));
  }
}

__global__ void __launch_bounds__(kProbeThreads) barrier_loop_kernel(GridBarrier* bar, int iters) {
  for (int i = 0; i < iters; ++i) grid_barrier(bar);
}

// Every phase in one cooperative kernel, a grid barrier after each (prefetch: the
// next phase's share asked of the L2 before arriving, as weights could be).
__global__ void __launch_bounds__(kProbeThreads)
    persistent_phases_kernel(const uint4* __restrict__ data, int64_t vecs, int phases, int prefetch,
                             GridBarrier* bar, unsigned long long* sum) {
  int64_t b = 0, e = 0;
  cta_share(vecs, &b, &e);
  uint64_t acc = 0;
  for (int ph = 0; ph < phases; ++ph) {
    acc += stream_share(data + int64_t(ph) * vecs, b, e);
    if (prefetch && ph + 1 < phases) prefetch_share_l2(data + int64_t(ph + 1) * vecs, b, e);
    grid_barrier(bar);
  }
  add_block_sum(acc, sum);
}

// One phase as its own kernel, as the decode step's kernels run: it waits for its
// predecessor (dependent launch) before reading, and lets its successor launch once
// its reads are done (prefetch: its share asked of the L2 before the wait).
__global__ void __launch_bounds__(kProbeThreads)
    phase_kernel(const uint4* __restrict__ src, int64_t vecs, int prefetch, unsigned long long* sum) {
  int64_t b = 0, e = 0;
  cta_share(vecs, &b, &e);
  if (prefetch) prefetch_share_l2(src, b, e);
  wait_for_predecessor();
  const uint64_t acc = stream_share(src, b, e);
  allow_dependents_to_launch();
  add_block_sum(acc, sum);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

uint64_t phase_probe_expected_checksum(int64_t bytes, uint64_t seed) {
  uint64_t s = 0;
  for (int64_t i = 0; i < bytes / 8; ++i) {
    const uint64_t w = core::mix64(seed + uint64_t(i));
    s += (w & 0xffffffffu) + (w >> 32);
  }
  return s;
}

PhaseProbeResult run_phase_probe(CudaBackend& be, const PhaseProbeOptions& o) {
  DSV4_CHECK(o.phase_bytes >= 16 && o.phase_bytes % 16 == 0,
             "phase probe: --phase-bytes {} must be a positive multiple of 16", o.phase_bytes);
  DSV4_CHECK(o.phases >= 1 && o.phases <= 10000, "phase probe: --phases {} must be in 1..10000", o.phases);
  DSV4_CHECK(o.barriers >= 1 && o.barriers <= 10000000, "phase probe: --barriers {} must be in 1..10^7",
             o.barriers);
  DSV4_CHECK(o.repeats >= 1 && o.repeats <= 1000, "phase probe: --repeats {} must be in 1..1000", o.repeats);
  const int64_t total = o.phase_bytes * o.phases;
  DSV4_CHECK(total <= (int64_t(16) << 30), "phase probe: {} phases x {} bytes exceed 16 GiB", o.phases,
             o.phase_bytes);
  const cudaStream_t s = be.stream();
  const int sms = be.properties().multiProcessorCount;
  DSV4_CHECK(be.properties().cooperativeLaunch, "phase probe: device {} has no cooperative launch",
             be.device_index());
  int per_sm = 0;
  DSV4_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_phases_kernel, kProbeThreads, 0));
  DSV4_CHECK(per_sm >= 1, "phase probe: the persistent kernel does not fit one CTA of {} threads an SM",
             kProbeThreads);

  PhaseProbeResult r;
  r.ctas = sms;
  r.threads = kProbeThreads;
  r.expected_checksum = phase_probe_expected_checksum(total, o.seed);

  core::Tensor data = be.empty_bytes(size_t(total));
  core::Tensor state = be.empty_bytes(64);  // {GridBarrier, checksum}
  auto* bar = static_cast<GridBarrier*>(state.data());
  auto* sum = reinterpret_cast<unsigned long long*>(static_cast<char*>(state.data()) + 32);
  fill_kernel<<<sms * 8, 256, 0, s>>>(static_cast<uint64_t*>(data.data()), total / 8, o.seed);
  DSV4_CUDA_CHECK(cudaGetLastError());
  const auto* vecs_ptr = static_cast<const uint4*>(data.data());
  const int64_t vecs = o.phase_bytes / 16;

  cudaEvent_t t0 = nullptr, t1 = nullptr;
  DSV4_CUDA_CHECK(cudaEventCreate(&t0));
  DSV4_CUDA_CHECK(cudaEventCreate(&t1));
  // Median ms of `run` over o.repeats timed runs after one untimed one; the state
  // (barrier, checksum) is zeroed before each run, outside the timing.
  auto time_runs = [&](auto&& run) {
    std::vector<double> ms;
    for (int i = 0; i <= o.repeats; ++i) {
      DSV4_CUDA_CHECK(cudaMemsetAsync(state.data(), 0, 64, s));
      DSV4_CUDA_CHECK(cudaEventRecord(t0, s));
      run();
      DSV4_CUDA_CHECK(cudaEventRecord(t1, s));
      DSV4_CUDA_CHECK(cudaEventSynchronize(t1));
      float e = 0;
      DSV4_CUDA_CHECK(cudaEventElapsedTime(&e, t0, t1));
      if (i > 0) ms.push_back(double(e));
    }
    PhaseRun out;
    out.ms = median(ms);
    DSV4_CUDA_CHECK(cudaMemcpy(&out.checksum, sum, sizeof out.checksum, cudaMemcpyDeviceToHost));
    return out;
  };
  auto cooperative = [&](auto kernel, void** args) {
    DSV4_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(sms),
                                                dim3(kProbeThreads), args, 0, s));
  };

  // Barrier cost: a kernel of nothing but barriers.
  {
    int iters = o.barriers;
    void* args[] = {&bar, &iters};
    r.barrier_us = time_runs([&] { cooperative(barrier_loop_kernel, args); }).ms * 1e3 / o.barriers;
  }
  // Streaming alone: every phase's bytes as one phase.
  {
    const int64_t all = total / 16;
    int no = 0;
    r.single = time_runs([&] {
      phase_kernel<<<sms, kProbeThreads, 0, s>>>(vecs_ptr, all, no, sum);
      DSV4_CUDA_CHECK(cudaGetLastError());
    });
  }
  for (int prefetch : {0, 1}) {
    int64_t v = vecs;
    int phases = o.phases, pf = prefetch;
    void* args[] = {&vecs_ptr, &v, &phases, &pf, &bar, &sum};
    (prefetch ? r.persistent_prefetch : r.persistent) =
        time_runs([&] { cooperative(persistent_phases_kernel, args); });
  }
  for (int prefetch : {0, 1}) {
    std::unique_ptr<Graph> graph = be.capture([&] {
      for (int ph = 0; ph < o.phases; ++ph) {
        phase_kernel<<<sms, kProbeThreads, 0, s>>>(vecs_ptr + int64_t(ph) * vecs, vecs, prefetch, sum);
        DSV4_CUDA_CHECK(cudaGetLastError());
      }
    });
    (prefetch ? r.graph_prefetch : r.graph) = time_runs([&] { graph->replay(); });
  }
  DSV4_CUDA_CHECK(cudaEventDestroy(t0));
  DSV4_CUDA_CHECK(cudaEventDestroy(t1));
  DSV4_CUDA_CHECK(cudaStreamSynchronize(s));
  return r;
}

}  // namespace dsv4::ops
