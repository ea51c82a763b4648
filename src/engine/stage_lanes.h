// Runs a step's stages on the backend's lanes. A stage that needs the latest stage
// of no lane (by the buffers the stages declare, model::stage_dependencies) goes on
// a side lane, beside lane 0's chain, and waits only for the stages it does depend
// on. In a decode step that puts the KV row, the compressors and the
// indexer's inputs beside the q path, the window commit beside the output
// projections, and the shared expert beside the router and the routed experts
// (docs/design/stage-lanes.md). Issue order stays program order, so a backend with
// one lane (the CPU) runs the program exactly as run_in_order does; the results
// never depend on the lanes (every stage reads only what its dependencies wrote).
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
  std::vector<LaneStep> steps;   // one per stage, in program order
  std::vector<int> final_waits;  // the stages lane 0 waits for at the end (the other lanes' last ones)
};

constexpr int kMaxLanes = 3;

// Up to kMaxLanes lanes. A program with a communication stage stays on lane 0: every
// rank must issue its collectives in one order on one stream.
LanePlan plan_lanes(const model::StageProgram& program, int num_lanes);

// Runs program by plan_lanes(program, backend.num_lanes()); ends on lane 0 with every
// lane's work ordered before what is issued next. One program at a time per backend
// (it reuses the backend's marks).
void run_on_lanes(const model::StageProgram& program, ops::Backend& backend);

}  // namespace dsv4::engine
