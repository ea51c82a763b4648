#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tools/build_info.h"
#include "tools/commands.h"
#if DSV4_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_check.h"
#endif

namespace dsv4::tools {

std::unique_ptr<ops::Backend> make_backend(const std::string& name, int threads) {
  if (name == "cpu") return ops::make_cpu_backend(threads);
  if (name == "cuda") return ops::make_cuda_backend(0);
  core::fail("--backend must be cpu or cuda, not \"{}\"", name);
}

void add_parallel_flags(CLI::App& app, ParallelFlags& f) {
  app.add_option("--nnodes", f.nnodes, "Nodes in the data-parallel group (CUDA; every node runs this command)")
      ->default_val(1)->check(CLI::Range(1, 1024));
  app.add_option("--node-rank", f.node_rank, "This node's index, 0..nnodes-1 (node 0 hands out the NCCL id)")
      ->default_val(0)->check(CLI::Range(0, 1023));
  app.add_option("--master-addr", f.master_addr, "Address of node 0, where the others fetch the NCCL id")
      ->default_val("127.0.0.1");
  app.add_option("--master-port", f.master_port, "TCP port node 0 listens on for the others")
      ->default_val(29533)->check(CLI::Range(1, 65535));
  app.add_option("--comm-timeout", f.comm_timeout_s,
                 "Seconds a collective may wait for a peer before every rank fails with a message naming it")
      ->default_val(120)->check(CLI::Range(0.1, 86400.0));
  app.add_option("--nccl-max-ctas", f.nccl_max_ctas, "Cap on NCCL's CTAs per collective (0: NCCL's default)")
      ->default_val(0)->check(CLI::Range(0, 64));
}

void apply_parallel_flags(const ParallelFlags& f, engine::EngineBuildOptions& o) {
  o.nnodes = f.nnodes;
  o.node_rank = f.node_rank;
  o.master_addr = f.master_addr;
  o.master_port = f.master_port;
  o.comm.timeout = std::chrono::milliseconds(int64_t(f.comm_timeout_s * 1000));
  o.nccl_max_ctas = f.nccl_max_ctas;
}

std::string default_backend_name() {
#if DSV4_HAVE_CUDA
  std::string why;
  if (ops::cuda_device_available(&why)) return "cuda";
  std::fprintf(stderr, "dsv4: no usable GPU (%s); running on the CPU backend\n", why.c_str());
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

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (true) {
    const size_t comma = text.find(',', pos);
    out.push_back(text.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos));
    if (comma == std::string::npos) return out;
    pos = comma + 1;
  }
}

std::vector<int32_t> parse_list(const std::string& text, const char* option, int32_t min_value) {
  std::vector<int32_t> out;
  for (const std::string& item : split_commas(text)) {
    try {
      size_t used = 0;
      int v = std::stoi(item, &used);
      if (used != item.size() || v < min_value) throw std::invalid_argument("");
      out.push_back(v);
    } catch (...) {
      if (min_value == 1)
        core::fail("{}: \"{}\" is not a positive integer (expected a list such as 1,16,64,256)", option, item);
      core::fail("{}: \"{}\" is not an integer >= {} (expected a comma-separated list)", option, item, min_value);
    }
  }
  return out;
}

void expect_writable_file(const std::string& path, const char* option) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path p(path);
  if (path.empty()) core::fail("{}: empty path", option);
  const fs::file_status st = fs::status(p, ec);
  if (fs::exists(st)) {
    if (fs::is_directory(st)) core::fail("{} {}: is a directory, not a file", option, path);
    const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND);  // (neither truncates nor writes)
    if (fd < 0) core::fail("{} {}: the file is not writable: {}", option, path, std::strerror(errno));
    ::close(fd);
    return;
  }
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(dir, ec)) core::fail("{} {}: folder {} does not exist", option, path, dir.string());
  if (::access(dir.c_str(), W_OK) != 0)
    core::fail("{} {}: folder {} is not writable: {}", option, path, dir.string(), std::strerror(errno));
}

void write_json_file(const nlohmann::json& value, const std::string& path, const char* option) {
  std::ofstream f(path);
  if (!f) core::fail("{} {}: cannot open the file for writing", option, path);
  f << value.dump(2) << "\n";
  if (!f.flush()) core::fail("{} {}: cannot write the file", option, path);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::function<void(uint64_t, uint64_t)> stderr_progress(const std::string& what, uint64_t min_total) {
  struct State {
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    int shown = -1;  // the percentage on the line
  };
  auto state = std::make_shared<State>();
  return [what, min_total, state](uint64_t done, uint64_t total) {
    if (total < min_total) return;
    const int pct = total ? int(std::min(done, total) * 100 / total) : 100;
    if (pct == state->shown) return;
    state->shown = pct;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - state->start).count();
    std::fprintf(stderr, "\r%s: %3d%%  %.2f / %.2f GB  %.0f s%s", what.c_str(), pct, double(done) / 1e9,
                 double(total) / 1e9, s, pct == 100 ? "\n" : "");
    std::fflush(stderr);
  };
}

std::string build_info_text() {
  const BuildInfo b = build_info();
  return fmt::format("dsv4 {} (commit {}{}; {}; {})", b.version, b.commit, b.dirty ? ", with local changes" : "",
                     b.build_type, b.cuda ? "CUDA backend" : "CPU only");
}

nlohmann::json build_json() {
  const BuildInfo b = build_info();
  return {{"version", b.version}, {"commit", b.commit}, {"dirty", b.dirty}, {"build_type", b.build_type},
          {"cuda", b.cuda}};
}

nlohmann::json device_json(ops::Backend& be) {
#if DSV4_HAVE_CUDA
  if (be.device() == core::Device::kCuda) {
    const cudaDeviceProp& p = static_cast<ops::CudaBackend&>(be).properties();
    int driver = 0, runtime = 0;
    DSV4_CUDA_CHECK(cudaDriverGetVersion(&driver));
    DSV4_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
    return {{"name", p.name},
            {"compute_capability", fmt::format("{}.{}", p.major, p.minor)},
            {"sms", p.multiProcessorCount},
            {"memory_gib", double(p.totalGlobalMem) / double(1ull << 30)},
            {"l2_mib", double(p.l2CacheSize) / double(1 << 20)},
            {"cuda_driver", fmt::format("{}.{}", driver / 1000, driver % 1000 / 10)},
            {"cuda_runtime", fmt::format("{}.{}", runtime / 1000, runtime % 1000 / 10)}};
  }
#endif
  std::string model = "unknown CPU";
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);)
    if (line.rfind("model name", 0) == 0) {
      const size_t value = line.find_first_not_of(" \t", line.find(':') + 1);
      if (line.find(':') != std::string::npos && value != std::string::npos) model = line.substr(value);
      break;
    }
  return {{"name", model}, {"host_cores", std::thread::hardware_concurrency()}};
}

std::string device_pci_bus_id(ops::Backend& be) {
#if DSV4_HAVE_CUDA
  if (be.device() == core::Device::kCuda) {
    const cudaDeviceProp& p = static_cast<ops::CudaBackend&>(be).properties();
    return fmt::format("{:04x}:{:02x}:{:02x}.0", p.pciDomainID, p.pciBusID, p.pciDeviceID);
  }
#endif
  (void)be;
  return "";
}

std::string device_text(const nlohmann::json& d) {
  if (d.contains("sms")) {
    std::string sm = d["compute_capability"].get<std::string>();  // "9.0" -> sm_90, "10.0" -> sm_100
    sm.erase(std::remove(sm.begin(), sm.end(), '.'), sm.end());
    return fmt::format("{} (sm_{}, {} SMs, {:.0f} GiB; driver {}, runtime {})", d["name"].get<std::string>(), sm,
                       d["sms"].get<int>(),
                       d["memory_gib"].get<double>(), d["cuda_driver"].get<std::string>(),
                       d["cuda_runtime"].get<std::string>());
  }
  return fmt::format("{} ({} cores)", d["name"].get<std::string>(), d["host_cores"].get<unsigned>());
}

// Device-to-device copy bandwidth (bytes read + written per second), the roofline denominator.
double measure_copy_bandwidth(ops::Backend& be) {
  const int64_t bytes = be.device() == core::Device::kCuda ? (1ll << 30) : (64ll << 20);
  core::Tensor a = be.empty(core::DType::kU8, {bytes}), b = be.empty(core::DType::kU8, {bytes});
  {
    // Random bytes: never time on zeros (some memory paths compress them).
    std::vector<uint8_t> host(static_cast<size_t>(bytes));
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < host.size(); i += 8) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      std::memcpy(host.data() + i, &x, std::min<size_t>(8, host.size() - i));
    }
    be.upload(a, host.data(), host.size());
  }
  be.copy(b, a);
  auto timer = be.make_timer();
  std::vector<double> ms;
  for (int i = 0; i < 10; ++i) {
    timer->start();
    be.copy(b, a);
    timer->stop();
    ms.push_back(timer->elapsed_ms());
  }
  return 2.0 * double(bytes) / (median(ms) * 1e-3);
}

}  // namespace dsv4::tools
