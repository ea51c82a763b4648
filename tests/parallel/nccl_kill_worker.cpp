// Worker process of NcclKill.SurvivorFailsFastWhenPeerIsKilled: one node of a 2-node
// cluster on 127.0.0.1 with one GPU (the parent sets CUDA_VISIBLE_DEVICES), bootstrapped
// through the TCP rendezvous, issuing collectives in a loop until it fails.
// Usage: parallel_nccl_kill_worker NODE_RANK PORT TIMEOUT_MS
// Prints "iteration N" after each completed iteration; on failure prints the error and
// exits 3 (after destroying its communicator, as a real serving process would).
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <thread>

#include "ops/cuda/cuda_check.h"
#include "parallel/nccl_communicator.h"

using namespace dsv4;
using namespace dsv4::parallel;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s NODE_RANK PORT TIMEOUT_MS\n", argv[0]);
    return 2;
  }
  const int node_rank = std::atoi(argv[1]);
  ClusterSpec spec;
  spec.nnodes = 2;
  spec.node_rank = node_rank;
  spec.gpus_per_node = 1;
  spec.master_addr = "127.0.0.1";
  spec.master_port = std::atoi(argv[2]);
  NcclOptions options;
  options.comm.timeout = std::chrono::milliseconds(std::atoi(argv[3]));
  try {
    ClusterPlan plan = bootstrap_nccl(spec, std::chrono::milliseconds(60000));
    std::printf("%s, NCCL %s\n", describe(spec, plan).c_str(), nccl_version_string().c_str());
    std::fflush(stdout);
    auto comms = create_nccl_communicators(plan, options);
    NcclCommunicator& c = *comms[0];
    try {
      DSV4_CUDA_CHECK(cudaSetDevice(c.device()));
      const int64_t n = 1 << 18;  // 1 MiB of f32 per rank
      void* x = nullptr;
      void* g = nullptr;
      DSV4_CUDA_CHECK(cudaMalloc(&x, size_t(n) * 4));
      DSV4_CUDA_CHECK(cudaMalloc(&g, size_t(n) * 8));
      core::Tensor xt(x, core::DType::kF32, {n}, core::Device::kCuda);
      core::Tensor gt(g, core::DType::kF32, {2 * n}, core::Device::kCuda);
      for (int it = 0;; ++it) {
        c.all_gather(xt, gt);
        int64_t v = it;
        c.all_reduce_host(&v, 1, ReduceOp::kMax);
        c.synchronize();
        std::printf("iteration %d\n", it);
        std::fflush(stdout);
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kill worker node %d: error: %s\n", node_rank, e.what());
      std::fflush(stderr);
      return 3;  // the communicator is destroyed on the way out
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kill worker node %d: setup error: %s\n", node_rank, e.what());
    return 4;
  }
}
