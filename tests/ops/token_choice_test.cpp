// The token-choice law (ops/token_choice.h): the host implementation (ops::ref::choose_token,
// which sorts only a head and finds the draw's block before its token) against the law
// written the slow way (every id sorted, every sum a loop), token for token; the backends'
// choose_tokens against it; the law's weight against the exponential it stands for; and the
// law's log-probabilities (ref::token_logprobs) against the log-softmax in double.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "op_test_util.h"
#include "ops/cpu/cpu_backend.h"
#include "ops/cpu/primitives.h"
#include "ops/token_choice.h"

namespace dsv4::ops {
namespace {

using namespace token_law;

int32_t slow_argmax(const float* x, int64_t V) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (x[i] > x[best]) best = i;
  return int32_t(best);
}

// The law's order (the larger logit first, +0 == -0, then the lower id; NaN last), every id sorted.
std::vector<int32_t> slow_order(const float* x, int64_t V) {
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    const bool na = std::isnan(x[a]), nb = std::isnan(x[b]);
    if (na != nb) return nb;
    if (!na && x[a] != x[b]) return x[a] > x[b];
    return a < b;
  });
  return order;
}

// The law as its header states it, in the plainest form.
int32_t slow_choice(const float* x, int64_t V, const TokenChoice& c) {
  if (c.given_token >= 0) return c.given_token;
  if (!(c.temperature > 0.0f) || !(1.0f / c.temperature < INFINITY)) return slow_argmax(x, V);
  float m = -INFINITY;
  for (int64_t i = 0; i < V; ++i)
    if (!std::isnan(x[i])) m = std::max(m, x[i]);
  if (m == -INFINITY) return slow_argmax(x, V);
  const float inv = 1.0f / c.temperature;
  std::vector<uint64_t> W(static_cast<size_t>(V));
  for (int64_t i = 0; i < V; ++i)
    W[size_t(i)] = m == INFINITY ? (x[i] == INFINITY ? kWeightOne : 0)
                                 : uint64_t(token_weight(x[i], m, inv) * float(kWeightOne));
  if (c.min_p > 0.0f) {  // min_p of the largest W (2^40): the lighter weigh 0 from here on
    const uint64_t least = std::min<uint64_t>(kWeightOne, uint64_t(std::ceil(double(c.min_p) * 1099511627776.0)));
    for (uint64_t& w : W) w = w >= least ? w : 0;
  }
  const std::vector<int32_t> order = slow_order(x, V);
  size_t n = order.size();
  if (c.top_k > 0 && c.top_k < V) n = size_t(c.top_k);
  if (c.top_p < 1.0f) {
    uint64_t total = 0;
    for (size_t i = 0; i < n; ++i) total += W[size_t(order[i])];
    const uint64_t need = top_p_need(c.top_p, total);
    uint64_t mass = 0;
    size_t cut = 0;
    while (mass < need) mass += W[size_t(order[cut++])];
    n = cut;
  }
  std::vector<int32_t> kept(order.begin(), order.begin() + std::ptrdiff_t(n));
  std::sort(kept.begin(), kept.end());
  uint64_t total = 0;
  for (int32_t id : kept) total += W[size_t(id)];
  const uint64_t t = draw_target(c.seed, c.position, total);
  uint64_t run = 0;
  for (int32_t id : kept)
    if (t < (run += W[size_t(id)])) return id;
  ADD_FAILURE() << "the draw passed the kept weight";
  return -1;
}

// The choices as the backends take them: i32 [R, kTokenChoiceWords].
core::Tensor choices_tensor(const std::vector<TokenChoice>& choices) {
  const int64_t R = int64_t(choices.size());
  core::Tensor t = core::Tensor::empty_cpu(core::DType::kI32, {R, kTokenChoiceWords});
  std::memcpy(t.data(), choices.data(), size_t(R) * sizeof(TokenChoice));
  return t;
}

std::string describe(const TokenChoice& c) {
  return "temperature " + std::to_string(c.temperature) + " top_k " + std::to_string(c.top_k) + " top_p " +
         std::to_string(c.top_p) + " min_p " + std::to_string(c.min_p) + " position " + std::to_string(c.position);
}

TEST(TokenChoice, HostEqualsTheLawWrittenSlowly) {
  testing::Rng rng(0x70c);
  for (int64_t V : {1, 2, 7, 300, 3001, 129280}) {
    const int64_t R = V >= 100000 ? 30 : 200;
    const testing::TokenChoiceCase tc = testing::token_choice_case(rng, R, V);
    for (int64_t r = 0; r < R; ++r) {
      const float* row = tc.logits.as<float>() + r * V;
      const TokenChoice& c = tc.choices[size_t(r)];
      ASSERT_EQ(ref::choose_token(row, V, c), slow_choice(row, V, c)) << "V " << V << " row " << r << " ("
                                                                       << describe(c) << ")";
    }
  }
}

// top_k cuts through a tie by id: ids 1, 4 and 5 tie at the top, top_k 2 keeps 1 and 4, and
// every draw lands on one of them (as likely as each other).
TEST(TokenChoice, TopKCutsATieByTheLowerIds) {
  const std::vector<float> row = {0.5f, 2.0f, -1.0f, 1.5f, 2.0f, 2.0f};
  TokenChoice c;
  c.temperature = 1.0f;
  c.top_k = 2;
  std::vector<int> seen(row.size(), 0);
  for (c.position = 0; c.position < 2000; ++c.position) ++seen[size_t(ref::choose_token(row.data(), 6, c))];
  EXPECT_EQ(seen[1] + seen[4], 2000);
  EXPECT_NEAR(seen[1], 1000, 5 * std::sqrt(500.0));
}

// min_p keeps the tokens at least min_p times as likely as the most likely one (at the
// temperature), and top_p then takes its need of what min_p kept: probabilities 1 : .5 : .25 :
// .1 : 0 : .5 at temperature 1.
TEST(TokenChoice, MinPKeepsTheTokensAtLeastThatLikely) {
  const std::vector<float> row = {0.0f, std::log(0.5f), std::log(0.25f), std::log(0.1f), -INFINITY, std::log(0.5f)};
  TokenChoice c;
  c.temperature = 1.0f;
  c.min_p = 0.3f;
  std::vector<int> seen(row.size(), 0);
  for (c.position = 0; c.position < 4000; ++c.position) ++seen[size_t(ref::choose_token(row.data(), 6, c))];
  EXPECT_EQ(seen[0] + seen[1] + seen[5], 4000);  // 0.25 and 0.1 are below 0.3 of the most likely
  EXPECT_NEAR(seen[0], 2000, 5 * std::sqrt(1000.0));
  EXPECT_NEAR(seen[1], 1000, 5 * std::sqrt(750.0));
  // top_p 0.5 of the kept weight (2: 1 + .5 + .5) is the most likely token alone; of the whole row's
  // (2.35) it would take token 1 too.
  c.top_p = 0.5f;
  for (c.position = 0; c.position < 500; ++c.position) ASSERT_EQ(ref::choose_token(row.data(), 6, c), 0);
  c.min_p = 0.0f;
  int ones = 0;
  for (c.position = 0; c.position < 500; ++c.position) ones += ref::choose_token(row.data(), 6, c) == 1;
  EXPECT_GT(ones, 100);
  // min_p 1 keeps the most likely token alone: the argmax where it is unique, whatever the temperature.
  testing::Rng rng(0x70e);
  const testing::TokenChoiceCase tc = testing::token_choice_case(rng, 20, 3001);
  c = TokenChoice{};
  c.min_p = 1.0f;
  for (int64_t r = 0; r < 20; r += 10) {  // (rows of N(0, 3) logits: rows 0 and 10)
    const float* x = tc.logits.as<float>() + r * 3001;
    for (float t : {0.5f, 1.0f, 2.0f}) {
      c.temperature = t;
      for (c.position = 0; c.position < 50; ++c.position) ASSERT_EQ(ref::choose_token(x, 3001, c), slow_argmax(x, 3001));
    }
  }
}

TEST(TokenChoice, CpuBackendChoosesEveryRowAsTheReference) {
  testing::Rng rng(0x70d);
  const int64_t R = 37, V = 1000;
  const testing::TokenChoiceCase tc = testing::token_choice_case(rng, R, V);
  CpuBackend cpu(2);
  const core::Tensor choices = choices_tensor(tc.choices);
  core::Tensor ids = core::Tensor::empty_cpu(core::DType::kI32, {R});
  cpu.choose_tokens(tc.logits, choices, ids);
  for (int64_t r = 0; r < R; ++r)
    EXPECT_EQ(ids.as<int32_t>()[r], ref::choose_token(tc.logits.as<float>() + r * V, V, tc.choices[size_t(r)]))
        << "row " << r;
  EXPECT_THROW(cpu.choose_tokens(tc.logits, ids, ids), std::exception);  // choices of the wrong shape
}

// The weight is the exponential it stands for: x = (logit - max) * (1 / temperature) rounds
// twice in float (at most 87 * 2^-23 in x: ~1.1e-5 relative in e^x); e^x of that x is
// within 2e-7.
TEST(TokenChoice, WeightIsTheExponential) {
  std::mt19937_64 g(testing::test_seed());
  double worst = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = -float(g() % 1000000) / 10000.0f, mx = float(int(g() % 200) - 100) / 8.0f;
    const float t = 0.05f + float(g() % 400) / 200.0f;
    const double want = std::exp(double((x + mx) - mx) / double(t));  // (x + mx) - mx: the logit's own rounding
    const double got = token_weight(x + mx, mx, 1.0f / t);
    if (want < 1e-37) continue;  // the floor: e^-87
    worst = std::max(worst, std::abs(got - want) / want);
  }
  EXPECT_LT(worst, 1.2e-5);
  EXPECT_EQ(token_weight(3.5f, 3.5f, 1.0f / 0.7f), 1.0f);
  EXPECT_EQ(fixed_weight(3.5f, 3.5f, 1.0f / 0.7f), kWeightOne);
  EXPECT_EQ(fixed_weight(-1e30f, 0.0f, 1.0f), 0u);       // the floor, e^-87, is 0 in 2^-40 units
  EXPECT_EQ(fixed_weight(NAN, 0.0f, 1.0f), 0u);
  EXPECT_EQ(fixed_weight(-INFINITY, 0.0f, 1.0f), 0u);
  EXPECT_EQ(fixed_weight(INFINITY, INFINITY, 1.0f), kWeightOne);
  EXPECT_EQ(fixed_weight(5.0f, INFINITY, 1.0f), 0u);
}

TEST(TokenChoice, OrderKeyIsTheLawsOrder) {
  EXPECT_EQ(logit_key(0.0f), logit_key(-0.0f));
  EXPECT_LT(logit_key(NAN), logit_key(-INFINITY));
  EXPECT_LT(logit_key(-INFINITY), logit_key(-3e38f));
  EXPECT_LT(logit_key(-1.0f), logit_key(-0.5f));
  EXPECT_LT(logit_key(-1e-45f), logit_key(0.0f));
  EXPECT_LT(logit_key(0.0f), logit_key(1e-45f));
  EXPECT_LT(logit_key(3e38f), logit_key(INFINITY));
  EXPECT_GT(order_key(1.0f, 3), order_key(1.0f, 4));  // the lower id first
  EXPECT_EQ(key_id(order_key(-2.5f, 129279)), 129279);
}

TEST(TokenChoice, TopPNeedAndDrawTarget) {
  EXPECT_EQ(top_p_need(0.5f, 10), 5u);
  EXPECT_EQ(top_p_need(0.51f, 10), 6u);
  EXPECT_EQ(top_p_need(1e-9f, 10), 1u);
  EXPECT_EQ(top_p_need(1.0f, uint64_t(1) << 57), uint64_t(1) << 57);
  for (int64_t pos = 0; pos < 1000; ++pos) EXPECT_LT(draw_target(7, pos, 3), 3u);
  EXPECT_EQ(draw_target(7, 11, 1), 0u);
}

// Log-probabilities (ref::token_logprobs) against the log-softmax at temperature 1 in double.
// The law's ln Z is within ~1.5e-6 of it: each weight's e^x within 2e-7, x = logit - max rounded
// in float (~6e-8 of |x|, weighted by the softmax: below 1e-6 for any row), the truncation to
// 2^-40 (V * 2^-40 of Z >= 1); the result is rounded to float. The alternatives are the first in
// the law's order, every id sorted.
TEST(TokenLogprobs, AreTheLogSoftmaxInDouble) {
  testing::Rng rng(0x70e);
  for (int64_t V : {1, 2, 7, 300, 3001, 129280}) {
    const int64_t R = V >= 100000 ? 20 : 100;
    const testing::TokenChoiceCase tc = testing::token_choice_case(rng, R, V);
    for (int64_t r = 0; r < R; ++r) {
      const float* x = tc.logits.as<float>() + r * V;
      double m = -INFINITY;
      int64_t at_inf = 0;
      for (int64_t i = 0; i < V; ++i) {
        if (!std::isnan(x[i])) m = std::max(m, double(x[i]));
        at_inf += x[i] == INFINITY;
      }
      double sum = 0;
      if (std::isfinite(m))
        for (int64_t i = 0; i < V; ++i)
          if (!std::isnan(x[i])) sum += std::exp(double(x[i]) - m);
      const auto want = [&](int32_t id) -> double {
        if (m == -INFINITY || std::isnan(x[id])) return NAN;
        if (m == INFINITY) return x[id] == INFINITY ? -std::log(double(at_inf)) : -INFINITY;
        return double(x[id]) - m - std::log(sum);
      };
      const auto expect_logprob = [&](float got, int32_t id, const char* what) {
        const double w = want(id);
        SCOPED_TRACE(::testing::Message() << "V " << V << " row " << r << " " << what << " id " << id);
        if (std::isnan(w)) {
          EXPECT_TRUE(std::isnan(got)) << got;
        } else if (!std::isfinite(float(w))) {
          EXPECT_EQ(got, float(w));
        } else {
          EXPECT_NEAR(got, w, 2e-6 + 1.2e-7 * std::abs(w));
        }
      };
      const int32_t n = int32_t(rng.uniform_int(0, 25));
      const int32_t token = int32_t(rng.uniform_int(0, V - 1));
      std::vector<TokenLogprob> top(static_cast<size_t>(n));
      expect_logprob(ref::token_logprobs(x, V, token, top.data(), n), token, "token");
      const std::vector<int32_t> order = slow_order(x, V);
      for (size_t j = 0; j < size_t(std::min<int64_t>(std::min(n, kMaxTokenLogprobs), V)); ++j) {
        ASSERT_EQ(top[j].id, order[j]) << "V " << V << " row " << r << " alternative " << j;
        expect_logprob(top[j].logprob, top[j].id, "alternative");
      }
    }
  }
}

// The CPU backend's records are the reference's for the rows that ask, for the token given; the
// other rows' records are left as they were.
TEST(TokenLogprobs, CpuBackendRecordsEveryAskedRowAsTheReference) {
  testing::Rng rng(0x70f);
  const int64_t R = 41, V = 3001;
  const testing::TokenChoiceCase tc = testing::token_choice_case(rng, R, V);
  CpuBackend cpu(2);
  const core::Tensor choices = choices_tensor(tc.choices);
  core::Tensor ids = core::Tensor::empty_cpu(core::DType::kI32, {R});
  for (int64_t r = 0; r < R; ++r) ids.as<int32_t>()[r] = int32_t(rng.uniform_int(0, V - 1));
  core::Tensor records = core::Tensor::empty_cpu(core::DType::kI32, {R, kTokenLogprobWords});
  testing::poison(records);
  cpu.token_logprobs(tc.logits, choices, ids, records);
  const auto* got = reinterpret_cast<const TokenLogprobRecord*>(records.data());
  std::vector<TokenLogprobRecord> want(static_cast<size_t>(R));
  int asked = 0;
  for (int64_t r = 0; r < R; ++r) {
    const TokenChoice& c = tc.choices[size_t(r)];
    if (c.logprobs < 0) {
      EXPECT_EQ(got[r].z1, 0x7f7f7f7f7f7f7f7full) << "row " << r << " asked for nothing and was written";
      continue;
    }
    ++asked;
    want[size_t(r)] = ref::token_logprob_record(tc.logits.as<float>() + r * V, V, ids.as<int32_t>()[r], c.logprobs);
    EXPECT_EQ(got[r].count, std::min(c.logprobs, kMaxTokenLogprobs)) << "row " << r;
  }
  EXPECT_GT(asked, 10);
  testing::expect_logprob_records_equal(got, want.data(), tc.choices, "cpu");
  EXPECT_THROW(cpu.token_logprobs(tc.logits, choices, ids, ids), std::exception);  // records of the wrong shape
}

// The bias and penalties on values where every step is exact (multiples of 1/8, penalties of few bits),
// so the expectation holds whatever a compiler fuses: repetition divides a positive logit and
// multiplies a negative one, for prompt and generated tokens alike; frequency a time a token
// was generated and presence once, for generated tokens only; other tokens and rows untouched;
// entries outside the rows or the vocabulary skipped. The CPU backend is the reference.
TEST(LogitPenalties, AreVllmsOrderOnExactValues) {
  const int64_t R = 3, V = 16;
  core::Tensor logits = core::Tensor::empty_cpu(core::DType::kF32, {R, V});
  for (int64_t i = 0; i < R * V; ++i) logits.as<float>()[i] = float(i % 13 - 6) * 0.5f;  // -3 .. 3
  const std::vector<float> before(logits.as<float>(), logits.as<float>() + R * V);
  std::vector<LogitPenalty> entries;
  const auto add = [&](int32_t row, int32_t token, int32_t count, bool in_prompt, float presence, float frequency,
                       float repetition) {
    LogitPenalty p;
    p.row = row, p.token = token, p.output_count = count, p.in_prompt = in_prompt ? 1 : 0;
    p.presence = presence, p.frequency = frequency, p.repetition = repetition;
    entries.push_back(p);
  };
  add(0, 1, 0, true, 0.5f, 0.25f, 2.0f);   // in the prompt only: repetition alone
  add(0, 15, 3, false, 0.5f, 0.25f, 2.0f);  // generated 3 times: all three
  add(1, 4, 2, true, -1.0f, 0.5f, 1.0f);   // no repetition; frequency and a negative presence
  add(2, 9, 1, false, 0.0f, 0.0f, 0.5f);   // repetition below 1 raises a logit (here a negative one)
  add(5, 0, 1, true, 1.0f, 1.0f, 2.0f);    // no such row: skipped
  add(1, 16, 1, true, 1.0f, 1.0f, 2.0f);   // no such token: skipped
  add(2, 3, 0, false, 0.0f, 0.0f, 1.0f);   // a bias alone
  entries.back().bias = -100.0f;
  add(2, 12, 1, true, 0.25f, 0.0f, 2.0f);  // a bias, then the penalties
  entries.back().bias = 1.5f;
  core::Tensor t = core::Tensor::empty_cpu(core::DType::kI32, {int64_t(entries.size()), kLogitPenaltyWords});
  std::memcpy(t.data(), entries.data(), entries.size() * sizeof(LogitPenalty));
  CpuBackend cpu(1);
  cpu.penalize_logits(logits, t);
  std::vector<float> want = before;
  const auto rep = [](float l, float r) { return l > 0.0f ? l / r : l * r; };
  want[1] = rep(before[1], 2.0f);
  want[15] = rep(before[15], 2.0f) - 0.25f * 3 - 0.5f;
  want[V + 4] = before[V + 4] - 0.5f * 2 + 1.0f;
  want[2 * V + 9] = rep(before[2 * V + 9], 0.5f);
  want[2 * V + 3] = before[2 * V + 3] - 100.0f;
  want[2 * V + 12] = rep(before[2 * V + 12] + 1.5f, 2.0f) - 0.0f - 0.25f;
  for (int64_t i = 0; i < R * V; ++i) EXPECT_EQ(logits.as<float>()[i], want[size_t(i)]) << "logit " << i;
  EXPECT_NE(want[1], before[1]);
  EXPECT_NE(want[2 * V + 9], before[2 * V + 9]);
  EXPECT_THROW(cpu.penalize_logits(logits, logits), std::exception);  // penalties of the wrong dtype and shape
}

TEST(TokenLogprobs, EdgeRows) {
  const float ln3 = float(std::log(3.0));
  std::vector<TokenLogprob> top(4);
  // p = 1/4, 3/4.
  const std::vector<float> two = {0.0f, ln3};
  EXPECT_NEAR(ref::token_logprobs(two.data(), 2, 0, top.data(), 4), std::log(0.25), 1e-6);
  EXPECT_EQ(top[0].id, 1);
  EXPECT_NEAR(top[0].logprob, std::log(0.75), 1e-6);
  EXPECT_EQ(top[1].id, 0);
  // Ties by the lower id; the list is capped at the row.
  const std::vector<float> tie = {2.0f, 5.0f, 5.0f, 1.0f};
  ref::token_logprobs(tie.data(), 4, 3, top.data(), 2);
  EXPECT_EQ(top[0].id, 1);
  EXPECT_EQ(top[1].id, 2);
  EXPECT_EQ(top[0].logprob, top[1].logprob);
  // +inf logits share the mass; NaN last and NaN.
  const std::vector<float> inf = {INFINITY, 1.0f, INFINITY, NAN};
  EXPECT_NEAR(ref::token_logprobs(inf.data(), 4, 0, top.data(), 4), -std::log(2.0), 1e-7);
  EXPECT_EQ(top[0].id, 0);
  EXPECT_EQ(top[1].id, 2);
  EXPECT_EQ(top[2].id, 1);
  EXPECT_EQ(top[2].logprob, -INFINITY);
  EXPECT_EQ(top[3].id, 3);
  EXPECT_TRUE(std::isnan(top[3].logprob));
  // No logit above -inf: no distribution. An id outside the row: NaN.
  const std::vector<float> none = {-INFINITY, NAN};
  EXPECT_TRUE(std::isnan(ref::token_logprobs(none.data(), 2, 0, top.data(), 1)));
  EXPECT_TRUE(std::isnan(top[0].logprob));
  EXPECT_TRUE(std::isnan(ref::token_logprobs(two.data(), 2, 2, top.data(), 0)));
  EXPECT_TRUE(std::isnan(ref::token_logprobs(two.data(), 2, -1, top.data(), 0)));
}

}  // namespace
}  // namespace dsv4::ops
