// Expert-parallel MoE: routed experts split in contiguous ranges over the ranks,
// every rank's rows reach the experts that own them and come back. Two paths:
//  * all-gather: gather every rank's rows, ids and weights; each rank runs its
//    local experts on all rows and sums their outputs per row (fp32, ascending
//    expert id); a reduce-scatter returns each rank its rows' sums. Graph-safe;
//    equal row counts on every rank (the DP engine pads to the step's DP max).
//    Sums of partial sums: equal to the single-rank sum up to fp32 rounding.
//  * all-to-all: each row goes once to every rank owning one of its experts;
//    that rank returns the row's per-slot expert outputs; the row's own rank sums
//    them in ascending expert id exactly as one rank would (bit-identical). The
//    per-peer counts come from the routing, so the dispatch reads the ids on the
//    host: eager only.
// The communicator knows nothing of the model and the model nothing of these.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/moe_executor.h"
#include "parallel/communicator.h"

namespace dsv4::parallel {

// Experts [begin, end) of `rank` when `num_experts` are split over `world` ranks.
std::pair<int64_t, int64_t> expert_range(int64_t num_experts, int world, int rank);

struct ExpertParallelShape {
  int64_t max_rows = 0;      // rows per rank per micro-batch (the step's DP max is at most this)
  int64_t topk = 0;
  int64_t hidden = 0;
  int64_t num_experts = 0;
  int num_micro_batches = 1;
};

class AllGatherMoeExecutor final : public model::MoeExecutor {
 public:
  AllGatherMoeExecutor(Communicator& comm, ops::Backend& backend, const ExpertParallelShape& shape);
  void append_dispatch(model::StageProgram& program, const model::MoeStageIo& io) override;
  void append_experts(model::StageProgram& program, const model::MoeStageIo& io) override;
  void append_combine(model::StageProgram& program, const model::MoeStageIo& io) override;

 private:
  struct Buffers {
    core::Tensor x, ids, weights;  // gathered [world * max_rows, ...]
    core::Tensor slot_out;         // bf16 [world * max_rows, k, D]
    core::Tensor partial;          // f32 [world * max_rows, D]
  };
  Communicator& comm_;
  ops::Backend& backend_;
  ExpertParallelShape shape_;
  int64_t expert_begin_, expert_end_;
  std::vector<Buffers> buffers_;  // per micro-batch
};

class AllToAllMoeExecutor final : public model::MoeExecutor {
 public:
  AllToAllMoeExecutor(Communicator& comm, ops::Backend& backend, const ExpertParallelShape& shape);
  void append_dispatch(model::StageProgram& program, const model::MoeStageIo& io) override;
  void append_experts(model::StageProgram& program, const model::MoeStageIo& io) override;
  void append_combine(model::StageProgram& program, const model::MoeStageIo& io) override;
  bool graph_capturable() const override { return false; }

 private:
  struct Exchange {
    // Device buffers.
    core::Tensor send_index;               // i32 [world * max_rows] rows to send, grouped by peer
    core::Tensor send_x, send_ids, send_w;  // packed rows for the peers
    core::Tensor recv_x, recv_ids, recv_w;  // rows from the peers [world * max_rows, ...]
    core::Tensor recv_slots;                // bf16 [world * max_rows, k, D] outputs for received rows
    core::Tensor returned;                  // bf16 [world * max_rows, k, D] our rows' outputs, by peer
    core::Tensor slot_index;                // i32 [max_rows, k] row of `returned` for each own slot
    // Host state of the current layer, set by the dispatch stage.
    std::vector<int64_t> send_rows, recv_rows;
    int64_t total_sent = 0, total_received = 0;
  };
  Communicator& comm_;
  ops::Backend& backend_;
  ExpertParallelShape shape_;
  int64_t expert_begin_, expert_end_;
  std::vector<Exchange> exchanges_;  // per micro-batch
};

}  // namespace dsv4::parallel
