// Serving chooses every token on the backend (Backend::choose_tokens, through
// ModelRunner::step_tokens): each served token, greedy or sampled, must be what the host
// reference of the law (engine::sample_token) chooses from the very logits row the engine chose
// it from, which a request with return_logits receives with the token; and a token's
// log-probabilities, where asked, the law's on that row (ops::ref::token_logprobs); and the
// prompt log-probabilities the law's on the prompt's own rows. Used on the CPU backend
// (engine_core_test) and on CUDA (cuda_model_test).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "engine/engine_core.h"
#include "engine/kv_pool.h"
#include "engine/sampler.h"
#include "ops/cpu/primitives.h"

namespace dsv4::testing {

// Serves `prompts` on `runner` (greedy, whole-vocabulary, top_k and top_p requests in turn;
// no log-probabilities, the token's only, and the token's with the 5 most likely in turn),
// `max_tokens` each, every request returning its logits, and checks every token and its
// log-probabilities against the host reference on its row. Returns how many sampled tokens differ from their row's argmax
// (the caller expects some: the rows were drawn from, not taken greedily).
inline int64_t expect_served_tokens_follow_the_law(engine::ModelRunner& runner, int32_t eos,
                                                   const std::vector<std::vector<int32_t>>& prompts,
                                                   int32_t max_tokens) {
  using namespace engine;
  SchedulerConfig sc;
  sc.max_num_seqs = int32_t(prompts.size());
  sc.max_num_batched_tokens = 256;
  sc.max_model_len = 1024;
  EngineCore core(runner, sc, eos);
  struct Served {
    int64_t position = 0;
    int32_t token = 0;
    std::vector<float> row;
    float logprob = 0.0f;
    std::vector<ops::TokenLogprob> top;
  };
  std::vector<RequestParams> params;
  std::vector<std::vector<Served>> served(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    RequestParams p;
    p.prompt = prompts[i];
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    p.return_logits = true;
    p.logprobs = int32_t(i % 3) * 5 / 2 - 1;  // -1, 1, 4
    if (i % 4 != 0) {
      p.sampling.temperature = i % 4 == 2 ? 0.8f : 1.0f;
      p.sampling.seed = 77 + i;
      if (i % 4 == 2) p.sampling.top_k = 20;
      if (i % 4 == 3) p.sampling.top_p = 0.9f;
    }
    params.push_back(p);
  }
  for (size_t i = 0; i < prompts.size(); ++i)
    core.submit(params[i], [&served, i](const TokenEvent& e) {
      if (e.token < 0) return;
      ASSERT_NE(e.logits, nullptr);
      // The token's position: the prompt and the tokens before it.
      served[i].push_back({int64_t(e.prompt_tokens) + e.completion_tokens - 1, e.token,
                           std::vector<float>(e.logits, e.logits + e.vocab), e.logprob, e.top_logprobs});
    });
  for (int guard = 0; core.has_work() && guard < 10000; ++guard) core.step();
  int64_t drawn_off_the_argmax = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(int64_t(served[i].size()), max_tokens) << "request " << i;
    for (size_t t = 0; t < served[i].size(); ++t) {
      const Served& s = served[i][t];
      const int64_t V = int64_t(s.row.size());
      EXPECT_EQ(s.position, int64_t(prompts[i].size()) + int64_t(t));
      const int32_t want = sample_token(s.row.data(), V, params[i].sampling, s.position);
      if (s.token != want) {
        ADD_FAILURE() << "request " << i << " token " << t << ": served " << s.token << ", the law gives " << want;
        return -1;
      }
      if (params[i].sampling.temperature > 0.0f) drawn_off_the_argmax += s.token != argmax_lowest(s.row.data(), V);
      const int32_t n = params[i].logprobs;
      if (n < 0) {
        EXPECT_TRUE(s.top.empty()) << "request " << i << " asked for no log-probabilities";
        continue;
      }
      std::vector<ops::TokenLogprob> top(static_cast<size_t>(n));
      const float logprob = ops::ref::token_logprobs(s.row.data(), V, s.token, top.data(), n);
      EXPECT_EQ(s.logprob, logprob) << "request " << i << " token " << t;
      if (s.top.size() != top.size()) {
        ADD_FAILURE() << "request " << i << " token " << t << ": " << s.top.size() << " alternatives, asked "
                      << top.size();
        return -1;
      }
      for (size_t j = 0; j < top.size(); ++j) {
        EXPECT_EQ(s.top[j].id, top[j].id) << "request " << i << " token " << t << " alternative " << j;
        EXPECT_EQ(s.top[j].logprob, top[j].logprob) << "request " << i << " token " << t << " alternative " << j;
      }
      if (n > 0) {
        EXPECT_EQ(s.top[0].id, argmax_lowest(s.row.data(), V));  // the most likely is the argmax
      }
    }
  }
  return drawn_off_the_argmax;
}

// Serves `prompts` on `runner` one at a time, each asking for prompt log-probabilities (0, 3 and
// 20 alternatives in turn) and scored in one step (each prompt at most the runner's logits rows
// and token rows), and checks them, bit for bit, against the law (ops::ref::token_logprobs) on
// the rows of the same prompt's one-shot prefill step run on `runner` itself, whose rows are
// the very arithmetic of the engine's step on any backend.
inline void expect_prompt_logprobs_follow_the_law(engine::ModelRunner& runner, int32_t eos,
                                                  const std::vector<std::vector<int32_t>>& prompts) {
  using namespace engine;
  const RunnerOptions& o = runner.options();
  SchedulerConfig sc;
  sc.max_num_seqs = 1;
  sc.max_num_batched_tokens = o.max_tokens_per_step;
  sc.prefill_chunk = o.max_tokens_per_step;
  sc.max_logit_rows = o.max_logit_rows;
  sc.max_model_len = o.max_blocks_per_seq * ops::kPageTokens;
  EngineCore core(runner, sc, eos);
  const int32_t asked[] = {0, 3, 20};
  std::vector<std::vector<PromptTokenLogprob>> served(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_LE(int64_t(prompts[i].size()), std::min(o.max_logit_rows, o.max_tokens_per_step)) << "prompt " << i;
    RequestParams p;
    p.prompt = prompts[i];
    p.max_tokens = 2;
    p.prompt_logprobs = asked[i % 3];
    core.submit(p, [&served, i](const TokenEvent& e) {
      if (!e.prompt_logprobs.empty()) served[i] = e.prompt_logprobs;
    });
  }
  for (int guard = 0; core.has_work() && guard < 10000; ++guard) core.step();
  const int64_t V = runner.model().config().vocab_size;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t>& prompt = prompts[i];
    ASSERT_EQ(served[i].size(), prompt.size() - 1) << "prompt " << i;
    std::vector<int32_t> pages;
    for (int32_t b = 0; b < engine::pages_for_positions(int64_t(prompt.size())); ++b) pages.push_back(b);
    SequenceSlice s;
    s.state_slot = 0;  // (free again: the engine has finished every request)
    s.tokens = prompt.data();
    s.num_tokens = int32_t(prompt.size());
    s.block_table = &pages;
    s.want_all_logits = true;
    std::vector<float> rows;
    runner.step(build_step_metadata({s}), &rows);
    const int32_t n = asked[i % 3];
    for (size_t p = 0; p + 1 < prompt.size(); ++p) {
      std::vector<ops::TokenLogprob> top(static_cast<size_t>(n));
      const float want = ops::ref::token_logprobs(rows.data() + p * size_t(V), V, prompt[p + 1], top.data(), n);
      const PromptTokenLogprob& got = served[i][p];
      ASSERT_EQ(got.token, prompt[p + 1]) << "prompt " << i << " position " << p;
      EXPECT_EQ(got.logprob, want) << "prompt " << i << " position " << p;
      ASSERT_EQ(got.top.size(), top.size()) << "prompt " << i << " position " << p;
      for (size_t j = 0; j < top.size(); ++j) {
        EXPECT_EQ(got.top[j].id, top[j].id) << "prompt " << i << " position " << p << " alternative " << j;
        EXPECT_EQ(got.top[j].logprob, top[j].logprob) << "prompt " << i << " position " << p << " alternative " << j;
      }
    }
  }
}

}  // namespace dsv4::testing
