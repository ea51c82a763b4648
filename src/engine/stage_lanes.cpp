#include "engine/stage_lanes.h"

#include <algorithm>

#include "core/error.h"

namespace dsv4::engine {

LanePlan plan_lanes(const model::StageProgram& program, int num_lanes) {
  DSV4_CHECK(num_lanes >= 1 && num_lanes <= kMaxLanes, "plan_lanes: {} lanes (1 to {})", num_lanes, kMaxLanes);
  const int n = int(program.size());
  LanePlan plan;
  plan.steps.resize(size_t(n));
  const bool comm = std::any_of(program.begin(), program.end(),
                                [](const model::Stage& s) { return s.kind == model::StageKind::kComm; });
  if (num_lanes == 1 || comm) return plan;
  const std::vector<std::vector<int>> deps = model::stage_dependencies(program);
  std::vector<int> last(size_t(num_lanes), -1);  // the last stage issued on each lane
  // synced[l][m]: the latest stage of lane m that lane l has waited for.
  std::vector<std::vector<int>> synced(size_t(num_lanes), std::vector<int>(size_t(num_lanes), -1));
  for (int i = 0; i < n; ++i) {
    const std::vector<int>& d = deps[size_t(i)];
    auto needs = [&](int s) { return s >= 0 && std::binary_search(d.begin(), d.end(), s); };
    // A stage continues the chain of the first lane whose latest stage it needs. One
    // that needs none goes beside lane 0's chain (the main path, where the program's
    // order puts the stages that others wait for first): on the side lane with the
    // fewest stages lane 0 has not yet waited for, then the one used longest ago.
    int lane = -1;
    for (int l = 0; l < num_lanes && lane < 0; ++l)
      if (needs(last[size_t(l)])) lane = l;
    if (lane < 0) {
      lane = 0;
      if (i > 0) {
        auto pending = [&](int l) {
          return int(std::count_if(plan.steps.begin(), plan.steps.begin() + i,
                                   [&](const LaneStep& st) { return st.lane == l; })) -
                 int(std::count_if(plan.steps.begin(), plan.steps.begin() + std::max(synced[0][size_t(l)] + 1, 0),
                                   [&](const LaneStep& st) { return st.lane == l; }));
        };
        lane = 1;
        for (int l = 2; l < num_lanes; ++l) {
          const int pl = pending(l), pb = pending(lane);
          if (pl < pb || (pl == pb && last[size_t(l)] < last[size_t(lane)])) lane = l;
        }
      }
    }
    LaneStep& step = plan.steps[size_t(i)];
    step.lane = lane;
    std::vector<int> wait(size_t(num_lanes), -1);  // per other lane, the latest stage this one needs
    for (int s : d) {
      const int m = plan.steps[size_t(s)].lane;
      if (m != lane) wait[size_t(m)] = std::max(wait[size_t(m)], s);
    }
    // A side lane always starts from a point of lane 0, even for a stage that needs
    // nothing: a captured graph takes in another stream only through such a wait.
    if (lane != 0 && last[size_t(lane)] < 0 &&
        std::all_of(wait.begin(), wait.end(), [](int w) { return w < 0; }))
      wait[0] = last[0];
    for (int m = 0; m < num_lanes; ++m) {
      const int w = wait[size_t(m)];
      if (w > synced[size_t(lane)][size_t(m)]) {  // (a lane's marks are cumulative: the latest covers the earlier)
        step.waits.push_back(w);
        plan.steps[size_t(w)].mark = true;
        synced[size_t(lane)][size_t(m)] = w;
      }
    }
    last[size_t(lane)] = i;
  }
  for (int m = 1; m < num_lanes; ++m)
    if (last[size_t(m)] > synced[0][size_t(m)]) {
      plan.final_waits.push_back(last[size_t(m)]);
      plan.steps[size_t(last[size_t(m)])].mark = true;
    }
  return plan;
}

void run_on_lanes(const model::StageProgram& program, ops::Backend& backend) {
  const LanePlan plan = plan_lanes(program, std::min(backend.num_lanes(), kMaxLanes));
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
  for (int w : plan.final_waits) backend.wait_for_mark(mark[size_t(w)]);
}

}  // namespace dsv4::engine
