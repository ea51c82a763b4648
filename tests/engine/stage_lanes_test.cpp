// engine/stage_lanes.h: which stages run beside which, from their declared buffers.
// The plan is checked against model::stage_dependencies on a layer-shaped program
// and on random programs: every dependency is either earlier on the same lane or
// covered by a wait for a mark made at or after it on the other lane.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <string>

#include "engine/model_runner.h"
#include "engine/stage_lanes.h"
#include "model/weights.h"
#include "test_seed.h"
#include "test_util.h"

namespace dsv4::engine {
namespace {

using model::BufferRef;
using model::Stage;
using model::StageKind;
using model::StageProgram;

// Stand-ins for buffer identities.
char g_buffers[16];
const void* buf(int i) { return &g_buffers[i]; }

Stage stage(std::string name, std::vector<int> reads, std::vector<int> writes, StageKind kind = StageKind::kCompute) {
  Stage s;
  s.name = std::move(name);
  s.kind = kind;
  for (int r : reads) s.reads.push_back(BufferRef{"r", r < 0 ? nullptr : buf(r)});
  for (int w : writes) s.writes.push_back(BufferRef{"w", w < 0 ? nullptr : buf(w)});
  s.run = [] {};
  return s;
}

// Every dependency honoured: same lane and earlier, or a wait on this stage's lane,
// at this stage or before it, for a stage of the dependency's lane at or after it.
void expect_honours_dependencies(const StageProgram& program, const LanePlan& plan) {
  const auto deps = model::stage_dependencies(program);
  ASSERT_EQ(plan.steps.size(), program.size());
  for (size_t i = 0; i < program.size(); ++i) {
    const int lane = plan.steps[i].lane;
    for (int w : plan.steps[i].waits) {
      EXPECT_LT(w, int(i));
      EXPECT_NE(plan.steps[size_t(w)].lane, lane) << "stage " << i << " waits on its own lane";
      EXPECT_TRUE(plan.steps[size_t(w)].mark) << "stage " << w << " is waited for but not marked";
    }
    for (int d : deps[i]) {
      ASSERT_LT(d, int(i));
      if (plan.steps[size_t(d)].lane == lane) continue;
      bool covered = false;
      for (size_t j = 0; j <= i && !covered; ++j)
        if (plan.steps[j].lane == lane)
          for (int w : plan.steps[j].waits) covered |= w >= d && plan.steps[size_t(w)].lane == plan.steps[size_t(d)].lane;
      EXPECT_TRUE(covered) << "stage " << i << " (lane " << lane << ") does not wait for stage " << d;
    }
  }
  // At the end lane 0 has waited for every stage of the other lanes.
  std::map<int, int> last, synced;  // per side lane: its last stage, the latest of it lane 0 waited for
  auto lane0_waits_for = [&](int w) {
    const int m = plan.steps[size_t(w)].lane;
    synced[m] = std::max(synced.count(m) ? synced[m] : -1, w);
  };
  for (size_t i = 0; i < program.size(); ++i) {
    if (plan.steps[i].lane != 0) {
      last[plan.steps[i].lane] = int(i);
    } else {
      for (int w : plan.steps[i].waits) lane0_waits_for(w);
    }
  }
  for (int w : plan.final_waits) {
    EXPECT_TRUE(plan.steps[size_t(w)].mark);
    lane0_waits_for(w);
  }
  for (const auto& [m, l] : last) EXPECT_GE(synced.count(m) ? synced[m] : -1, l) << "lane " << m << " is not joined";
}

// Buffers: 0 X, 1 xn, 2 ids, 3 shared_out, 4 routed.
StageProgram two_layers() {
  StageProgram p;
  for (int l = 0; l < 2; ++l) {
    p.push_back(stage("attn", {0}, {1, 2}));
    p.push_back(stage("shared_expert", {1}, {3}));
    p.push_back(stage("experts", {1, 2}, {4}));
    p.push_back(stage("ffn_post", {4, 3}, {0}));
  }
  return p;
}

TEST(StageLanes, RoutedExpertsRunBesideTheSharedExpert) {
  const StageProgram p = two_layers();
  const LanePlan plan = plan_lanes(p, 2);
  const std::vector<int> lanes = {0, 0, 1, 0, 0, 0, 1, 0};
  for (size_t i = 0; i < p.size(); ++i) EXPECT_EQ(plan.steps[i].lane, lanes[i]) << p[i].name << " " << i;
  EXPECT_EQ(plan.steps[2].waits, std::vector<int>{0});  // experts after attn, not after the shared expert
  EXPECT_EQ(plan.steps[3].waits, std::vector<int>{2});  // ffn_post joins
  EXPECT_EQ(plan.steps[6].waits, std::vector<int>{4});
  EXPECT_EQ(plan.steps[7].waits, std::vector<int>{6});
  EXPECT_TRUE(plan.final_waits.empty());
  expect_honours_dependencies(p, plan);
}

TEST(StageLanes, OneLaneOrACommunicationStageKeepsProgramOrderOnLaneZero) {
  StageProgram p = two_layers();
  const LanePlan one = plan_lanes(p, 1);
  for (const LaneStep& s : one.steps) {
    EXPECT_EQ(s.lane, 0);
    EXPECT_TRUE(s.waits.empty());
  }
  EXPECT_TRUE(one.final_waits.empty());
  p.insert(p.begin() + 2, stage("dispatch", {1, 2}, {5}, StageKind::kComm));
  for (const LaneStep& s : plan_lanes(p, 2).steps) EXPECT_EQ(s.lane, 0);
}

TEST(StageLanes, ATrailingSideStageIsJoinedAtTheEnd) {
  StageProgram p;
  p.push_back(stage("a", {0}, {1}));
  p.push_back(stage("b", {1}, {2}));
  p.push_back(stage("c", {1}, {3}));  // beside b
  const LanePlan plan = plan_lanes(p, 2);
  EXPECT_EQ(plan.steps[2].lane, 1);
  EXPECT_EQ(plan.final_waits, std::vector<int>{2});
  expect_honours_dependencies(p, plan);
}

TEST(StageLanes, LaneOneForksFromLaneZeroEvenWithoutADependency) {
  StageProgram p;
  p.push_back(stage("a", {0}, {1}));
  p.push_back(stage("b", {1}, {2}));
  p.push_back(stage("free", {5}, {6}));  // reads and writes what no other stage touches
  const LanePlan plan = plan_lanes(p, 2);
  EXPECT_EQ(plan.steps[2].lane, 1);
  EXPECT_EQ(plan.steps[2].waits, std::vector<int>{1});
  expect_honours_dependencies(p, plan);
}

TEST(StageLanes, RandomProgramsHonourEveryDependency) {
  std::mt19937_64 g(testing::test_seed());
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 1 + int(g() % 40), buffers = 1 + int(g() % 8);
    StageProgram p;
    for (int i = 0; i < n; ++i) {
      std::vector<int> r, w;
      for (int k = int(g() % 4); k > 0; --k) r.push_back(int(g() % (buffers + 1)) - 1);  // -1: a null buffer
      for (int k = int(g() % 3); k > 0; --k) w.push_back(int(g() % (buffers + 1)) - 1);
      p.push_back(stage(fmt::format("s{}", i), r, w));
    }
    for (int lanes : {2, 3}) {
      const LanePlan plan = plan_lanes(p, lanes);
      SCOPED_TRACE(fmt::format("trial {}, {} lanes", trial, lanes));
      expect_honours_dependencies(p, plan);
      std::set<int> started;  // the first stage of each side lane waits for something
      for (size_t i = 0; i < p.size(); ++i)
        if (plan.steps[i].lane != 0 && started.insert(plan.steps[i].lane).second) {
          EXPECT_FALSE(plan.steps[i].waits.empty());
        }
    }
    if (::testing::Test::HasFailure()) return;
  }
}

TEST(StageLanes, RunsEveryStageOnceInProgramOrderOnTheCpu) {
  auto be = ops::make_cpu_backend(1);
  StageProgram p = two_layers();
  std::vector<int> order;
  for (size_t i = 0; i < p.size(); ++i) p[i].run = [&order, i] { order.push_back(int(i)); };
  run_on_lanes(p, *be);
  ASSERT_EQ(order.size(), p.size());
  for (size_t i = 0; i < order.size(); ++i) EXPECT_EQ(order[i], int(i));
  EXPECT_THROW(be->set_lane(1), std::exception);
}

// The model's own step program (tiny: CSA, HCA and window-only layers): which
// stages go beside which, and every dependency honoured.
TEST(StageLanes, TinyDecodeStepPutsTheSideChainsOnLaneOne) {
  const model::ModelConfig config = model::preset_config("tiny");
  const model::ModelWeights weights =
      model::bind_weights(config, testing::tiny_weights().lookup(), 0, config.n_routed_experts);
  auto be = ops::make_cpu_backend(1);
  RunnerOptions o;
  o.max_tokens_per_step = 4;
  o.max_seqs_per_step = 4;
  o.max_logit_rows = 4;
  o.max_blocks_per_seq = 4;
  o.cache.num_slots = 4;
  o.cache.num_pages = 16;
  ModelRunner runner(config, weights, *be, o);
  model::LocalMoeExecutor moe(*be);
  ops::BatchView batch;  // the program is only planned here, never run
  batch.num_tokens = 4;
  batch.num_seqs = 4;
  const model::StageProgram p = runner.model().step_program(runner.buffers(), batch, 4, runner.caches(), moe);
  const LanePlan plan = plan_lanes(p, 2);
  expect_honours_dependencies(p, plan);
  // Three lanes: the side chains spread over lanes 1 and 2.
  const LanePlan three = plan_lanes(p, 3);
  expect_honours_dependencies(p, three);
  std::set<int> side;
  for (const LaneStep& st : three.steps) side.insert(st.lane);
  EXPECT_EQ(side, (std::set<int>{0, 1, 2}));
  const std::map<std::string, int> lane_of = {{"attn_in", 0},       {"attn_q", 0},   {"index_in", 1},
                                              {"attn_kv", 1},       {"index_topk", 0}, {"q_rope", 1},
                                              {"compress", 1},      {"attn_core", 0}, {"attn_out", 0},
                                              {"window_commit", 1}, {"router", 0},   {"shared_expert", 1},
                                              {"experts", 0},       {"ffn_post", 0}};
  std::set<std::string> seen;
  for (size_t i = 0; i < p.size(); ++i) {
    const std::string& name = p[i].name;
    const size_t dot = name.find('.');
    if (name[0] != 'L' || dot == std::string::npos) {
      EXPECT_EQ(plan.steps[i].lane, 0) << name;  // embed, logits
      continue;
    }
    const std::string kind = name.substr(dot + 1);
    ASSERT_TRUE(lane_of.count(kind)) << "a stage this test does not know: " << name;
    EXPECT_EQ(plan.steps[i].lane, lane_of.at(kind)) << name;
    seen.insert(kind);
  }
  EXPECT_EQ(seen.size(), lane_of.size()) << "tiny should have every kind of layer stage";
}

}  // namespace
}  // namespace dsv4::engine
