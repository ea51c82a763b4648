// How a layer's routed experts run. The model owns routing, the shared expert and
// the combine; an executor supplies the stages between: dispatch (comm), routed
// experts (compute), combine (comm). The local executor is one rank holding every
// expert; expert-parallel executors live in src/parallel.
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "model/stage_program.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace dsv4::model {

// One micro-batch's MoE tensors for one layer.
struct MoeStageIo {
  int micro_batch = 0;               // executors keep staging buffers per micro-batch
  int64_t layer = 0;                 // layer index (L.. for MTP blocks)
  const LayerWeights* weights = nullptr;
  core::Tensor x;                    // bf16 [T, D] normed FFN input rows
  core::Tensor ids;                  // i32 [T, k] routed experts (-1: none)
  core::Tensor weights_f32;          // f32 [T, k] routing weights
  core::Tensor slot_out;             // bf16 [T, k, D] scratch of this micro-batch
  core::Tensor routed;               // f32 [T, D] out: sum of the row's routed expert outputs, ascending expert id
  float swiglu_limit = 0.0f;
  // Set by the model where the consumer of routed takes the slots instead
  // (HcPostInput::of_moe_slots) and the executor can leave them (leaves_slots()): the
  // stages then end with slot_out, routed unwritten.
  bool leave_slots = false;
};

class MoeExecutor {
 public:
  virtual ~MoeExecutor() = default;
  virtual void append_dispatch(StageProgram& program, const MoeStageIo& io) = 0;
  virtual void append_experts(StageProgram& program, const MoeStageIo& io) = 0;
  virtual void append_combine(StageProgram& program, const MoeStageIo& io) = 0;
  // False when a stage needs host-side data (counts) and so cannot be captured in a graph.
  virtual bool graph_capturable() const { return true; }
  // True when the stages can end with every row's slots in slot_out and ids (this rank's
  // rows, their own ids), leaving their sum to routed's consumer (MoeStageIo::leave_slots).
  virtual bool leaves_slots() const { return false; }
};

// Every expert on this rank: no communication.
class LocalMoeExecutor final : public MoeExecutor {
 public:
  explicit LocalMoeExecutor(ops::Backend& backend) : backend_(backend) {}
  void append_dispatch(StageProgram&, const MoeStageIo&) override {}
  void append_experts(StageProgram& program, const MoeStageIo& io) override;
  void append_combine(StageProgram&, const MoeStageIo&) override {}
  bool leaves_slots() const override { return true; }

 private:
  ops::Backend& backend_;
};

}  // namespace dsv4::model
