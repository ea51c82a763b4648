// Subcommands of the dsv4 CLI. Each registers its options on a CLI11 subcommand
// and returns the function that runs it (exit code).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json_fwd.hpp>

#include "engine/engine_builder.h"
#include "model/config.h"
#include "ops/backend.h"

namespace dsv4::tools {

using Command = std::function<int()>;

Command add_make_checkpoint(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_info(CLI::App& app);
// `dsv4 env`: the environment variables the project reads (tools/env_switches.h).
Command add_env(CLI::App& app);
// `dsv4 bench`: registers its children (decode, phases, linears, sampling, serve) on `app` and runs the parsed one.
Command add_bench(CLI::App& app);
Command add_bench_decode(CLI::App& app);
Command add_bench_phases(CLI::App& app);
Command add_bench_linears(CLI::App& app);
Command add_bench_sampling(CLI::App& app);
#if DSV4_HAVE_SERVE
Command add_serve(CLI::App& app);
Command add_bench_serve(CLI::App& app);
#endif

// "cpu" or "cuda"; a clear error where this build or machine lacks the backend.
std::unique_ptr<ops::Backend> make_backend(const std::string& name, int threads);

// "cuda" when this build has the CUDA backend and a GPU is usable, else "cpu" (saying
// why on stderr where this build has CUDA).
std::string default_backend_name();

// Flags of the data-parallel group shared by generate and serve: several nodes,
// the collective timeout, NCCL's CTA cap.
struct ParallelFlags {
  int nnodes = 1, node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29533;
  double comm_timeout_s = 120;
  int nccl_max_ctas = 0;
};
void add_parallel_flags(CLI::App& app, ParallelFlags& flags);
void apply_parallel_flags(const ParallelFlags& flags, engine::EngineBuildOptions& options);

// A progress callback for long work on bytes: "\r<what>:  37%  11.40 / 30.71 GB  25 s" on
// stderr when the percentage changes, ending the line at 100%; quiet where the total is
// under min_total bytes (small models load in a moment).
std::function<void(uint64_t done, uint64_t total)> stderr_progress(const std::string& what, uint64_t min_total = 0);

// "4096", "64M", "5G", "auto" (0).
uint64_t parse_size(const std::string& text, const char* option);

// The items of a comma-separated list, empty ones included ("" is one empty item).
std::vector<std::string> split_commas(const std::string& text);

// "1,16,64,256": integers >= min_value (positive by default); a clear error naming the
// option otherwise.
std::vector<int32_t> parse_list(const std::string& text, const char* option, int32_t min_value = 1);

// Fails, naming `option` and the path, where a file could not be written there (a
// directory, a missing or read-only folder, a read-only file): checked before long
// work so that its results are not lost at the end. Creates and changes nothing.
void expect_writable_file(const std::string& path, const char* option);

// Writes `value` (indented) to `path`; a clear error naming `option` and the file
// when it cannot be opened or written.
void write_json_file(const nlohmann::json& value, const std::string& path, const char* option);

// The DSV4_* variables set now, {name: value}: benchmarks record them with their results.
nlohmann::json environment_json();

// This binary (tools/build_info.h) for a benchmark's record: version, commit, local
// changes, build type, CUDA.
nlohmann::json build_json();

// The backend's device, for a benchmark's record: a GPU's name, compute capability, SMs,
// memory, L2 and CUDA driver/runtime versions, or the host CPU's model and cores.
nlohmann::json device_json(ops::Backend& be);
// device_json in one line: "NVIDIA H200 (sm_90, 132 SMs, 140 GiB; driver 13.0, runtime 13.0)".
std::string device_text(const nlohmann::json& device);

// The middle value (the upper one of an even count); 0 for none.
double median(std::vector<double> v);

// Device-to-device copy bandwidth of the backend's device (bytes read + written per
// second, median of 10 copies of 1 GB of random bytes; 64 MB on the CPU): the
// roofline denominator of the benchmarks.
double measure_copy_bandwidth(ops::Backend& be);
// The PCI bus id of a CUDA backend's device ("0000:1b:00.0", as NVML takes it); empty for the CPU.
std::string device_pci_bus_id(ops::Backend& be);

}  // namespace dsv4::tools
