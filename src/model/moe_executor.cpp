#include "model/moe_executor.h"

#include <fmt/format.h>

namespace dsv4::model {

void LocalMoeExecutor::append_experts(StageProgram& program, const MoeStageIo& io) {
  std::vector<BufferRef> writes = {{"slot_out", io.slot_out.data()}};
  if (!io.leave_slots) writes.push_back({"routed", io.routed.data()});
  program.push_back(Stage{
      fmt::format("L{}.experts", io.layer),
      StageKind::kCompute,
      {{"moe_x", io.x.data()}, {"router_ids", io.ids.data()}, {"router_weights", io.weights_f32.data()}},
      std::move(writes),
      [this, io] {
        const LayerWeights& w = *io.weights;
        backend_.routed_experts(io.x, io.ids, io.weights_f32, w.experts, 0, int64_t(w.experts.size()),
                                io.swiglu_limit, io.slot_out);
        if (!io.leave_slots) backend_.moe_reduce(io.slot_out, io.ids, io.routed);
      }});
}

}  // namespace dsv4::model
