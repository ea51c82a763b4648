#include "core/gpu_clocks.h"

#include <dlfcn.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <type_traits>

namespace dsv4::core {
namespace {

// The few NVML entry points the sampler calls, by their C signatures (NVML's API
// reference); nvmlReturn_t, nvmlClockType_t and nvmlTemperatureSensors_t are C enums.
using NvmlReturn = int;
using NvmlDevice = void*;
constexpr NvmlReturn kNvmlSuccess = 0;
constexpr int kNvmlClockSm = 1, kNvmlClockMem = 2, kNvmlTemperatureGpu = 0;

struct Nvml {
  NvmlReturn (*init)() = nullptr;
  const char* (*error_string)(NvmlReturn) = nullptr;
  NvmlReturn (*handle_by_pci_bus_id)(const char*, NvmlDevice*) = nullptr;
  NvmlReturn (*clock_info)(NvmlDevice, int, unsigned*) = nullptr;
  NvmlReturn (*power_usage)(NvmlDevice, unsigned*) = nullptr;
  NvmlReturn (*temperature)(NvmlDevice, int, unsigned*) = nullptr;
  NvmlReturn (*event_reasons)(NvmlDevice, unsigned long long*) = nullptr;
  std::string error;  // non-empty: unusable, and why

  std::string text(NvmlReturn r) const {
    return error_string ? fmt::format("{} ({})", error_string(r), r) : fmt::format("NVML error {}", r);
  }
};

// Loaded and initialised once a process; never shut down (other samplers may follow, and
// the driver releases it at exit).
const Nvml& nvml() {
  static const Nvml lib = [] {
    Nvml n;
    void* so = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!so) {
      const char* e = dlerror();
      n.error = fmt::format("cannot load libnvidia-ml.so.1 (the NVIDIA driver's NVML): {}", e ? e : "unknown");
      return n;
    }
    const auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(so, name));
      if (!fn && n.error.empty()) n.error = fmt::format("libnvidia-ml.so.1 has no {}", name);
    };
    sym(n.init, "nvmlInit_v2");
    sym(n.error_string, "nvmlErrorString");
    sym(n.handle_by_pci_bus_id, "nvmlDeviceGetHandleByPciBusId_v2");
    sym(n.clock_info, "nvmlDeviceGetClockInfo");
    sym(n.power_usage, "nvmlDeviceGetPowerUsage");
    sym(n.temperature, "nvmlDeviceGetTemperature");
    // Renamed from "throttle" to "event" reasons in NVML 12.535; older drivers have only the first name.
    n.event_reasons = reinterpret_cast<decltype(n.event_reasons)>(dlsym(so, "nvmlDeviceGetCurrentClocksEventReasons"));
    if (!n.event_reasons) sym(n.event_reasons, "nvmlDeviceGetCurrentClocksThrottleReasons");
    if (n.error.empty())
      if (const NvmlReturn r = n.init(); r != kNvmlSuccess) n.error = "libnvidia-ml.so.1: nvmlInit_v2: " + n.text(r);
    return n;
  }();
  return lib;
}

ClockSummary::Range range_of(std::vector<double> v) {
  if (v.empty()) return {};
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  const double median = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  return {v.front(), median, v.back()};
}

}  // namespace

std::vector<std::string> clock_reason_names(uint64_t reasons) {
  // NVML's nvmlClocksEventReason* bits, in bit order.
  static const char* const kNames[] = {"gpu_idle",           "applications_clocks_setting", "sw_power_cap",
                                       "hw_slowdown",        "sync_boost",                  "sw_thermal_slowdown",
                                       "hw_thermal_slowdown", "hw_power_brake_slowdown",    "display_clock_setting"};
  std::vector<std::string> out;
  for (int b = 0; b < 64; ++b)
    if (reasons >> b & 1) out.push_back(b < int(std::size(kNames)) ? kNames[b] : fmt::format("bit_{}", b));
  return out;
}

ClockSummary summarize_clock_samples(const std::vector<ClockSample>& samples) {
  ClockSummary out;
  out.samples = samples.size();
  std::vector<double> sm, mem, power, temp;
  uint64_t seen = 0;
  for (const ClockSample& s : samples) {
    sm.push_back(s.sm_mhz);
    mem.push_back(s.mem_mhz);
    power.push_back(s.power_mw * 1e-3);
    temp.push_back(s.temp_c);
    seen |= s.reasons;
  }
  out.sm_mhz = range_of(std::move(sm));
  out.mem_mhz = range_of(std::move(mem));
  out.power_w = range_of(std::move(power));
  out.temp_c = range_of(std::move(temp));
  for (int b = 0; b < 64; ++b) {
    if (!(seen >> b & 1)) continue;
    size_t n = 0;
    for (const ClockSample& s : samples) n += s.reasons >> b & 1;
    out.reasons.emplace_back(clock_reason_names(uint64_t(1) << b).front(), double(n) / double(samples.size()));
  }
  return out;
}

ClockSampler::ClockSampler(const std::string& pci_bus_id) {
  const Nvml& n = nvml();
  if (!n.error.empty()) {
    why_ = n.error;
    return;
  }
  NvmlDevice d = nullptr;
  if (const NvmlReturn r = n.handle_by_pci_bus_id(pci_bus_id.c_str(), &d); r != kNvmlSuccess) {
    why_ = fmt::format("NVML finds no device at PCI bus id '{}': {}", pci_bus_id, n.text(r));
    return;
  }
  device_ = d;
  ClockSample probe;
  if (!read(probe)) {
    why_ = fmt::format("NVML cannot read the clocks of the device at '{}'", pci_bus_id);
    device_ = nullptr;
  }
}

ClockSampler::~ClockSampler() { stop(); }

bool ClockSampler::read(ClockSample& s) const {
  static_assert(std::is_same_v<uint32_t, unsigned>, "NVML writes unsigned int");
  const Nvml& n = nvml();
  if (n.clock_info(device_, kNvmlClockSm, &s.sm_mhz) != kNvmlSuccess) return false;
  if (n.clock_info(device_, kNvmlClockMem, &s.mem_mhz) != kNvmlSuccess) return false;
  // Power, temperature and reasons are not supported on every board: a refused read leaves 0.
  s.power_mw = s.temp_c = 0;
  n.power_usage(device_, &s.power_mw);
  n.temperature(device_, kNvmlTemperatureGpu, &s.temp_c);
  unsigned long long reasons = 0;
  n.event_reasons(device_, &reasons);
  s.reasons = reasons;
  return true;
}

void ClockSampler::start(int period_ms) {
  stop();
  period_ms_ = std::max(1, period_ms);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    samples_.clear();
    failed_reads_ = 0;
  }
  if (!available()) return;
  stop_ = false;
  thread_ = std::thread([this] {
    using Clock = std::chrono::steady_clock;
    const Clock::time_point t0 = Clock::now();
    Clock::time_point next = t0;
    while (!stop_.load()) {
      ClockSample s;
      const bool ok = read(s);
      s.t_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (ok)
          samples_.push_back(s);
        else
          ++failed_reads_;
      }
      next += std::chrono::milliseconds(period_ms_);
      std::this_thread::sleep_until(next);
    }
  });
}

std::vector<ClockSample> ClockSampler::stop() {
  if (thread_.joinable()) {
    stop_ = true;
    thread_.join();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return samples_;
}

}  // namespace dsv4::core
