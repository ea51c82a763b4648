#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "core/random.h"

namespace dsv4::engine {


namespace {

// A logit and its id as one integer whose descending order is the sampler's order: the
// larger logit first, the lower id among equal ones (+0 and -0 are equal). Sorting and
// selecting these is several times faster than an index sort through a comparator.
uint64_t order_key(float logit, int32_t id) {
  uint32_t u = 0;
  std::memcpy(&u, &logit, 4);
  u = u == 0x80000000u ? 0u : u;  // -0 as +0
  // Without a branch (the signs of a row's logits are coin flips to a predictor): negative
  // values have every bit flipped, the others only the sign bit.
  const uint32_t flip = uint32_t(int32_t(u) >> 31) | 0x80000000u;
  return (uint64_t(u ^ flip) << 32) | uint64_t(~uint32_t(id));
}

int32_t key_id(uint64_t key) { return int32_t(~uint32_t(key)); }

// The `n` largest keys of `keys` at its front, in descending order: a short head by a
// partial sort (most keys fail one comparison against the head's smallest), a long one by
// a selection and a sort of the head.
void sort_head(std::vector<uint64_t>& keys, int64_t n) {
  if (n <= 1024 && n < int64_t(keys.size())) {
    std::partial_sort(keys.begin(), keys.begin() + n, keys.end(), std::greater<>());
    return;
  }
  if (n < int64_t(keys.size())) std::nth_element(keys.begin(), keys.begin() + n, keys.end(), std::greater<>());
  std::sort(keys.begin(), keys.begin() + n, std::greater<>());
}

}  // namespace

namespace {

inline float weight_of(float logit, float max_logit, float temperature) {
  // exp(x) for x = (logit - max) / temperature <= 0, from IEEE operations only (the same bits
  // wherever it runs, and a loop of it vectorizes): x = k ln2 + f with |f| <= ln2 / 2, e^f by
  // its Taylor series to f^6 (within 2e-7 of e^x), 2^k from the exponent bits. Below
  // e^-87 (2^k would leave the normal range) every weight is e^-87: ~1e-38 of the largest.
  float x = (logit - max_logit) / temperature;
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504f;
  const float k = (t + 12582912.0f) - 12582912.0f;  // t rounded to an integer (|t| < 2^22)
  const float f = (x - k * 0.693145752f) - k * 1.42860677e-6f;  // ln2 in two parts: k * hi is exact
  float e = 1.0f / 720.0f;
  e = e * f + 1.0f / 120.0f;
  e = e * f + 1.0f / 24.0f;
  e = e * f + 1.0f / 6.0f;
  e = e * f + 0.5f;
  e = e * f + 1.0f;
  e = e * f + 1.0f;
  const uint32_t bits = uint32_t(int32_t(k) + 127) << 23;
  float scale = 0.0f;
  std::memcpy(&scale, &bits, 4);
  return e * scale;
}

}  // namespace

float sampling_weight(float logit, float max_logit, float temperature) {
  return weight_of(logit, max_logit, temperature);
}

namespace {

// The largest logit, over 8 lanes (independent chains; a max is exact in any order).
float row_max(const float* logits, int64_t vocab) {
  float m[8];
  for (int j = 0; j < 8; ++j) m[j] = logits[0];
  int64_t i = 0;
  for (; i + 8 <= vocab; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = logits[i + j] > m[j] ? logits[i + j] : m[j];
  for (; i < vocab; ++i) m[0] = logits[i] > m[0] ? logits[i] : m[0];
  for (int j = 1; j < 8; ++j) m[0] = m[j] > m[0] ? m[j] : m[0];
  return m[0];
}

// The whole vocabulary's weights in blocks: a block's sum over 8 lanes (i mod 8) in a fixed
// association, the blocks' sums added in order. The sum's rounding is part of the rule.
constexpr int64_t kSumBlock = 512;

}  // namespace

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, int64_t position) {
  if (p.temperature <= 0.0f) return argmax_lowest(logits, vocab);
  const double u01 = double(core::random_uniform(p.seed, 0x5a4d504cull, uint64_t(position)));
  // Per thread: rows are sampled in parallel (EngineCore), each call reuses its buffers.
  thread_local std::vector<float> w;
  thread_local std::vector<double> block_sum;
  thread_local std::vector<uint64_t> keys;
  const float T = p.temperature;
  const auto weigh_all = [&](float mx) {
    w.resize(size_t(vocab));
    float* out = w.data();
    for (int64_t i = 0; i < vocab; ++i) out[i] = weight_of(logits[i], mx, T);
    const int64_t blocks = (vocab + kSumBlock - 1) / kSumBlock;
    block_sum.resize(size_t(blocks));
    double z = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const int64_t end = std::min(vocab, (b + 1) * kSumBlock);
      int64_t i = b * kSumBlock;  // (a multiple of 8: lane j takes the ids j mod 8)
      for (; i + 8 <= end; i += 8)
        for (int j = 0; j < 8; ++j) lane[j] += double(out[i + j]);
      for (; i < end; ++i) lane[i % 8] += double(out[i]);
      block_sum[size_t(b)] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
      z += block_sum[size_t(b)];
    }
    return z;
  };
  if ((p.top_k <= 0 || p.top_k >= vocab) && p.top_p >= 1.0f) {
    // The whole vocabulary: no order needed, so no sort. The draw u in [0, z) falls in the
    // first block whose running sum passes it, and in that block on the first token whose
    // running sum does (or, where the token-by-token sum rounds below the block's, its last
    // token with weight).
    const double z = weigh_all(row_max(logits, vocab));
    const double u = u01 * z;
    double c = 0.0;
    for (size_t b = 0; b < block_sum.size(); ++b) {
      if (!(u < c + block_sum[b])) {
        c += block_sum[b];
        continue;
      }
      const int64_t begin = int64_t(b) * kSumBlock, end = std::min(vocab, begin + kSumBlock);
      int64_t last = begin;
      for (int64_t i = begin; i < end; ++i) {
        if (w[size_t(i)] > 0.0f) last = i;
        c += double(w[size_t(i)]);
        if (u < c) return int32_t(i);
      }
      return int32_t(last);
    }
    return argmax_lowest(logits, vocab);  // u rounded onto the total
  }
  keys.resize(size_t(vocab));
  for (int64_t i = 0; i < vocab; ++i) keys[size_t(i)] = order_key(logits[i], int32_t(i));
  int64_t keep = vocab;
  double z = 0.0;
  float mx = 0.0f;
  thread_local std::vector<float> head_w;  // the kept tokens' weights, most likely first
  if (p.top_k > 0 && p.top_k < vocab) {
    // The k most likely, most likely first; the mass is theirs, summed in that order.
    keep = p.top_k;
    sort_head(keys, keep);
    mx = logits[key_id(keys[0])];
    head_w.resize(size_t(keep));
    for (int64_t i = 0; i < keep; ++i) z += (head_w[size_t(i)] = weight_of(logits[key_id(keys[size_t(i)])], mx, T));
  } else {
    // top_p over the whole vocabulary: the total as the whole-vocabulary path sums it, then
    // the most likely tokens sorted only as far as the prefix that holds top_p of it reaches
    // (a few hundred for a peaked distribution; the whole vocabulary for a flat one).
    int64_t head = std::min<int64_t>(vocab, 256);
    sort_head(keys, head);
    mx = logits[key_id(keys[0])];
    z = weigh_all(mx);
    for (bool sorted = true;; sorted = false) {
      if (!sorted) sort_head(keys, head);
      double mass = 0.0;
      int64_t n = 0;
      while (n < head && mass < p.top_p * z) mass += double(w[size_t(key_id(keys[size_t(n++)]))]);
      if (mass >= p.top_p * z || head == vocab) break;
      head = std::min<int64_t>(vocab, 4 * head);
    }
    keep = head;
    head_w.resize(size_t(keep));
    for (int64_t i = 0; i < keep; ++i) head_w[size_t(i)] = w[size_t(key_id(keys[size_t(i)]))];
  }
  if (p.top_p < 1.0f) {  // smallest prefix with mass >= top_p
    double mass = 0.0;
    int64_t n = 0;
    while (n < keep && mass < p.top_p * z) mass += double(head_w[size_t(n++)]);
    keep = std::max<int64_t>(n, 1);
    z = mass;
  }
  const double u = u01 * z;
  double c = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    c += double(head_w[size_t(i)]);
    if (u < c) return key_id(keys[size_t(i)]);
  }
  return key_id(keys[size_t(keep - 1)]);
}

}  // namespace dsv4::engine
