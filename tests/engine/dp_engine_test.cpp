// Data-parallel attention + expert-parallel MoE with in-process ranks (CPU):
// --dp 2 and 3 give the single-rank logits over 100+ decode steps with uneven
// per-rank batches and idle ranks; a vanished rank makes the others fail fast.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <random>

#include "engine/dp_engine.h"
#include "engine/engine_builder.h"
#include "test_util.h"

namespace dsv4::engine {
namespace {

struct Result {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<std::vector<float>>> logits;
  // Where asked: each token's log-probability, then the alternatives' (id, log-probability) pairs.
  std::vector<std::vector<std::vector<float>>> logprobs;
  std::vector<std::string> errors;
};

std::vector<RequestParams> workload() {
  // Uneven: different prompt lengths and output lengths, so ranks run different
  // batch sizes and go idle at different times; greedy and sampled.
  std::mt19937_64 g(testing::test_seed());
  std::vector<RequestParams> reqs;
  const int prompt_len[] = {37, 5, 150, 12, 64};
  const int out_len[] = {104, 24, 40, 7, 30};
  for (int i = 0; i < 5; ++i) {
    RequestParams p;
    for (int t = 0; t < prompt_len[i]; ++t) p.prompt.push_back(int32_t(g() % 129280));
    p.max_tokens = out_len[i];
    p.ignore_eos = true;
    p.return_logits = true;
    // Two sampled requests (each rank chooses its rows' tokens on its backend: the same law
    // and the same logits give the same tokens as one rank).
    if (i == 1) p.sampling.temperature = 1.0f, p.sampling.top_p = 0.9f, p.sampling.seed = 11;
    if (i == 3) p.sampling.temperature = 0.7f, p.sampling.top_k = 30, p.sampling.seed = 12;
    // Log-probabilities, by each rank's backend from its rows.
    if (i == 2) p.logprobs = 3;
    if (i == 3) p.logprobs = 0;
    reqs.push_back(p);
  }
  return reqs;
}

// Submits every request and waits until those that `awaited(rank)` accepts
// (default: all) have finished. The callbacks share ownership of what they
// write, so events that arrive after the wait (a shutdown finishing the
// requests of a vanished rank) land safely.
Result run(ServingEngine& engine, const std::vector<RequestParams>& reqs,
           const std::function<bool(int rank)>& awaited = nullptr,
           std::chrono::seconds timeout = std::chrono::seconds(300)) {
  struct State {
    std::mutex m;
    std::condition_variable cv;
    Result r;
    std::vector<bool> finished;
    std::vector<int64_t> ids;
  };
  auto st = std::make_shared<State>();
  st->r.tokens.resize(reqs.size());
  st->r.logits.resize(reqs.size());
  st->r.logprobs.resize(reqs.size());
  st->r.errors.resize(reqs.size());
  st->finished.assign(reqs.size(), false);
  st->ids.assign(reqs.size(), -1);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const int64_t id = engine.submit(reqs[i], [st, i](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(st->m);
      if (e.token >= 0) {
        st->r.tokens[i].push_back(e.token);
        st->r.logits[i].emplace_back(e.logits, e.logits + e.vocab);
        std::vector<float> lp = {e.logprob};
        for (const ops::TokenLogprob& a : e.top_logprobs) lp.insert(lp.end(), {float(a.id), a.logprob});
        st->r.logprobs[i].push_back(lp);
      }
      if (e.finished) {
        st->r.errors[i] = e.error;
        st->finished[i] = true;
        st->cv.notify_all();
      }
    });
    std::lock_guard<std::mutex> lock(st->m);
    st->ids[i] = id;
  }
  auto all_done = [&] {
    for (size_t i = 0; i < reqs.size(); ++i)
      if (!st->finished[i] && (!awaited || awaited(int(st->ids[i] % DpServingEngine::kRankStride)))) return false;
    return true;
  };
  std::unique_lock<std::mutex> lock(st->m);
  EXPECT_TRUE(st->cv.wait_for(lock, timeout, all_done)) << "requests did not finish in " << timeout.count() << " s";
  return st->r;
}

EngineBuildOptions options(int dp, MoeMode moe) {
  EngineBuildOptions o;
  o.source.preset = "tiny";
  o.source.seed = 3;
  o.backend = "cpu";
  o.dp = dp;
  o.moe = moe;
  o.max_num_seqs = 4;
  o.max_num_batched_tokens = 128;
  o.prefill_chunk = 64;
  o.max_model_len = 512;
  o.comm.timeout = std::chrono::milliseconds(20000);
  o.check_ledger = true;
  return o;
}

// What build_serving_engine makes of options(dp, moe), for tests that set the engine's own
// options (a warm-up, a step hook) on top.
DpEngineOptions engine_options(int dp, MoeMode moe) {
  const EngineBuildOptions o = options(dp, moe);
  DpEngineOptions e;
  e.ranks.dp = dp;
  e.ranks.moe = moe;
  e.ranks.source = o.source;
  e.ranks.comm = o.comm;
  e.scheduler.max_num_seqs = o.max_num_seqs;
  e.scheduler.max_num_batched_tokens = o.max_num_batched_tokens;
  e.scheduler.prefill_chunk = o.prefill_chunk;
  e.scheduler.max_model_len = o.max_model_len;
  e.runner.max_tokens_per_step = o.max_num_batched_tokens;
  e.runner.max_seqs_per_step = o.max_num_seqs;
  e.runner.max_logit_rows = o.max_num_seqs;
  e.runner.max_blocks_per_seq = 2;  // 512 tokens
  e.runner.cache.num_slots = o.max_num_seqs;
  e.runner.cache.num_pages = 8;
  return e;
}

class DpEngine : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto single = build_serving_engine(options(1, MoeMode::kLocal));
    reference_ = new Result(run(*single, workload()));
  }
  static void TearDownTestSuite() { delete reference_; }
  static Result* reference_;
};
Result* DpEngine::reference_ = nullptr;

TEST_F(DpEngine, AllToAllIsBitIdenticalToOneRank) {
  for (int dp : {2, 3}) {
    auto engine = build_serving_engine(options(dp, MoeMode::kAllToAll));
    const Result r = run(*engine, workload());
    for (size_t i = 0; i < r.tokens.size(); ++i) {
      EXPECT_EQ(r.errors[i], "");
      ASSERT_EQ(r.tokens[i], reference_->tokens[i]) << "dp " << dp << " request " << i;
      for (size_t t = 0; t < r.logits[i].size(); ++t)
        ASSERT_EQ(r.logits[i][t], reference_->logits[i][t]) << "dp " << dp << " request " << i << " token " << t;
      EXPECT_EQ(r.logprobs[i], reference_->logprobs[i]) << "dp " << dp << " request " << i;
    }
    EXPECT_EQ(r.logprobs[2].front().size(), 7u);  // the token's and 3 alternatives'
  }
}

TEST_F(DpEngine, AllGatherMatchesOneRankWithinFp32Rounding) {
  // The reduce-scatter adds per-rank partial sums, so a row whose experts live
  // on several ranks sums in another association than one rank's ascending
  // order: equal up to fp32 rounding of the routed sum (then bf16). With tiny's
  // top-2 every association is the same, so this is exact here; the bound below
  // is what the path guarantees for any top-k.
  for (int dp : {2, 3}) {
    auto engine = build_serving_engine(options(dp, MoeMode::kAllGather));
    const Result r = run(*engine, workload());
    double worst = 0;
    for (size_t i = 0; i < r.tokens.size(); ++i) {
      EXPECT_EQ(r.errors[i], "");
      ASSERT_EQ(r.logits[i].size(), reference_->logits[i].size());
      for (size_t t = 0; t < r.logits[i].size(); ++t)
        for (size_t v = 0; v < r.logits[i][t].size(); v += 7)
          worst = std::max(worst, double(std::fabs(r.logits[i][t][v] - reference_->logits[i][t][v])));
    }
    EXPECT_LE(worst, 1e-3) << "dp " << dp;
  }
}

// The CPU backend's quantized-dot model (generate --cpu-quant-dot hopper) reaches the
// backend of a single rank and of every data-parallel rank: two all-to-all ranks with
// the Hopper model equal one rank with it bit for bit, and both differ from the fp32
// reference (tiny's linears are FP8, its experts FP4).
TEST_F(DpEngine, CpuQuantDotModelReachesEveryRank) {
  auto reqs = workload();
  reqs.resize(3);
  for (auto& r : reqs) r.max_tokens = 3;
  EngineBuildOptions one = options(1, MoeMode::kLocal), two = options(2, MoeMode::kAllToAll);
  one.cpu_quant_dot = two.cpu_quant_dot = ops::QuantDotModel::kHopperWgmma;
  const Result r1 = run(*build_serving_engine(one), reqs), r2 = run(*build_serving_engine(two), reqs);
  bool differs = false;
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(r1.errors[i], "");
    EXPECT_EQ(r2.errors[i], "");
    ASSERT_EQ(r2.tokens[i], r1.tokens[i]) << "request " << i;
    ASSERT_EQ(r2.logits[i], r1.logits[i]) << "request " << i;
    ASSERT_FALSE(r1.logits[i].empty());
    // The first logits row depends on the prompt only: comparable with the reference.
    differs = differs || r1.logits[i][0] != reference_->logits[i][0];
  }
  EXPECT_TRUE(differs) << "the Hopper model changed no logit: it did not reach the CPU backend";
}

TEST_F(DpEngine, IdleRanksRunEmptySteps) {
  // Two requests over three ranks: rank 2 never has work but must join every step.
  auto reqs = workload();
  reqs.resize(2);
  auto engine = build_serving_engine(options(3, MoeMode::kAllToAll));
  const Result r = run(*engine, reqs);
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(r.tokens[i], reference_->tokens[i]);
  engine->shutdown(true);
  const EngineStats s = engine->stats();
  EXPECT_EQ(s.running, 0);
  EXPECT_EQ(s.finished_requests, 2);
}

// Every rank warms up at construction (a prefill step, then each decode bucket's graph),
// together: the all-gather ranks' exchanges meet. Their answers are then those of one rank.
TEST_F(DpEngine, RanksWarmUpTogetherAndLeaveNoTrace) {
  DpEngineOptions dp = engine_options(2, MoeMode::kAllGather);
  dp.runner.use_graphs = true;  // (the CPU backend records a graph as the function it calls again)
  dp.warm_up = true;
  dp.check_ledger = true;
  DpServingEngine engine(dp);
  ASSERT_EQ(engine.warm_ups().size(), 2u);
  for (const WarmUpReport& w : engine.warm_ups()) {
    EXPECT_EQ(w.prefill_tokens, 128);
    EXPECT_EQ(w.graph_buckets, (std::vector<int32_t>{4, 2, 1}));
  }
  const std::string line = describe_warm_ups(engine.warm_ups());
  EXPECT_NE(line.find("a prefill step of 128 tokens and the decode graphs of 4, 2, 1 rows"), std::string::npos) << line;
  const Result r = run(engine, workload());
  double worst = 0;
  for (size_t i = 0; i < r.tokens.size(); ++i) {
    EXPECT_EQ(r.errors[i], "");
    ASSERT_EQ(r.tokens[i], reference_->tokens[i]) << "request " << i;
    for (size_t t = 0; t < r.logits[i].size(); ++t)
      for (size_t v = 0; v < r.logits[i][t].size(); v += 7)
        worst = std::max(worst, double(std::fabs(r.logits[i][t][v] - reference_->logits[i][t][v])));
  }
  EXPECT_LE(worst, 1e-3);  // as AllGatherMatchesOneRankWithinFp32Rounding
  engine.shutdown(true);
}

// The start-up line names the slowest rank's time and the rank with the least memory left.
TEST(DescribeWarmUps, NamesTheStepsAndTheTightestRank) {
  EXPECT_EQ(describe_warm_ups({}), "no warm-up");
  WarmUpReport a, b;
  a.prefill_tokens = b.prefill_tokens = 512;
  a.graph_buckets = b.graph_buckets = {64, 8, 1};
  a.seconds = 1.25;
  b.seconds = 2.5;
  a.free_before = uint64_t(5e9);
  a.free_after = uint64_t(4e9);
  b.free_before = uint64_t(4e9);
  b.free_after = uint64_t(1.5e9);
  EXPECT_EQ(describe_warm_ups({a}),
            "warmed up in 1.2 s: a prefill step of 512 tokens and the decode graphs of 64, 8, 1 rows; they took "
            "1.00 GB, 4.00 GB are free after");
  EXPECT_EQ(describe_warm_ups({a, b}),
            "warmed up in 2.5 s: a prefill step of 512 tokens and the decode graphs of 64, 8, 1 rows; they took "
            "2.50 GB, 1.50 GB are free after (the rank with the least)");
  WarmUpReport none;
  EXPECT_EQ(describe_warm_ups({none}), "warmed up in 0.0 s: nothing to run");
}

TEST(DpEngineFailure, VanishedRankMakesTheOthersFailFast) {
  DpEngineOptions dp = engine_options(3, MoeMode::kAllGather);
  dp.ranks.comm.timeout = std::chrono::milliseconds(400);
  dp.rank_step_hook = [](int rank, int64_t step) { return !(rank == 1 && step == 6); };  // rank 1 dies
  DpServingEngine engine(dp);
  auto reqs = workload();
  const auto start = std::chrono::steady_clock::now();
  // Rank 1's own requests have no thread left to finish them until shutdown;
  // the others must fail fast, naming rank 1.
  const Result r = run(engine, reqs, [](int rank) { return rank != 1; }, std::chrono::seconds(30));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(s, 10.0);
  bool named = false;
  for (const auto& e : r.errors) named = named || (e.find("rank 1") != std::string::npos && e.find("timed out") != std::string::npos);
  EXPECT_TRUE(named) << "errors: " << r.errors[0] << " | " << r.errors[2];
  EXPECT_NE(engine.failure(), "");
  // Shutdown gives rank 1's requests their final event too: nothing is lost.
  engine.shutdown(false);
}

}  // namespace
}  // namespace dsv4::engine
