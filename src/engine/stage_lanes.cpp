#include "engine/stage_lanes.h"

#include <algorithm>

#include "core/error.h"

namespace dsv4::engine {

LanePlan plan_lanes(const model::StageProgram& program, int num_lanes) {
  DSV4_CHECK(num_lanes >= 1, "plan_lanes: {} lanes", num_lanes);
  const int n = int(program.size());
  LanePlan plan;
  plan.steps.resize(size_t(n));
  const bool comm = std::any_of(program.begin(), program.end(),
                                [](const model::Stage& s) { return s.kind == model::StageKind::kComm; });
  if (num_lanes == 1 || comm) return plan;
  const std::vector<std::vector<int>> deps = model::stage_dependencies(program);
  int last[2] = {-1, -1};    // the last stage issued on each lane
  int synced[2] = {-1, -1};  // the last stage of the other lane each lane has waited for
  for (int i = 0; i < n; ++i) {
    const std::vector<int>& d = deps[size_t(i)];
    auto needs = [&](int s) { return s >= 0 && std::binary_search(d.begin(), d.end(), s); };
    // A stage continues the chain of the lane whose latest stage it needs; one that
    // needs neither goes on lane 1, beside lane 0's chain (the main path, where the
    // program's order puts the stages that others wait for first).
    int lane = 0;
    if (needs(last[0])) lane = 0;
    else if (needs(last[1])) lane = 1;
    else if (i > 0) lane = 1;
    LaneStep& step = plan.steps[size_t(i)];
    step.lane = lane;
    int wait = -1;  // the latest stage of the other lane this one needs
    for (int s : d)
      if (plan.steps[size_t(s)].lane != lane) wait = std::max(wait, s);
    // Lane 1 always starts from a point of lane 0, even for a stage that needs
    // nothing: a captured graph takes in a second stream only through such a wait.
    if (lane == 1 && last[1] < 0 && wait < 0) wait = last[0];
    if (wait > synced[lane]) {  // (a lane's marks are cumulative: the latest covers the earlier)
      step.waits.push_back(wait);
      plan.steps[size_t(wait)].mark = true;
      synced[lane] = wait;
    }
    last[lane] = i;
  }
  if (last[1] > synced[0]) {
    plan.final_wait = last[1];
    plan.steps[size_t(last[1])].mark = true;
  }
  return plan;
}

void run_on_lanes(const model::StageProgram& program, ops::Backend& backend) {
  const LanePlan plan = plan_lanes(program, std::min(backend.num_lanes(), 2));
  std::vector<int> mark(program.size(), -1);
  backend.clear_marks();
  int lane = 0;
  backend.set_lane(0);
  try {
    for (size_t i = 0; i < program.size(); ++i) {
      const LaneStep& step = plan.steps[i];
      if (step.lane != lane) backend.set_lane(lane = step.lane);
      for (int w : step.waits) backend.wait_for_mark(mark[size_t(w)]);
      program[i].run();
      if (step.mark) mark[i] = backend.mark_lane();
    }
  } catch (...) {
    backend.set_lane(0);
    throw;
  }
  backend.set_lane(0);
  if (plan.final_wait >= 0) backend.wait_for_mark(mark[size_t(plan.final_wait)]);
}

}  // namespace dsv4::engine
