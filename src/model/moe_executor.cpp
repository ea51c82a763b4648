#include "model/moe_executor.h"

#include <fmt/format.h>

namespace dsv4::model {

bool LocalMoeExecutor::prepares(const MoeStageIo& io) const {
  return io.prepared.ndim() > 0 && backend_.prepares_routed_input(io.x.size(0));
}

void LocalMoeExecutor::append_dispatch(StageProgram& program, const MoeStageIo& io) {
  if (!prepares(io)) return;
  program.push_back(Stage{fmt::format("L{}.moe_input", io.layer),
                          StageKind::kCompute,
                          {{"moe_x", io.x.data()}},
                          {{"moe_prepared", io.prepared.data()}},
                          [this, io] {
                            const LayerWeights& w = *io.weights;
                            backend_.prepare_routed_input(io.x, w.experts, 0, int64_t(w.experts.size()),
                                                          io.prepared);
                          }});
}

void LocalMoeExecutor::append_experts(StageProgram& program, const MoeStageIo& io) {
  const bool prepared = prepares(io);
  std::vector<BufferRef> reads = {
      {"moe_x", io.x.data()}, {"router_ids", io.ids.data()}, {"router_weights", io.weights_f32.data()}};
  if (prepared) reads.push_back({"moe_prepared", io.prepared.data()});
  std::vector<BufferRef> writes = {{"slot_out", io.slot_out.data()}};
  if (!io.leave_slots) writes.push_back({"routed", io.routed.data()});
  program.push_back(Stage{fmt::format("L{}.experts", io.layer), StageKind::kCompute, std::move(reads),
                          std::move(writes), [this, io, prepared] {
                            const LayerWeights& w = *io.weights;
                            backend_.routed_experts(io.x, io.ids, io.weights_f32, w.experts, 0,
                                                    int64_t(w.experts.size()), io.swiglu_limit, io.slot_out,
                                                    prepared ? io.prepared : core::Tensor());
                            if (!io.leave_slots) backend_.moe_reduce(io.slot_out, io.ids, io.routed);
                          }});
}

}  // namespace dsv4::model
