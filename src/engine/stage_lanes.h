// Runs a step's stages on the backend's lanes: a stage that does not depend on the
// one before it (by the buffers the stages declare, model::stage_dependencies) runs
// beside it, on the other lane, and waits only for the stages it does depend on.
// In a decode step that puts a layer's routed experts beside its shared expert, so
// the two chains of small launches (and the routed GEMMs' tails) overlap. Issue order
// stays program order, so a backend with one lane (the CPU) runs the program exactly
// as run_in_order does; the results never depend on the lanes (every stage reads
// only what its dependencies wrote).
#pragma once

#include <vector>

#include "model/stage_program.h"
#include "ops/backend.h"

namespace dsv4::engine {

struct LaneStep {
  int lane = 0;
  std::vector<int> waits;  // stages (of the other lane) whose marks this stage waits for first
  bool mark = false;       // a mark is made after this stage (some stage waits for it)
};

struct LanePlan {
  std::vector<LaneStep> steps;  // one per stage, in program order
  int final_wait = -1;          // the stage lane 0 waits for at the end (-1: none)
};

// Two lanes at most. A program with a communication stage stays on lane 0: every
// rank must issue its collectives in one order on one stream.
LanePlan plan_lanes(const model::StageProgram& program, int num_lanes);

// Runs program by plan_lanes(program, backend.num_lanes()); ends on lane 0 with every
// lane's work ordered before what is issued next.
void run_on_lanes(const model::StageProgram& program, ops::Backend& backend);

}  // namespace dsv4::engine
