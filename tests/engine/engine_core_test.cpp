// The serving engine core on `tiny`: continuous batching gives the same tokens
// as offline generation, preemption + recompute changes nothing, cancels and
// finishes release every slot and page.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <random>

#include "engine/engine_core.h"
#include "core/error.h"
#include "engine/generator.h"
#include "model/weights.h"
#include "ops/cpu/primitives.h"
#include "served_tokens_check.h"
#include "test_util.h"

namespace dsv4::engine {
namespace {

class EngineCoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = model::preset_config("tiny");
    weights_ = model::bind_weights(config_, testing::tiny_weights().lookup(), 0, config_.n_routed_experts);
  }
  // The fixture's runners: tiny, 256 token rows a step, 4 pages a sequence. `reserve`: pages
  // from the free memory (RunnerOptions::cache_pages_from_free_memory) less it, at most `pages`.
  std::unique_ptr<ModelRunner> make_runner(int64_t slots, int64_t pages, std::optional<uint64_t> reserve = {},
                                           int32_t logit_rows = 32) {
    RunnerOptions o;
    o.max_tokens_per_step = 256;
    o.max_seqs_per_step = 32;
    o.max_logit_rows = logit_rows;
    o.max_blocks_per_seq = 4;
    o.cache.num_slots = slots;
    o.cache.num_pages = pages;
    o.cache_pages_from_free_memory = reserve.has_value();
    o.cache_memory_reserve = reserve.value_or(0);
    return std::make_unique<ModelRunner>(config_, weights_, *backend_, o);
  }
  // Up to `seqs` sequences a step, 256 tokens, sequences of up to 1024.
  static SchedulerConfig scheduler_config(int32_t seqs) {
    SchedulerConfig sc;
    sc.max_num_seqs = seqs;
    sc.max_num_batched_tokens = 256;
    sc.max_model_len = 1024;
    return sc;
  }
  std::vector<int32_t> tokens(int n, uint64_t salt) {
    std::mt19937_64 g(testing::test_seed() + salt);
    std::vector<int32_t> t;
    for (int i = 0; i < n; ++i) t.push_back(int32_t(g() % 129280));
    return t;
  }
  // Runs requests to completion; returns generated ids per request (submit order).
  std::vector<std::vector<int32_t>> serve(EngineCore& core, const std::vector<RequestParams>& reqs,
                                          std::vector<FinishReason>* reasons = nullptr) {
    std::map<int64_t, size_t> index;
    std::vector<std::vector<int32_t>> out(reqs.size());
    std::vector<FinishReason> why(reqs.size(), FinishReason::kNone);
    for (size_t i = 0; i < reqs.size(); ++i) {
      const int64_t id = core.submit(reqs[i], [&, i](const TokenEvent& e) {
        if (e.token >= 0) out[i].push_back(e.token);
        if (e.finished) why[i] = e.reason;
      });
      index[id] = i;
    }
    for (int guard = 0; core.has_work() && guard < 100000; ++guard) core.step();
    if (reasons) *reasons = why;
    return out;
  }
  model::ModelConfig config_;
  model::ModelWeights weights_;
  std::unique_ptr<ops::Backend> backend_ = ops::make_cpu_backend(2);
};

// The runner's caches (the fixture's runners: tiny on the CPU).
using ModelRunnerTest = EngineCoreTest;

// DSV4_SEPARATE_METADATA=1 (memcheck runs) puts each of a step's metadata arrays in a buffer
// of its own, uploaded on its own: the same generation, token for token and logit for logit.
TEST_F(ModelRunnerTest, SeparateMetadataBuffersGiveTheSameSteps) {
  std::vector<GenerateRequest> reqs(3);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = tokens(7 + 19 * int(i), 900 + i);
    reqs[i].max_new_tokens = 4;
    reqs[i].sampling.temperature = i == 1 ? 0.9f : 0.0f;
    reqs[i].sampling.seed = 5;
  }
  const auto run = [&](bool separate, std::vector<std::vector<float>>* rows) {
    if (separate) setenv("DSV4_SEPARATE_METADATA", "1", 1);
    auto runner = make_runner(4, 16);
    unsetenv("DSV4_SEPARATE_METADATA");
    IndexPool slots(4), pages(16);
    GenerateOptions go;
    go.prefill_chunk = 16;  // several prefill steps, some with no logits rows
    return generate(*runner, slots, pages, reqs, go, [&](int, int, const float* row, int32_t) {
      rows->emplace_back(row, row + config_.vocab_size);
    });
  };
  std::vector<std::vector<float>> one_buffer, separate;
  EXPECT_EQ(run(false, &one_buffer), run(true, &separate));
  EXPECT_EQ(one_buffer, separate);
  EXPECT_EQ(one_buffer.size(), 12u);
}

// The runner checks its caches against the free memory from what the backend's
// cache_cost says they take: it must be what they take (slots + 1: the padding slot).
TEST_F(ModelRunnerTest, CacheBytesAreWhatTheCachesTake) {
  const auto runner = make_runner(3, 7);
  ops::CacheGeometry g = runner->options().cache;
  g.num_slots += 1;
  EXPECT_EQ(runner->model().cache_bytes(g), testing::cache_tensor_bytes(runner->caches()));
  EXPECT_GT(runner->model().cache_bytes(g), 0u);
}

// A KV cache larger than the free memory fails before any of it is allocated, with the
// sizes and what to change (2^40 pages: more than any host has free).
TEST_F(ModelRunnerTest, AKvCacheLargerThanFreeMemoryFailsBeforeAllocating) {
  ASSERT_TRUE(backend_->memory_available().has_value());
  std::string error;
  try {
    make_runner(4, int64_t(1) << 40);
  } catch (const core::Error& e) {
    error = e.what();
  }
  EXPECT_NE(error.find("the KV cache (1099511627776 pages of 256 tokens, 5 state slots"), std::string::npos) << error;
  EXPECT_NE(error.find("GB are free on the host"), std::string::npos) << error;
  EXPECT_NE(error.find("--kv-cache-memory"), std::string::npos) << error;
}

// The pages that fit (serve --kv-cache-memory auto): free less the reserve and the state
// slots, whole pages, at most `most`; none where the reserve and slots take it all.
TEST(CachePagesThatFit, WholePagesOfWhatIsLeftAtMostTheCap) {
  EXPECT_EQ(cache_pages_that_fit(1000, 100, 50, 100, 1 << 20), 8);  // 850 bytes: 8 pages
  EXPECT_EQ(cache_pages_that_fit(1000, 100, 50, 100, 5), 5);
  EXPECT_EQ(cache_pages_that_fit(1000, 900, 100, 100, 5), 0);
  EXPECT_EQ(cache_pages_that_fit(1000, 900, 101, 100, 5), 0);   // (the reserve and slots exceed free)
  EXPECT_EQ(cache_pages_that_fit(1000, 0, 0, 0, 7), 7);         // pages that cost nothing
  EXPECT_EQ(cache_pages_that_fit(uint64_t(1) << 40, uint64_t(1) << 39, 0, 1, int64_t(1) << 50), int64_t(1) << 39);
}

// The runner sizes its pages so from what its backend has free after the step's buffers:
// with a reserve leaving ~256 MiB, its caches take about that (at most that plus what the
// host's free memory grew by meanwhile, allowed 1 GiB) and more than one sequence; a smaller
// cap is kept as given.
TEST_F(ModelRunnerTest, KvCachePagesFromFreeMemoryTakeWhatFits) {
  const uint64_t leave = uint64_t(256) << 20;
  // A runner of at most `pages` pages whose reserve leaves `leave` of what is free now; null
  // where other processes took that much of the host's memory meanwhile (then skipped).
  const auto runner_leaving = [&](int64_t pages) -> std::unique_ptr<ModelRunner> {
    const uint64_t free = backend_->memory_available().value();
    if (free < 8 * leave) return nullptr;
    try {
      return make_runner(3, pages, free - leave);
    } catch (const core::Error& e) {
      std::printf("the host's free memory moved: %s\n", e.what());
      return nullptr;
    }
  };
  std::unique_ptr<ModelRunner> runner = runner_leaving(int64_t(1) << 30);
  if (!runner) GTEST_SKIP() << "needs 2 GiB of free host memory that stays free for the test";
  ops::CacheGeometry g = runner->options().cache;
  g.num_slots += 1;
  EXPECT_LE(runner->model().cache_bytes(g), leave + (uint64_t(1) << 30));
  EXPECT_GT(g.num_pages, 4);
  EXPECT_LT(g.num_pages, int64_t(1) << 30);
  runner.reset();
  runner = runner_leaving(7);
  if (!runner) GTEST_SKIP() << "the host's free memory moved";
  EXPECT_EQ(runner->options().cache.num_pages, 7);
}

// A reserve that leaves less than one sequence's pages fails before anything is allocated,
// naming what to change.
TEST_F(ModelRunnerTest, KvCachePagesFromFreeMemoryFailBelowOneSequence) {
  std::string error;
  try {
    make_runner(3, 64, uint64_t(1) << 62);
  } catch (const core::Error& e) {
    error = e.what();
  }
  EXPECT_NE(error.find("--kv-cache-memory auto: "), std::string::npos) << error;
  EXPECT_NE(error.find("room for 0 pages"), std::string::npos) << error;
  EXPECT_NE(error.find("--kv-cache-reserve"), std::string::npos) << error;
}

TEST_F(EngineCoreTest, ContinuousBatchingMatchesOfflineGeneration) {
  std::vector<RequestParams> reqs;
  std::vector<GenerateRequest> offline;
  for (int i = 0; i < 6; ++i) {
    RequestParams p;
    p.prompt = tokens(5 + 47 * i, uint64_t(i));
    p.max_tokens = 7 + i;
    p.ignore_eos = true;
    reqs.push_back(p);
    GenerateRequest g;
    g.prompt = p.prompt;
    g.max_new_tokens = p.max_tokens;
    offline.push_back(g);
  }
  auto runner = make_runner(8, 32);
  SchedulerConfig sc;
  sc.max_num_seqs = 4;  // forces waiting and admission as others finish
  sc.max_num_batched_tokens = 64;
  sc.prefill_chunk = 40;
  sc.max_model_len = 1024;
  EngineCore core(*runner, sc, int32_t(config_.eos_token_id));
  const auto served = serve(core, reqs);
  auto runner2 = make_runner(8, 32);
  IndexPool slots(8), pages(32);
  const auto expect = generate(*runner2, slots, pages, offline, {});
  EXPECT_EQ(served, expect);
  const EngineStats st = core.stats();
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.waiting, 0);
  EXPECT_EQ(st.free_pages, 32);
  EXPECT_EQ(st.finished_requests, 6);
}

// One step holds greedy rows (their tokens from the backend's argmax_rows, no logits row on
// the host), sampled rows (whole vocabulary, top-k, top-p; sampled in parallel) and a row that
// returns its logits: every request gets the tokens offline generation gives it (each row
// sampled alone, in order), and the returned logits rows are the offline ones, bit for bit.
// Every served token, greedy or sampled, is the host reference's choice from the row it came
// from (the backend chose it: Backend::choose_tokens).
TEST_F(EngineCoreTest, ServedTokensAreTheLawOfTheirRows) {
  auto runner = make_runner(8, 32);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 8; ++i) prompts.push_back(tokens(5 + 11 * i, 400 + uint64_t(i)));
  EXPECT_GT(testing::expect_served_tokens_follow_the_law(*runner, int32_t(config_.eos_token_id), prompts, 6), 0);
}

// A token's log-probabilities come from the backend's record of its row (Backend::token_logprobs),
// not from the row a request may also return: the same values whether it does or not, beside
// requests that ask for none; out-of-range counts are refused by name.
TEST_F(EngineCoreTest, LogprobsDoNotDependOnReturningTheRow) {
  auto runner = make_runner(8, 32);
  EngineCore core(*runner, scheduler_config(8), int32_t(config_.eos_token_id));
  struct Seen {
    std::vector<float> logprob;
    std::vector<std::vector<ops::TokenLogprob>> top;
    int rows = 0;  // events that carried the logits row
  };
  std::vector<Seen> seen(3);
  std::vector<std::vector<int32_t>> ids(3);
  for (int i = 0; i < 3; ++i) {
    RequestParams p;
    p.prompt = tokens(21, 600);
    p.max_tokens = 5;
    p.ignore_eos = true;
    p.sampling.temperature = 0.9f;
    p.sampling.seed = 4242;
    p.return_logits = i == 0;
    p.logprobs = i < 2 ? 3 : -1;
    core.submit(p, [&, i](const TokenEvent& e) {
      if (e.token < 0) return;
      ids[size_t(i)].push_back(e.token);
      seen[size_t(i)].logprob.push_back(e.logprob);
      seen[size_t(i)].top.push_back(e.top_logprobs);
      seen[size_t(i)].rows += e.logits != nullptr;
    });
  }
  for (int guard = 0; core.has_work() && guard < 1000; ++guard) core.step();
  EXPECT_EQ(ids[0], ids[1]);
  EXPECT_EQ(ids[0], ids[2]);
  EXPECT_EQ(seen[0].rows, 5);
  EXPECT_EQ(seen[1].rows, 0);
  EXPECT_EQ(seen[0].logprob, seen[1].logprob);
  ASSERT_EQ(seen[1].top.size(), 5u);
  for (size_t t = 0; t < 5; ++t) {
    ASSERT_EQ(seen[0].top[t].size(), 3u);
    ASSERT_EQ(seen[1].top[t].size(), 3u);
    for (size_t j = 0; j < 3; ++j) {
      EXPECT_EQ(seen[0].top[t][j].id, seen[1].top[t][j].id);
      EXPECT_EQ(seen[0].top[t][j].logprob, seen[1].top[t][j].logprob);
    }
    EXPECT_LE(seen[1].logprob[t], 0.0f);
    EXPECT_GE(seen[1].top[t][0].logprob, seen[1].top[t][2].logprob);
    EXPECT_TRUE(seen[2].top[t].empty());
  }
  for (const int32_t bad : {-2, kMaxLogprobs + 1}) {
    RequestParams p;
    p.prompt = tokens(4, 601);
    p.logprobs = bad;
    std::string error;
    EXPECT_EQ(core.submit(p, nullptr, &error), -1);
    EXPECT_NE(error.find("logprobs must be -1 (none) or 0 to 20, got " + std::to_string(bad)), std::string::npos)
        << error;
  }
}

// Prompt log-probabilities (RequestParams::prompt_logprobs) are the law's (ops::ref) on the rows
// of the prompt's one-shot prefill, whatever chunks the scheduler cut it into: here at most 12
// logits rows a step beside decoding requests, so scoring chunks are cut to what is left. They
// arrive with the first token, one a prompt token after the first; scoring changes no token;
// a preemption and recompute neither scores again nor changes them.
TEST_F(EngineCoreTest, PromptLogprobsAreTheLawOnTheOneShotPrefillsRows) {
  const int32_t lengths[] = {1, 2, 29, 230, 40, 200};
  const int32_t asked[] = {3, 0, 5, 20, -1, -1};  // the last two only decode beside them
  std::vector<RequestParams> reqs;
  for (size_t i = 0; i < std::size(lengths); ++i) {
    RequestParams p;
    p.prompt = tokens(lengths[i], 700 + i);
    p.max_tokens = 60;  // (the long ones grow into a second page: the tight run preempts)
    p.ignore_eos = true;
    p.sampling.temperature = i % 2 ? 0.8f : 0.0f;
    p.sampling.seed = 77 + i;
    p.prompt_logprobs = asked[i];
    p.logprobs = i == 3 ? 2 : -1;
    reqs.push_back(p);
  }
  SchedulerConfig sc;
  sc.max_num_seqs = 4;
  sc.max_num_batched_tokens = 64;
  sc.prefill_chunk = 40;
  sc.max_model_len = 1024;
  sc.max_logit_rows = 12;
  struct Served {
    std::vector<std::vector<int32_t>> ids;
    std::vector<std::vector<PromptTokenLogprob>> prompt;
    std::vector<int> events_with_prompt;
  };
  const auto run = [&](EngineCore& core, const std::vector<RequestParams>& rs) {
    Served out{std::vector<std::vector<int32_t>>(rs.size()), std::vector<std::vector<PromptTokenLogprob>>(rs.size()),
               std::vector<int>(rs.size(), 0)};
    for (size_t i = 0; i < rs.size(); ++i)
      core.submit(rs[i], [&out, i](const TokenEvent& e) {
        if (e.token >= 0) out.ids[i].push_back(e.token);
        if (!e.prompt_logprobs.empty() || (e.token >= 0 && out.ids[i].size() == 1)) {
          out.events_with_prompt[i] += !e.prompt_logprobs.empty();
          if (out.ids[i].size() == 1) out.prompt[i] = e.prompt_logprobs;
        }
      });
    for (int guard = 0; core.has_work() && guard < 100000; ++guard) core.step();
    return out;
  };
  auto runner = make_runner(8, 40);
  EngineCore core(*runner, sc, int32_t(config_.eos_token_id));
  const Served got = run(core, reqs);

  // The reference: each prompt prefilled in one step with every row's logits, scored by the law.
  auto ref_runner = make_runner(8, 40, std::nullopt, 256);
  const int64_t V = config_.vocab_size;
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    const std::vector<int32_t>& prompt = reqs[i].prompt;
    if (asked[i] < 0) {
      EXPECT_TRUE(got.prompt[i].empty());
      EXPECT_EQ(got.events_with_prompt[i], 0);
      continue;
    }
    ASSERT_EQ(got.prompt[i].size(), prompt.size() - 1);
    EXPECT_EQ(got.events_with_prompt[i], prompt.size() > 1 ? 1 : 0);
    std::vector<int32_t> pages = {int32_t(i)};  // (a fresh slot and page a prompt)
    SequenceSlice s;
    s.state_slot = int32_t(i);
    s.tokens = prompt.data();
    s.num_tokens = int32_t(prompt.size());
    s.block_table = &pages;
    s.want_all_logits = true;
    std::vector<float> rows;
    ref_runner->step(build_step_metadata({s}), &rows);
    ASSERT_EQ(rows.size(), prompt.size() * size_t(V));
    for (size_t p = 0; p + 1 < prompt.size(); ++p) {
      const PromptTokenLogprob& pl = got.prompt[i][p];
      std::vector<ops::TokenLogprob> top(static_cast<size_t>(asked[i]));
      const float want = ops::ref::token_logprobs(rows.data() + p * size_t(V), V, prompt[p + 1], top.data(), asked[i]);
      EXPECT_EQ(pl.token, prompt[p + 1]) << "position " << p;
      EXPECT_EQ(pl.logprob, want) << "position " << p;
      ASSERT_EQ(pl.top.size(), top.size()) << "position " << p;
      for (size_t j = 0; j < top.size(); ++j) {
        EXPECT_EQ(pl.top[j].id, top[j].id) << "position " << p << " alternative " << j;
        EXPECT_EQ(pl.top[j].logprob, top[j].logprob) << "position " << p << " alternative " << j;
      }
    }
  }
  // Scoring changes no token.
  std::vector<RequestParams> plain = reqs;
  for (RequestParams& p : plain) p.prompt_logprobs = -1;
  auto runner2 = make_runner(8, 40);
  EngineCore plain_core(*runner2, sc, int32_t(config_.eos_token_id));
  EXPECT_EQ(run(plain_core, plain).ids, got.ids);
  // Too few pages: requests are preempted and recomputed, scores and tokens the same.
  auto small = make_runner(8, 3);
  EngineCore tight(*small, sc, int32_t(config_.eos_token_id));
  const Served again = run(tight, reqs);
  EXPECT_GT(tight.stats().preemptions, 0);
  EXPECT_EQ(again.ids, got.ids);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(again.events_with_prompt[i], got.events_with_prompt[i]) << "request " << i;
    ASSERT_EQ(again.prompt[i].size(), got.prompt[i].size()) << "request " << i;
    for (size_t p = 0; p < got.prompt[i].size(); ++p) {
      EXPECT_EQ(again.prompt[i][p].logprob, got.prompt[i][p].logprob) << "request " << i << " position " << p;
      EXPECT_EQ(again.prompt[i][p].top.size(), got.prompt[i][p].top.size());
    }
  }
  RequestParams bad;
  bad.prompt = tokens(4, 701);
  bad.prompt_logprobs = kMaxLogprobs + 1;
  std::string error;
  EXPECT_EQ(core.submit(bad, nullptr, &error), -1);
  EXPECT_NE(error.find("prompt_logprobs must be -1 (none) or 0 to 20, got 21"), std::string::npos) << error;
}

// Penalties and logit_bias: every row a penalized request chooses from (it returns them) is the
// raw row at that position (an unpenalized request's, whose prompt is the prompt and the tokens
// generated before it) biased and penalized by the reference with the tokens seen: the prompt's
// (repetition) and the generated ones' counts (frequency, presence); and each token is the law's
// on its penalized row.
TEST_F(EngineCoreTest, PenalizedRowsAreTheRawRowsPenalizedByTheTokensSeen) {
  auto runner = make_runner(8, 32);
  EngineCore core(*runner, scheduler_config(8), int32_t(config_.eos_token_id));
  const int64_t V = config_.vocab_size;
  RequestParams p;
  p.prompt = tokens(12, 900);
  p.prompt[7] = p.prompt[2];  // a prompt token twice
  p.max_tokens = 6;
  p.ignore_eos = true;
  p.return_logits = true;
  p.sampling.temperature = 1.5f;
  p.sampling.seed = 5;
  p.sampling.presence_penalty = 0.5f;
  p.sampling.frequency_penalty = 0.75f;
  p.sampling.repetition_penalty = 1.3f;
  p.sampling.logit_bias = {{p.prompt[0], 2.5f}, {int32_t(V - 1), -100.0f}, {77, 8.0f}};  // sorted by token below
  std::sort(p.sampling.logit_bias.begin(), p.sampling.logit_bias.end());
  std::vector<int32_t> got;
  std::vector<std::vector<float>> rows;
  core.submit(p, [&](const TokenEvent& e) {
    if (e.token < 0) return;
    got.push_back(e.token);
    rows.emplace_back(e.logits, e.logits + e.vocab);
  });
  for (int guard = 0; core.has_work() && guard < 100; ++guard) core.step();
  ASSERT_EQ(got.size(), 6u);
  for (size_t t = 0; t < got.size(); ++t) {
    SCOPED_TRACE("token " + std::to_string(t));
    RequestParams raw;
    raw.prompt = p.prompt;
    raw.prompt.insert(raw.prompt.end(), got.begin(), got.begin() + int64_t(t));
    raw.max_tokens = 1;
    raw.return_logits = true;
    std::vector<float> row;
    core.submit(raw, [&](const TokenEvent& e) {
      if (e.token >= 0) row.assign(e.logits, e.logits + e.vocab);
    });
    for (int guard = 0; core.has_work() && guard < 100; ++guard) core.step();
    ASSERT_EQ(int64_t(row.size()), V);
    std::map<int32_t, std::pair<int32_t, bool>> seen;
    for (int32_t tok : p.prompt) seen[tok].second = true;
    for (size_t k = 0; k < t; ++k) ++seen[got[k]].first;
    for (const auto& [tok, bias] : p.sampling.logit_bias) seen[tok];  // (an entry each, its counts 0 if unseen)
    std::vector<ops::LogitPenalty> entries;
    for (const auto& [tok, c] : seen) {
      ops::LogitPenalty e;
      e.token = tok, e.output_count = c.first, e.in_prompt = c.second ? 1 : 0;
      e.presence = 0.5f, e.frequency = 0.75f, e.repetition = 1.3f;
      for (const auto& [biased, bias] : p.sampling.logit_bias)
        if (biased == tok) e.bias = bias;
      entries.push_back(e);
    }
    ops::ref::penalize_logits(row.data(), 1, V, entries.data(), int64_t(entries.size()));
    EXPECT_EQ(rows[t], row);
    EXPECT_EQ(got[t], sample_token(rows[t].data(), V, p.sampling, int64_t(p.prompt.size() + t)));
  }
}

// min_tokens: EOS and the stop token ids are held back (their logits -inf) until that many
// tokens, then end the request as before. Greedy rows with EOS (then a stop id) biased to the top:
// without min_tokens the first token ends the request.
TEST_F(EngineCoreTest, MinTokensHoldsBackEosAndStopTokens) {
  auto runner = make_runner(8, 32);
  const int32_t eos = int32_t(config_.eos_token_id);
  EngineCore core(*runner, scheduler_config(8), eos);
  const int32_t stop_id = 77;
  const auto run = [&](int32_t min_tokens, bool ignore_eos) {
    RequestParams p;
    p.prompt = tokens(9, 300);
    p.max_tokens = 10;
    p.min_tokens = min_tokens;
    p.ignore_eos = ignore_eos;
    p.stop_token_ids = {stop_id};
    p.return_logits = true;
    p.sampling.logit_bias = {{ignore_eos ? stop_id : eos, 100.0f}};
    std::vector<int32_t> got;
    std::vector<bool> held;  // the row's EOS / stop logits were -inf
    FinishReason reason = FinishReason::kNone;
    core.submit(p, [&](const TokenEvent& e) {
      if (e.token >= 0) {
        got.push_back(e.token);
        held.push_back(e.logits[stop_id] == -INFINITY && (ignore_eos || e.logits[eos] == -INFINITY));
      }
      if (e.finished) reason = e.reason;
    });
    for (int guard = 0; core.has_work() && guard < 100; ++guard) core.step();
    return std::make_tuple(got, held, reason);
  };
  for (bool ignore_eos : {false, true}) {
    SCOPED_TRACE(ignore_eos ? "a stop token id" : "EOS");
    const int32_t ender = ignore_eos ? stop_id : eos;
    auto [got, held, reason] = run(0, ignore_eos);
    EXPECT_EQ(got, std::vector<int32_t>{ender});
    EXPECT_EQ(reason, FinishReason::kStop);
    std::tie(got, held, reason) = run(4, ignore_eos);
    ASSERT_EQ(got.size(), 5u);
    EXPECT_EQ(reason, FinishReason::kStop);
    EXPECT_EQ(got.back(), ender);
    for (size_t t = 0; t < 5; ++t) {
      EXPECT_EQ(bool(held[t]), t < 4) << "token " << t;
      if (t < 4) {
        EXPECT_TRUE(got[t] != eos && got[t] != stop_id) << "token " << t;
      }
    }
  }
}

// The check the CUDA model test makes of its prompt log-probabilities, here on the CPU.
TEST_F(EngineCoreTest, PromptLogprobsScoredInOneStepAreTheLawOfTheirRows) {
  auto runner = make_runner(8, 32);
  testing::expect_prompt_logprobs_follow_the_law(*runner, int32_t(config_.eos_token_id),
                                                 {tokens(2, 800), tokens(17, 801), tokens(32, 802)});
}

TEST_F(EngineCoreTest, GreedySampledAndLogitsRowsInOneStepEqualOfflineGeneration) {
  std::vector<RequestParams> reqs;
  std::vector<GenerateRequest> offline;
  for (int i = 0; i < 8; ++i) {
    RequestParams p;
    p.prompt = tokens(9 + 13 * i, 200 + uint64_t(i));
    p.max_tokens = 6;
    p.ignore_eos = true;
    if (i % 4 != 0) {
      p.sampling.temperature = 0.6f + 0.2f * float(i % 3);
      p.sampling.seed = 1000 + uint64_t(i);
      if (i % 4 == 2) p.sampling.top_k = 20;
      if (i % 4 == 3) p.sampling.top_p = 0.9f;
    }
    p.return_logits = i == 4 || i == 5;  // a greedy and a sampled one
    reqs.push_back(p);
    GenerateRequest g;
    g.prompt = p.prompt;
    g.max_new_tokens = p.max_tokens;
    g.sampling = p.sampling;
    offline.push_back(g);
  }
  auto runner = make_runner(8, 32);
  EngineCore core(*runner, scheduler_config(8), int32_t(config_.eos_token_id));
  std::map<size_t, std::vector<std::vector<float>>> returned;
  std::vector<std::vector<int32_t>> served(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i)
    core.submit(reqs[i], [&, i](const TokenEvent& e) {
      if (e.token < 0) return;
      served[i].push_back(e.token);
      if (reqs[i].return_logits) {
        ASSERT_NE(e.logits, nullptr) << "request " << i;
        returned[i].emplace_back(e.logits, e.logits + e.vocab);
      } else {
        EXPECT_EQ(e.logits, nullptr) << "request " << i;
      }
    });
  for (int guard = 0; core.has_work() && guard < 1000; ++guard) core.step();
  auto runner2 = make_runner(8, 32);
  IndexPool slots(8), pages(32);
  std::map<size_t, std::vector<std::vector<float>>> want_logits;
  const auto want = generate(*runner2, slots, pages, offline, {}, [&](int s, int, const float* row, int32_t) {
    if (reqs[size_t(s)].return_logits) want_logits[size_t(s)].emplace_back(row, row + config_.vocab_size);
  });
  EXPECT_EQ(served, want);
  EXPECT_EQ(returned, want_logits);
  EXPECT_EQ(returned.size(), 2u);
}

TEST_F(EngineCoreTest, PreemptionAndRecomputeChangeNothing) {
  std::vector<RequestParams> reqs;
  for (int i = 0; i < 5; ++i) {
    RequestParams p;
    p.prompt = tokens(200 + 10 * i, 100 + uint64_t(i));
    p.max_tokens = 90;  // each request grows into a second page
    p.ignore_eos = true;
    reqs.push_back(p);
  }
  SchedulerConfig sc;
  sc.max_num_seqs = 8;
  sc.max_num_batched_tokens = 256;
  sc.prefill_chunk = 256;
  sc.max_model_len = 1024;
  auto big = make_runner(8, 40);
  EngineCore roomy(*big, sc, 1);
  const auto want = serve(roomy, reqs);
  EXPECT_EQ(roomy.stats().preemptions, 0);
  auto small = make_runner(8, 7);  // 5 requests need 10 pages at the end
  EngineCore tight(*small, sc, 1);
  const auto got = serve(tight, reqs);
  EXPECT_GT(tight.stats().preemptions, 0);
  EXPECT_EQ(got, want);
  EXPECT_EQ(tight.stats().free_pages, 7);
}

TEST_F(EngineCoreTest, CancelAndInvalidRequestsReleaseEverything) {
  auto runner = make_runner(4, 16);
  SchedulerConfig sc;
  sc.max_model_len = 512;
  sc.max_num_batched_tokens = 256;
  sc.max_num_seqs = 16;
  EngineCore core(*runner, sc, 1);
  RequestParams p;
  p.prompt = tokens(30, 7);
  p.max_tokens = 200;
  p.ignore_eos = true;
  std::vector<int32_t> got;
  FinishReason reason = FinishReason::kNone;
  const int64_t id = core.submit(p, [&](const TokenEvent& e) {
    if (e.token >= 0) got.push_back(e.token);
    if (e.finished) reason = e.reason;
  });
  for (int i = 0; i < 5; ++i) core.step();
  core.cancel(id);
  core.step();
  EXPECT_EQ(reason, FinishReason::kCancelled);
  EXPECT_EQ(got.size(), 5u);  // the prefill step and 4 decode steps each made a token
  EXPECT_FALSE(core.has_work());
  EXPECT_EQ(core.stats().free_pages, 16);

  std::string error;
  RequestParams bad;
  bad.prompt = {1, 2, 999999};
  EXPECT_EQ(core.submit(bad, nullptr, &error), -1);
  EXPECT_NE(error.find("999999"), std::string::npos) << error;
  bad.prompt = tokens(500, 8);
  bad.max_tokens = 100;
  EXPECT_EQ(core.submit(bad, nullptr, &error), -1);
  EXPECT_NE(error.find("maximum model length"), std::string::npos) << error;
}

}  // namespace
}  // namespace dsv4::engine
