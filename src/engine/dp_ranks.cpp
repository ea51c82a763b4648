#include "engine/dp_ranks.h"

#include <cstdio>

#include "core/error.h"
#include "parallel/expert_parallel.h"
#include "parallel/inprocess_communicator.h"
#if DSV4_HAVE_NCCL
#include "ops/cuda/cuda_backend.h"
#include "parallel/nccl_communicator.h"
#endif

namespace dsv4::engine {

MoeMode parse_moe_mode(const std::string& name) {
  if (name == "local") return MoeMode::kLocal;
  if (name == "allgather") return MoeMode::kAllGather;
  if (name == "alltoall") return MoeMode::kAllToAll;
  core::fail("--moe must be allgather, alltoall or local, not \"{}\"", name);
}

const char* moe_mode_name(MoeMode mode) {
  switch (mode) {
    case MoeMode::kLocal: return "local";
    case MoeMode::kAllGather: return "allgather";
    case MoeMode::kAllToAll: return "alltoall";
  }
  return "?";
}

DpRanks build_dp_ranks(const DpRanksOptions& options) {
  const int L = options.dp;  // ranks in this process
  if (L < 1) core::fail("--dp must be at least 1, got {}", L);
  if (options.backend != "cpu" && options.backend != "cuda")
    core::fail("backend must be cpu or cuda, not \"{}\"", options.backend);
  if (options.nnodes < 1) core::fail("--nnodes must be at least 1, got {}", options.nnodes);
  if (options.node_rank < 0 || options.node_rank >= options.nnodes)
    core::fail("--node-rank {} is outside 0..{} (--nnodes {})", options.node_rank, options.nnodes - 1, options.nnodes);
  const bool cuda = options.backend == "cuda";
  if (options.nnodes > 1 && !cuda) core::fail("--nnodes {} needs --backend cuda (NCCL)", options.nnodes);
  DpRanks out;
  out.world_size = L * options.nnodes;
  int rank_offset = 0;
  if (cuda) {
#if DSV4_HAVE_NCCL
    int devices = 0;
    std::string why;
    if (!ops::cuda_device_available(&why)) devices = 0;
    else if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
    if (devices < L)
      core::fail("--backend cuda with --dp {} needs {} GPU{}; this machine has {}{}", L, L, L == 1 ? "" : "s",
                 devices == 0 ? "none usable" : std::to_string(devices), why.empty() ? "" : " (" + why + ")");
    if (out.world_size > 1) {
      parallel::NcclOptions nccl;
      nccl.comm = options.comm;
      nccl.max_ctas = options.nccl_max_ctas;
      parallel::ClusterPlan plan;
      if (options.nnodes > 1) {
        parallel::ClusterSpec spec;
        spec.nnodes = options.nnodes;
        spec.node_rank = options.node_rank;
        spec.gpus_per_node = L;
        spec.master_addr = options.master_addr;
        spec.master_port = options.master_port;
        std::fprintf(stderr, "dsv4: node %d of %d: waiting for the cluster at %s:%d...\n", options.node_rank,
                     options.nnodes, options.master_addr.c_str(), options.master_port);
        plan = parallel::bootstrap_nccl(spec);
        std::fprintf(stderr, "dsv4: %s\n", parallel::describe(spec, plan).c_str());
      } else {
        plan.world_size = L;
        for (int r = 0; r < L; ++r) plan.local.push_back({r, r});
        plan.unique_id = parallel::nccl_unique_id();
      }
      rank_offset = plan.rank_offset;
      for (auto& c : parallel::create_nccl_communicators(plan, nccl)) out.comms.push_back(std::move(c));
    }
#else
    if (out.world_size > 1) core::fail("--backend cuda with --dp {} needs a build with CUDA and NCCL", L);
#endif
  } else if (L > 1) {
    out.comms = parallel::make_inprocess_group(L, options.comm);
  }
  const int W = out.world_size;
  const bool split = W > 1 && options.moe != MoeMode::kLocal;
  int64_t num_experts = 0;
  if (split)
    num_experts = source_config(options.source).n_routed_experts;
  // In-process CPU ranks read one copy of the weights (host tensors, read-only), each
  // binding its own experts, instead of each drawing or mapping its own: the memory and
  // the load time of one model, not L. GPU ranks each hold theirs on their device.
  std::shared_ptr<LoadedModel> host_model;
  for (int r = 0; r < L; ++r) {
    auto rank = std::make_unique<DpRank>();
    rank->index = r;
    rank->global_rank = rank_offset + r;
    rank->comm = out.comms.empty() ? nullptr : out.comms[size_t(r)].get();
    rank->backend = cuda ? ops::make_cuda_backend(r) : ops::make_cpu_backend(options.threads_per_rank, options.cpu_quant_dot);
    rank->backend->bind_to_current_thread();
    int64_t eb = 0, ee = -1;
    if (split) std::tie(eb, ee) = parallel::expert_range(num_experts, W, rank->global_rank);
    if (cuda) {
      rank->model = load_model(options.source, *rank->backend, eb, ee);
    } else {
      if (!host_model) host_model = load_model(options.source, *rank->backend);
      rank->model = split ? bind_expert_slice(host_model, eb, ee) : host_model;
    }
    out.config = rank->model->config;
    if (split) {
      parallel::ExpertParallelShape shape;
      shape.max_rows = options.max_rows;
      shape.topk = out.config.num_experts_per_tok;
      shape.hidden = out.config.hidden_size;
      shape.num_experts = out.config.n_routed_experts;
#if DSV4_HAVE_NCCL
      if (cuda)
        static_cast<parallel::NcclCommunicator&>(*rank->comm)
            .set_stream(static_cast<ops::CudaBackend&>(*rank->backend).stream());
#endif
      if (options.moe == MoeMode::kAllGather)
        rank->moe = std::make_unique<parallel::AllGatherMoeExecutor>(*rank->comm, *rank->backend, shape);
      else
        rank->moe = std::make_unique<parallel::AllToAllMoeExecutor>(*rank->comm, *rank->backend, shape);
    }
    out.ranks.push_back(std::move(rank));
  }
  return out;
}

}  // namespace dsv4::engine
