// The CUDA backend's own contracts (not an op's arithmetic): scratch buffers and the
// graphs that hold their addresses; the clocks the benchmarks read beside them.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "core/gpu_clocks.h"
#include "cuda_test_util.h"
#include "ops/cuda/cuda_check.h"

namespace dsv4::ops {
namespace {

// A graph captured over a scratch buffer keeps using that buffer after a later, larger
// request for the same scratch gets a new one (a decode bucket's graph, then a longer
// prefill step): the old buffer must stay allocated and the graph's writes must land in
// it, not in freed memory or in the buffer that replaced it.
TEST(CudaScratch, ABufferAGraphHoldsOutlivesItsGrowth) {
  DSV4_REQUIRE_CUDA();
  CudaBackend cuda(0);
  constexpr size_t kSmall = 4096, kLarge = size_t(1) << 22;
  bool fresh = false;
  auto* small = static_cast<uint8_t*>(cuda.scratch("graph_held", kSmall, &fresh));
  EXPECT_TRUE(fresh);
  auto graph = cuda.capture([&] { DSV4_CUDA_CHECK(cudaMemsetAsync(small, 0x5a, kSmall, cuda.stream())); });
  EXPECT_EQ(cuda.scratch_bytes_kept_for_graphs(), 0u);

  auto* large = static_cast<uint8_t*>(cuda.scratch("graph_held", kLarge, &fresh));
  EXPECT_TRUE(fresh);
  ASSERT_NE(large, small);
  EXPECT_EQ(cuda.scratch_bytes_kept_for_graphs(), kSmall);
  cudaPointerAttributes attributes{};
  DSV4_CUDA_CHECK(cudaPointerGetAttributes(&attributes, small));
  EXPECT_EQ(attributes.type, cudaMemoryTypeDevice) << "the graph's buffer was freed when the scratch grew";

  // The replay writes the old buffer and leaves the new one alone.
  DSV4_CUDA_CHECK(cudaMemsetAsync(large, 0, kLarge, cuda.stream()));
  DSV4_CUDA_CHECK(cudaMemsetAsync(small, 0, kSmall, cuda.stream()));
  graph->replay();
  cuda.synchronize();
  std::vector<uint8_t> got_small(kSmall), got_large(kLarge);
  DSV4_CUDA_CHECK(cudaMemcpy(got_small.data(), small, kSmall, cudaMemcpyDeviceToHost));
  DSV4_CUDA_CHECK(cudaMemcpy(got_large.data(), large, kLarge, cudaMemcpyDeviceToHost));
  EXPECT_EQ(got_small, std::vector<uint8_t>(kSmall, 0x5a));
  EXPECT_EQ(got_large, std::vector<uint8_t>(kLarge, 0));

  // Growing again with no capture since the last growth frees the replaced buffer: no
  // graph can hold it.
  cuda.scratch("graph_held", 2 * kLarge);
  EXPECT_EQ(cuda.scratch_bytes_kept_for_graphs(), kSmall);
}

// `bench decode` reads the GPU's clocks through NVML by the device's PCI bus id, as
// cudaDeviceGetPCIBusId writes it: on a GPU machine the sampler finds the device and
// its samples carry plausible clocks (Hopper: SM 100-3000 MHz, memory above 1000 MHz).
TEST(GpuClocks, SamplerReadsTheDeviceByItsPciBusId) {
  DSV4_REQUIRE_CUDA();
  char bus_id[32] = {};
  DSV4_CUDA_CHECK(cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), 0));
  core::ClockSampler sampler(bus_id);
  ASSERT_TRUE(sampler.available()) << "device " << bus_id << ": " << sampler.why();
  sampler.start(5);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const std::vector<core::ClockSample> samples = sampler.stop();
  ASSERT_GE(samples.size(), 5u) << "100 ms at a 5 ms period; failed reads " << sampler.failed_reads();
  for (size_t i = 0; i < samples.size(); ++i) {
    EXPECT_GT(samples[i].sm_mhz, 100u) << "sample " << i;
    EXPECT_LT(samples[i].sm_mhz, 3000u) << "sample " << i;
    EXPECT_GT(samples[i].mem_mhz, 1000u) << "sample " << i;
    if (i > 0) {
      EXPECT_GE(samples[i].t_ms, samples[i - 1].t_ms) << "sample " << i;
    }
  }
  EXPECT_TRUE(sampler.stop().size() == samples.size()) << "a second stop returns the same samples";
}

}  // namespace
}  // namespace dsv4::ops
