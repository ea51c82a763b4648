// Sampling: greedy ties, determinism by (seed, position), and the empirical
// distribution of every path (whole vocabulary, top-k, top-p) against the
// softmax it must draw from. (The law's rules token for token, and its weight:
// tests/ops/token_choice_test.cpp.)
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "core/random.h"
#include "engine/sampler.h"
#include "test_util.h"

namespace dsv4::engine {
namespace {

// Frequencies of 40000 draws (positions 0..39999) against `want` (by id).
void expect_distribution(const std::vector<float>& logits, const SamplingParams& p, const std::map<int, double>& want) {
  constexpr int kDraws = 40000;
  std::map<int, int> seen;
  for (int64_t pos = 0; pos < kDraws; ++pos) ++seen[sample_token(logits.data(), int64_t(logits.size()), p, pos)];
  for (const auto& [id, n] : seen) EXPECT_TRUE(want.count(id)) << "id " << id << " drawn " << n << " times";
  for (const auto& [id, prob] : want) {
    const double got = double(seen[id]) / kDraws;
    // 5 standard deviations of a binomial frequency.
    EXPECT_NEAR(got, prob, 5 * std::sqrt(prob * (1 - prob) / kDraws) + 1e-9) << "id " << id;
  }
}

std::map<int, double> softmax(const std::vector<float>& logits, const std::vector<int>& ids, double temperature) {
  std::map<int, double> out;
  double z = 0;
  for (int i : ids) z += std::exp(logits[size_t(i)] / temperature);
  for (int i : ids) out[i] = std::exp(logits[size_t(i)] / temperature) / z;
  return out;
}

const std::vector<float> kLogits = {0.5f, 2.0f, -1.0f, 1.5f, 2.0f, 0.0f};

TEST(Sampler, GreedyPicksTheLowestIdAmongTies) {
  EXPECT_EQ(argmax_lowest(kLogits.data(), int64_t(kLogits.size())), 1);
  EXPECT_EQ(sample_token(kLogits.data(), int64_t(kLogits.size()), SamplingParams{}, 7), 1);
}

TEST(Sampler, SameSeedAndPositionSameToken) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = testing::test_seed();
  int differ = 0;
  for (int64_t pos = 0; pos < 200; ++pos) {
    const int32_t a = sample_token(kLogits.data(), 6, p, pos);
    EXPECT_EQ(a, sample_token(kLogits.data(), 6, p, pos));
    differ += a != sample_token(kLogits.data(), 6, p, pos + 1);
  }
  EXPECT_GT(differ, 50);  // positions draw independently
}

TEST(Sampler, WholeVocabularyDrawsTheSoftmax) {
  SamplingParams p;
  p.temperature = 0.7f;
  p.seed = testing::test_seed();
  expect_distribution(kLogits, p, softmax(kLogits, {0, 1, 2, 3, 4, 5}, 0.7));
}

TEST(Sampler, TopKDrawsTheRenormalisedTopK) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 3;  // ids 1, 4 (tied, lower first) and 3
  p.seed = testing::test_seed();
  expect_distribution(kLogits, p, softmax(kLogits, {1, 3, 4}, 1.0));
}

TEST(Sampler, TopPDrawsTheSmallestPrefixWithThatMass) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.7f;  // 1 and 4 (tied) hold 0.66 of the mass, so 3 joins them
  p.seed = testing::test_seed();
  const auto full = softmax(kLogits, {0, 1, 2, 3, 4, 5}, 1.0);
  ASSERT_LT(full.at(1) + full.at(4), 0.7);
  ASSERT_GE(full.at(1) + full.at(4) + full.at(3), 0.7);
  expect_distribution(kLogits, p, softmax(kLogits, {1, 3, 4}, 1.0));
}

// top_p over a whole vocabulary whose prefix runs past the sampler's first sorted head
// (256): 600 tied tokens hold 99% of the mass, so top_p 0.9 keeps the lowest ~543 of them
// (the lower id first among equal logits), each as likely.
TEST(Sampler, TopPBeyondTheFirstSortedHead) {
  std::vector<float> row(3000, -5.0f);
  std::vector<int32_t> tied;
  for (int32_t i = 0; i < 600; ++i) tied.push_back(5 * i + 2);
  for (int32_t i : tied) row[size_t(i)] = 1.0f;
  double z = 0;
  for (float x : row) z += std::exp(double(x) - 1.0);
  const int n = int(std::ceil(0.9 * z - 1e-9));  // weights of 1 each: the prefix length
  ASSERT_GT(n, 256);
  ASSERT_LT(n, 600);
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.9f;
  p.seed = testing::test_seed();
  std::map<int, double> want;
  for (int i = 0; i < n; ++i) want[tied[size_t(i)]] = 1.0 / n;
  expect_distribution(row, p, want);
}

TEST(Sampler, FullVocabularyRowDrawsValidIds) {
  // The real vocabulary size through the whole-vocabulary (unsorted) path.
  std::vector<float> row(129280);
  for (size_t i = 0; i < row.size(); ++i) row[i] = float(std::sin(double(i) * 0.37)) * 4.0f;
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 3;
  for (int64_t pos = 0; pos < 200; ++pos) {
    const int32_t t = sample_token(row.data(), int64_t(row.size()), p, pos);
    ASSERT_GE(t, 0);
    ASSERT_LT(t, int32_t(row.size()));
  }
}

}  // namespace
}  // namespace dsv4::engine
