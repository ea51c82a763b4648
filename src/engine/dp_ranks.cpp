#include "engine/dp_ranks.h"

#include "core/error.h"
#include "model/checkpoint.h"
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
  const int W = options.dp;
  if (W < 1) core::fail("--dp must be at least 1, got {}", W);
  if (options.backend != "cpu" && options.backend != "cuda")
    core::fail("backend must be cpu or cuda, not \"{}\"", options.backend);
  const bool cuda = options.backend == "cuda";
  DpRanks out;
  if (cuda) {
#if DSV4_HAVE_NCCL
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
    if (devices < W) core::fail("--dp {} needs {} GPUs, this machine has {}", W, W, devices);
    if (W > 1) {
      parallel::NcclOptions nccl;
      nccl.comm = options.comm;
      nccl.max_ctas = options.nccl_max_ctas;
      parallel::ClusterPlan plan;
      plan.world_size = W;
      for (int r = 0; r < W; ++r) plan.local.push_back({r, r});
      plan.unique_id = parallel::nccl_unique_id();
      for (auto& c : parallel::create_nccl_communicators(plan, nccl)) out.comms.push_back(std::move(c));
    }
#else
    if (W > 1) core::fail("--backend cuda with --dp {} needs a build with CUDA and NCCL", W);
#endif
  } else if (W > 1) {
    out.comms = parallel::make_inprocess_group(W, options.comm);
  }
  const bool split = W > 1 && options.moe != MoeMode::kLocal;
  int64_t num_experts = 0;
  if (split)
    num_experts = options.source.checkpoint_dir.empty()
                      ? model::preset_config(options.source.preset).n_routed_experts
                      : model::Checkpoint(options.source.checkpoint_dir).config().n_routed_experts;
  for (int r = 0; r < W; ++r) {
    auto rank = std::make_unique<DpRank>();
    rank->index = r;
    rank->comm = out.comms.empty() ? nullptr : out.comms[size_t(r)].get();
    rank->backend = cuda ? ops::make_cuda_backend(r) : ops::make_cpu_backend(options.threads_per_rank);
    rank->backend->bind_to_current_thread();
    int64_t eb = 0, ee = -1;
    if (split) std::tie(eb, ee) = parallel::expert_range(num_experts, W, r);
    rank->model = load_model(options.source, *rank->backend, eb, ee);
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
