#include "parallel/expert_parallel.h"

#include <fmt/format.h>

#include "core/error.h"

namespace dsv4::parallel {

using core::DType;
using core::Tensor;

std::pair<int64_t, int64_t> expert_range(int64_t num_experts, int world, int rank) {
  return {num_experts * rank / world, num_experts * (rank + 1) / world};
}

namespace {

int owner_of(int64_t expert, int64_t num_experts, int world) {
  // The rank whose contiguous range holds `expert` (inverse of expert_range).
  int r = int(expert * world / num_experts);
  while (r > 0 && expert < num_experts * r / world) --r;
  while (r + 1 < world && expert >= num_experts * (r + 1) / world) ++r;
  return r;
}

}  // namespace

AllGatherMoeExecutor::AllGatherMoeExecutor(Communicator& comm, ops::Backend& backend, const ExpertParallelShape& shape)
    : comm_(comm), backend_(backend), shape_(shape) {
  std::tie(expert_begin_, expert_end_) = expert_range(shape.num_experts, comm.world_size(), comm.rank());
  const int64_t rows = int64_t(comm.world_size()) * shape.max_rows;
  for (int m = 0; m < shape.num_micro_batches; ++m) {
    Buffers b;
    b.x = backend.empty(DType::kBF16, {rows, shape.hidden});
    b.ids = backend.empty(DType::kI32, {rows, shape.topk});
    b.weights = backend.empty(DType::kF32, {rows, shape.topk});
    b.slot_out = backend.empty(DType::kBF16, {rows, shape.topk, shape.hidden});
    b.partial = backend.empty(DType::kF32, {rows, shape.hidden});
    buffers_.push_back(b);
  }
}

void AllGatherMoeExecutor::append_dispatch(model::StageProgram& program, const model::MoeStageIo& io) {
  Buffers& b = buffers_.at(size_t(io.micro_batch));
  const int64_t T = io.x.size(0), rows = T * comm_.world_size();
  DSV4_CHECK(T <= shape_.max_rows, "all-gather MoE: {} rows, capacity {}", T, shape_.max_rows);
  Tensor gx = b.x.rows(0, rows), gids = b.ids.rows(0, rows), gw = b.weights.rows(0, rows);
  program.push_back(model::Stage{
      fmt::format("L{}.dispatch", io.layer), model::StageKind::kComm,
      {{"moe_x", io.x.data()}, {"router_ids", io.ids.data()}, {"router_weights", io.weights_f32.data()}},
      {{"ep_x", b.x.data()}, {"ep_ids", b.ids.data()}, {"ep_weights", b.weights.data()}},
      [this, io, gx, gids, gw] {
        comm_.all_gather(io.x, gx);
        comm_.all_gather(io.ids, gids);
        comm_.all_gather(io.weights_f32, gw);
      }});
}

void AllGatherMoeExecutor::append_experts(model::StageProgram& program, const model::MoeStageIo& io) {
  Buffers& b = buffers_.at(size_t(io.micro_batch));
  const int64_t rows = io.x.size(0) * comm_.world_size();
  Tensor gx = b.x.rows(0, rows), gids = b.ids.rows(0, rows), gw = b.weights.rows(0, rows);
  Tensor slots = b.slot_out.rows(0, rows), partial = b.partial.rows(0, rows);
  program.push_back(model::Stage{
      fmt::format("L{}.experts", io.layer), model::StageKind::kCompute,
      {{"ep_x", b.x.data()}, {"ep_ids", b.ids.data()}, {"ep_weights", b.weights.data()}},
      {{"ep_slot_out", b.slot_out.data()}, {"ep_partial", b.partial.data()}},
      [this, io, gx, gids, gw, slots, partial] {
        backend_.routed_experts(gx, gids, gw, io.weights->experts, expert_begin_, expert_end_, io.swiglu_limit, slots);
        backend_.moe_reduce(slots, gids, partial);
      }});
}

void AllGatherMoeExecutor::append_combine(model::StageProgram& program, const model::MoeStageIo& io) {
  Buffers& b = buffers_.at(size_t(io.micro_batch));
  const int64_t rows = io.x.size(0) * comm_.world_size();
  Tensor partial = b.partial.rows(0, rows);
  program.push_back(model::Stage{fmt::format("L{}.combine", io.layer), model::StageKind::kComm,
                                 {{"ep_partial", b.partial.data()}}, {{"routed", io.routed.data()}},
                                 [this, io, partial] { comm_.reduce_scatter(partial, io.routed, ReduceOp::kSum); }});
}

AllToAllMoeExecutor::AllToAllMoeExecutor(Communicator& comm, ops::Backend& backend, const ExpertParallelShape& shape)
    : comm_(comm), backend_(backend), shape_(shape) {
  std::tie(expert_begin_, expert_end_) = expert_range(shape.num_experts, comm.world_size(), comm.rank());
  const int64_t W = comm.world_size(), rows = W * shape.max_rows, k = shape.topk, D = shape.hidden;
  for (int m = 0; m < shape.num_micro_batches; ++m) {
    Exchange e;
    e.send_index = backend.empty(DType::kI32, {rows});
    e.send_x = backend.empty(DType::kBF16, {rows, D});
    e.send_ids = backend.empty(DType::kI32, {rows, k});
    e.send_w = backend.empty(DType::kF32, {rows, k});
    e.recv_x = backend.empty(DType::kBF16, {rows, D});
    e.recv_ids = backend.empty(DType::kI32, {rows, k});
    e.recv_w = backend.empty(DType::kF32, {rows, k});
    e.recv_slots = backend.empty(DType::kBF16, {rows, k, D});
    e.returned = backend.empty(DType::kBF16, {rows, k, D});
    e.slot_index = backend.empty(DType::kI32, {shape.max_rows, k});
    exchanges_.push_back(e);
  }
}

void AllToAllMoeExecutor::append_dispatch(model::StageProgram& program, const model::MoeStageIo& io) {
  Exchange& e = exchanges_.at(size_t(io.micro_batch));
  DSV4_CHECK(io.x.size(0) <= shape_.max_rows, "all-to-all MoE: {} rows, capacity {}", io.x.size(0), shape_.max_rows);
  program.push_back(model::Stage{
      fmt::format("L{}.dispatch", io.layer), model::StageKind::kComm,
      {{"moe_x", io.x.data()}, {"router_ids", io.ids.data()}, {"router_weights", io.weights_f32.data()}},
      {{"a2a_recv", e.recv_x.data()}, {"a2a_slot_index", e.slot_index.data()}},
      [this, io, &e] {
        const int W = comm_.world_size();
        const int64_t T = io.x.size(0), k = io.ids.size(1), E = shape_.num_experts;
        std::vector<int32_t> ids(size_t(T * k));
        backend_.download(ids.data(), io.ids, ids.size() * 4);
        // Each row goes once to every rank owning one of its experts, rows grouped by peer.
        std::vector<std::vector<int32_t>> to_peer(static_cast<size_t>(W));
        std::vector<int32_t> slot_peer_pos(size_t(T * k), -1);  // position in the peer's block
        std::vector<int32_t> slot_peer(size_t(T * k), -1);
        for (int64_t t = 0; t < T; ++t) {
          std::vector<int32_t> pos_of_peer(static_cast<size_t>(W), -1);
          for (int64_t s = 0; s < k; ++s) {
            const int32_t x = ids[size_t(t * k + s)];
            if (x < 0) continue;
            DSV4_CHECK(x < E, "routed expert id {} of {}", x, E);
            const int p = owner_of(x, E, W);
            if (pos_of_peer[size_t(p)] < 0) {
              pos_of_peer[size_t(p)] = int32_t(to_peer[size_t(p)].size());
              to_peer[size_t(p)].push_back(int32_t(t));
            }
            slot_peer[size_t(t * k + s)] = p;
            slot_peer_pos[size_t(t * k + s)] = pos_of_peer[size_t(p)];
          }
        }
        e.send_rows.assign(size_t(W), 0);
        std::vector<int32_t> send_index, peer_offset(static_cast<size_t>(W), 0);
        for (int p = 0; p < W; ++p) {
          peer_offset[size_t(p)] = int32_t(send_index.size());
          e.send_rows[size_t(p)] = int64_t(to_peer[size_t(p)].size());
          send_index.insert(send_index.end(), to_peer[size_t(p)].begin(), to_peer[size_t(p)].end());
        }
        e.total_sent = int64_t(send_index.size());
        // Every rank learns every pair's count (one small host all-gather).
        std::vector<int64_t> matrix(size_t(W * W));
        comm_.all_gather_host(e.send_rows.data(), size_t(W) * 8, matrix.data());
        const int me = comm_.rank();
        e.recv_rows.assign(size_t(W), 0);
        e.total_received = 0;
        for (int p = 0; p < W; ++p) e.total_received += (e.recv_rows[size_t(p)] = matrix[size_t(p * W + me)]);
        // Where each own slot's output will be in `returned` (peer blocks in rank order).
        std::vector<int32_t> slot_index(size_t(T * k), -1);
        for (size_t i = 0; i < slot_index.size(); ++i)
          if (slot_peer[i] >= 0) slot_index[i] = peer_offset[size_t(slot_peer[i])] + slot_peer_pos[i];
        backend_.upload(e.slot_index, slot_index.data(), slot_index.size() * 4);
        backend_.upload(e.send_index, send_index.data(), send_index.size() * 4);
        const Tensor idx = e.send_index.rows(0, e.total_sent);
        const Tensor sx = e.send_x.rows(0, e.total_sent), sid = e.send_ids.rows(0, e.total_sent),
                     sw = e.send_w.rows(0, e.total_sent);
        backend_.gather_rows(io.x, idx, sx);
        backend_.gather_rows(io.ids, idx, sid);
        backend_.gather_rows(io.weights_f32, idx, sw);
        comm_.all_to_all(sx, e.send_rows, e.recv_x, e.recv_rows, io.x.size(1) * 2);
        comm_.all_to_all(sid, e.send_rows, e.recv_ids, e.recv_rows, k * 4);
        comm_.all_to_all(sw, e.send_rows, e.recv_w, e.recv_rows, k * 4);
      }});
}

void AllToAllMoeExecutor::append_experts(model::StageProgram& program, const model::MoeStageIo& io) {
  Exchange& e = exchanges_.at(size_t(io.micro_batch));
  program.push_back(model::Stage{
      fmt::format("L{}.experts", io.layer), model::StageKind::kCompute,
      {{"a2a_recv", e.recv_x.data()}}, {{"a2a_recv_slots", e.recv_slots.data()}},
      [this, io, &e] {
        const int64_t R = e.total_received;
        backend_.routed_experts(e.recv_x.rows(0, R), e.recv_ids.rows(0, R), e.recv_w.rows(0, R), io.weights->experts,
                                expert_begin_, expert_end_, io.swiglu_limit, e.recv_slots.rows(0, R));
      }});
}

void AllToAllMoeExecutor::append_combine(model::StageProgram& program, const model::MoeStageIo& io) {
  Exchange& e = exchanges_.at(size_t(io.micro_batch));
  program.push_back(model::Stage{
      fmt::format("L{}.combine", io.layer), model::StageKind::kComm,
      {{"a2a_recv_slots", e.recv_slots.data()}, {"a2a_slot_index", e.slot_index.data()}},
      {{"slot_out", io.slot_out.data()}, {"routed", io.routed.data()}},
      [this, io, &e] {
        const int64_t k = io.ids.size(1), D = io.x.size(1), T = io.x.size(0);
        // Outputs go back the way the rows came; then into slot order and summed
        // in ascending expert id, exactly as on one rank.
        comm_.all_to_all(e.recv_slots, e.recv_rows, e.returned, e.send_rows, k * D * 2);
        backend_.gather_slots(e.returned.rows(0, e.total_sent), e.slot_index.rows(0, T), io.slot_out);
        backend_.moe_reduce(io.slot_out, io.ids, io.routed);
      }});
}

}  // namespace dsv4::parallel
