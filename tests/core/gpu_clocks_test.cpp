// The clock sampler's summary and reason names (no GPU needed), and a sampler that finds no
// device: it says why and samples nothing, on hosts with and without the NVIDIA driver.
#include "core/gpu_clocks.h"

#include <gtest/gtest.h>

namespace dsv4::core {
namespace {

TEST(GpuClocks, ReasonNamesFollowNvmlsBits) {
  EXPECT_TRUE(clock_reason_names(0).empty());
  EXPECT_EQ(clock_reason_names(0x4), std::vector<std::string>{"sw_power_cap"});
  EXPECT_EQ(clock_reason_names(0x1 | 0x8 | 0x20 | 0x40 | 0x80),
            (std::vector<std::string>{"gpu_idle", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                                      "hw_power_brake_slowdown"}));
  EXPECT_EQ(clock_reason_names(uint64_t(1) << 40), std::vector<std::string>{"bit_40"});
}

TEST(GpuClocks, SummaryGivesRangesAndEachReasonsShare) {
  std::vector<ClockSample> samples;
  const uint32_t sm[] = {1980, 1755, 1980, 1830, 1980};
  for (int i = 0; i < 5; ++i) {
    ClockSample s;
    s.t_ms = 5.0 * i;
    s.sm_mhz = sm[i];
    s.mem_mhz = 3201;
    s.power_mw = 500000 + 10000 * uint32_t(i);
    s.temp_c = 40 + uint32_t(i);
    s.reasons = sm[i] < 1980 ? 0x4 : 0;  // power capped where the clock is low
    if (i == 4) s.reasons |= 0x20;
    samples.push_back(s);
  }
  const ClockSummary got = summarize_clock_samples(samples);
  EXPECT_EQ(got.samples, 5u);
  EXPECT_EQ(got.sm_mhz.min, 1755);
  EXPECT_EQ(got.sm_mhz.median, 1980);
  EXPECT_EQ(got.sm_mhz.max, 1980);
  EXPECT_EQ(got.mem_mhz.min, 3201);
  EXPECT_DOUBLE_EQ(got.power_w.median, 520.0);
  EXPECT_DOUBLE_EQ(got.power_w.max, 540.0);
  EXPECT_EQ(got.temp_c.max, 44);
  ASSERT_EQ(got.reasons.size(), 2u);
  EXPECT_EQ(got.reasons[0].first, "sw_power_cap");
  EXPECT_DOUBLE_EQ(got.reasons[0].second, 0.4);
  EXPECT_EQ(got.reasons[1].first, "sw_thermal_slowdown");
  EXPECT_DOUBLE_EQ(got.reasons[1].second, 0.2);

  samples.resize(4);  // an even count: the median is the middle pair's mean
  EXPECT_DOUBLE_EQ(summarize_clock_samples(samples).sm_mhz.median, 1905);
  EXPECT_EQ(summarize_clock_samples({}).samples, 0u);
}

TEST(GpuClocks, SamplerWithoutTheDeviceSaysWhy) {
  ClockSampler sampler("ffff:ff:1f.7");  // no such device on any machine
  EXPECT_FALSE(sampler.available());
  // Without the driver: NVML does not load; with it: NVML finds no device at that id.
  EXPECT_TRUE(sampler.why().find("libnvidia-ml") != std::string::npos ||
              sampler.why().find("ffff:ff:1f.7") != std::string::npos)
      << sampler.why();
  sampler.start(1);
  EXPECT_TRUE(sampler.stop().empty());
}

}  // namespace
}  // namespace dsv4::core
