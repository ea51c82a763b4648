// The GPU's clocks, power and clock-event reasons, sampled from a host thread while a
// benchmark times its work. Why: a step time is only comparable with another run's (or
// with a roofline) at the same clocks. On the lent H200s the 64- and 256-row steps' 200
// graph replays spread 10-17% from min to max where an H100's spread under 2%, and a
// power cap or thermal slowdown would show here as a lower SM clock with its reason bit.
//
// NVML is loaded at run time (libnvidia-ml.so.1, which the driver installs), so nothing
// links against it: without a driver the sampler reports why it is unavailable and the
// benchmark goes on. Sampling never changes a clock or setting.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace dsv4::core {

struct ClockSample {
  double t_ms = 0;           // since start()
  uint32_t sm_mhz = 0;
  uint32_t mem_mhz = 0;
  uint32_t power_mw = 0;     // board power draw
  uint32_t temp_c = 0;       // GPU die temperature
  uint64_t reasons = 0;      // NVML clock-event reason bits active at the sample (0: none)
};

// A summary of samples: each value's min / median / max and, per reason bit seen, the
// share of samples it was active in.
struct ClockSummary {
  struct Range {
    double min = 0, median = 0, max = 0;
  };
  size_t samples = 0;
  Range sm_mhz, mem_mhz, power_w, temp_c;
  std::vector<std::pair<std::string, double>> reasons;  // (name, share of samples), in bit order
};
ClockSummary summarize_clock_samples(const std::vector<ClockSample>& samples);

// NVML's names for the clock-event reason bits, lower case ("sw_power_cap", "hw_slowdown",
// ...); an unknown bit as "bit_N".
std::vector<std::string> clock_reason_names(uint64_t reasons);

class ClockSampler {
 public:
  // pci_bus_id: the device as NVML and cudaDeviceGetPCIBusId write it ("0000:1B:00.0").
  // Loads NVML and finds the device; on failure available() is false and why() says what failed.
  explicit ClockSampler(const std::string& pci_bus_id);
  ~ClockSampler();
  ClockSampler(const ClockSampler&) = delete;
  ClockSampler& operator=(const ClockSampler&) = delete;

  bool available() const { return device_ != nullptr; }
  const std::string& why() const { return why_; }

  // Starts sampling every period_ms on a thread of its own (clears earlier samples).
  void start(int period_ms);
  // Stops it and returns the samples in time order (empty where unavailable). Reads that
  // NVML refused are not samples; failed_reads() counts them.
  std::vector<ClockSample> stop();
  int64_t failed_reads() const { return failed_reads_; }
  int period_ms() const { return period_ms_; }

 private:
  bool read(ClockSample& s) const;
  void* device_ = nullptr;  // nvmlDevice_t
  std::string why_;
  int period_ms_ = 0;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::vector<ClockSample> samples_;
  int64_t failed_reads_ = 0;
};

}  // namespace dsv4::core
