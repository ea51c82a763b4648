// Fuzzed data-parallel schedules with in-process ranks (CPU): requests of
// random lengths arrive at random times in random order, some are cancelled
// at random moments, over 4 and 8 ranks with the all-to-all MoE path. The
// schedule must never hang (a collective mismatch would, until the timeout
// turned it into an error), every request must get its final event, the tokens
// of every request that ran to its end must equal the single-rank run (bit-
// identical path), as must the prompt log-probabilities of those that ask for them
// (a scoring prompt's chunks take a step's spare logits rows), a cancelled
// request's tokens must be a prefix of them, the
// per-step collective ledgers must agree, and the caches must be empty after.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "engine/engine_builder.h"
#include "test_util.h"

namespace dsv4::engine {
namespace {

struct Outcome {
  std::vector<int32_t> tokens;
  std::vector<float> prompt_logprobs;  // with the first token, where asked
  FinishReason reason = FinishReason::kNone;
  std::string error;
  bool finished = false;
};

struct Schedule {
  std::vector<RequestParams> requests;
  std::vector<int> delay_ms;   // before each submit
  std::vector<int> cancel_ms;  // after all submits, -1: never
};

Schedule make_schedule(uint64_t seed, int n) {
  std::mt19937_64 g(seed);
  Schedule s;
  for (int i = 0; i < n; ++i) {
    RequestParams p;
    const int len = 1 + int(g() % 60);
    for (int t = 0; t < len; ++t) p.prompt.push_back(int32_t(g() % 129280));
    p.max_tokens = 1 + int(g() % 24);
    p.ignore_eos = true;
    if (g() % 3 == 0) p.prompt_logprobs = int32_t(g() % 3);
    s.requests.push_back(p);
    s.delay_ms.push_back(int(g() % 4) == 0 ? int(g() % 30) : 0);
    s.cancel_ms.push_back(int(g() % 4) == 0 ? int(g() % 200) : -1);
  }
  return s;
}

EngineBuildOptions options(int dp) {
  EngineBuildOptions o;
  o.source.preset = "tiny";
  o.source.seed = 5;
  o.backend = "cpu";
  o.dp = dp;
  o.moe = dp > 1 ? MoeMode::kAllToAll : MoeMode::kLocal;
  o.max_num_seqs = 3;  // small, so requests queue and preempt
  o.max_num_batched_tokens = 64;
  o.prefill_chunk = 32;
  o.max_model_len = 128;
  o.comm.timeout = std::chrono::milliseconds(30000);
  o.check_ledger = true;
  return o;
}

std::vector<Outcome> run(ServingEngine& engine, const Schedule& s, bool with_cancels) {
  struct State {
    std::mutex m;
    std::condition_variable cv;
    std::vector<Outcome> out;
    size_t done = 0;
  };
  auto st = std::make_shared<State>();
  st->out.resize(s.requests.size());
  std::vector<int64_t> ids;
  for (size_t i = 0; i < s.requests.size(); ++i) {
    if (s.delay_ms[i] > 0) std::this_thread::sleep_for(std::chrono::milliseconds(s.delay_ms[i]));
    ids.push_back(engine.submit(s.requests[i], [st, i](const TokenEvent& e) {
      std::lock_guard<std::mutex> lock(st->m);
      Outcome& o = st->out[i];
      EXPECT_FALSE(o.finished) << "request " << i << ": an event after its final one";
      if (e.token >= 0) o.tokens.push_back(e.token);
      for (const PromptTokenLogprob& pl : e.prompt_logprobs) o.prompt_logprobs.push_back(pl.logprob);
      if (e.finished) {
        o.finished = true;
        o.reason = e.reason;
        o.error = e.error;
        ++st->done;
        st->cv.notify_all();
      }
    }));
  }
  if (with_cancels) {
    std::vector<std::pair<int, size_t>> cancels;
    for (size_t i = 0; i < s.requests.size(); ++i)
      if (s.cancel_ms[i] >= 0) cancels.emplace_back(s.cancel_ms[i], i);
    std::sort(cancels.begin(), cancels.end());
    int now = 0;
    for (const auto& [at, i] : cancels) {
      std::this_thread::sleep_for(std::chrono::milliseconds(at - now));
      now = at;
      engine.cancel(ids[i]);
    }
  }
  std::unique_lock<std::mutex> lock(st->m);
  EXPECT_TRUE(st->cv.wait_for(lock, std::chrono::seconds(180), [&] { return st->done == s.requests.size(); }))
      << st->done << " of " << s.requests.size() << " requests finished: the schedule hung";
  return st->out;
}

TEST(DpFuzz, RandomSchedulesNeverHangAndMatchOneRank) {
  const uint64_t seed = testing::test_seed();
  for (int round = 0; round < 1; ++round) {
    const Schedule s = make_schedule(seed + round, 20);
    auto single = build_serving_engine(options(1));
    const auto ref = run(*single, s, false);
    single->shutdown(true);
    for (int dp : {4, 8}) {
      auto engine = build_serving_engine(options(dp));
      const auto got = run(*engine, s, true);
      engine->shutdown(true);
      const EngineStats stats = engine->stats();
      EXPECT_EQ(stats.running, 0) << "dp " << dp;
      EXPECT_EQ(stats.waiting, 0) << "dp " << dp;
      EXPECT_EQ(stats.kv_usage, 0.0) << "dp " << dp << ": cache pages still in use";
      int cancelled = 0;
      for (size_t i = 0; i < s.requests.size(); ++i) {
        const auto& g = got[i];
        const auto& r = ref[i];
        ASSERT_TRUE(g.finished) << "dp " << dp << " request " << i;
        EXPECT_EQ(g.error, "") << "dp " << dp << " request " << i;
        ASSERT_LE(g.tokens.size(), r.tokens.size()) << "dp " << dp << " request " << i;
        EXPECT_TRUE(std::equal(g.tokens.begin(), g.tokens.end(), r.tokens.begin()))
            << "dp " << dp << " request " << i << " (seed " << seed + round << ")";
        if (!g.tokens.empty()) {
          EXPECT_EQ(g.prompt_logprobs, r.prompt_logprobs) << "dp " << dp << " request " << i;
          EXPECT_EQ(r.prompt_logprobs.size(),
                    s.requests[i].prompt_logprobs >= 0 ? s.requests[i].prompt.size() - 1 : 0u) << "request " << i;
        }
        if (g.reason == FinishReason::kCancelled) ++cancelled;
        else EXPECT_EQ(g.tokens.size(), r.tokens.size()) << "dp " << dp << " request " << i;
      }
      std::printf("round %d dp %d: %lld steps, %d of %zu requests cancelled, %lld preemptions\n", round, dp,
                  (long long)stats.steps, cancelled, s.requests.size(), (long long)stats.preemptions);
    }
  }
}

}  // namespace
}  // namespace dsv4::engine
