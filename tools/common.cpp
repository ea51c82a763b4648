#include <cctype>

#include "core/error.h"
#include "tools/commands.h"
#if DSV4_HAVE_CUDA
#include "ops/cuda/cuda_backend.h"
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
  if (ops::cuda_device_available()) return "cuda";
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

}  // namespace dsv4::tools
