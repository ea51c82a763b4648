#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <vector>

#include "core/random.h"

namespace dsv4::engine {

int32_t argmax_lowest(const float* logits, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return int32_t(best);
}

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

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, int64_t position) {
  if (p.temperature <= 0.0f) return argmax_lowest(logits, vocab);
  const double u01 = double(core::random_uniform(p.seed, 0x5a4d504cull, uint64_t(position)));
  double mx = 0.0;  // the largest logit (the sorted paths read it off their head)
  const auto weight = [&](int32_t i) { return std::exp((logits[i] - mx) / p.temperature); };
  // Per thread: rows are sampled in parallel (EngineCore), each call reuses its buffers.
  thread_local std::vector<double> w;
  thread_local std::vector<uint64_t> keys;
  if ((p.top_k <= 0 || p.top_k >= vocab) && p.top_p >= 1.0f) {
    // The whole vocabulary: no order is needed, so no sort; each weight computed once.
    mx = logits[argmax_lowest(logits, vocab)];
    w.resize(size_t(vocab));
    double z = 0.0;
    for (int64_t i = 0; i < vocab; ++i) z += (w[size_t(i)] = weight(int32_t(i)));
    const double u = u01 * z;
    double c = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
      c += w[size_t(i)];
      if (u < c) return int32_t(i);
    }
    return argmax_lowest(logits, vocab);  // u rounded onto the total
  }
  keys.resize(size_t(vocab));
  for (int64_t i = 0; i < vocab; ++i) keys[size_t(i)] = order_key(logits[i], int32_t(i));
  int64_t keep = vocab;
  double z = 0.0;
  if (p.top_k > 0 && p.top_k < vocab) {
    // The k most likely, most likely first; the mass is theirs.
    keep = p.top_k;
    sort_head(keys, keep);
    mx = logits[key_id(keys[0])];
    w.resize(size_t(keep));
    for (int64_t i = 0; i < keep; ++i) z += (w[size_t(i)] = weight(key_id(keys[size_t(i)])));
  } else {
    // top_p over the whole vocabulary: the mass in id order (one pass), then the most likely
    // tokens sorted only as far as the prefix that holds top_p of it reaches (a few hundred
    // for a peaked distribution; the whole vocabulary for a flat one).
    int64_t head = std::min<int64_t>(vocab, 256);
    sort_head(keys, head);
    mx = logits[key_id(keys[0])];
    for (int64_t i = 0; i < vocab; ++i) z += weight(int32_t(i));
    for (bool sorted = true;; sorted = false) {
      if (!sorted) sort_head(keys, head);
      double mass = 0.0;
      int64_t n = 0;
      while (n < head && mass < p.top_p * z) mass += weight(key_id(keys[size_t(n++)]));
      if (mass >= p.top_p * z || head == vocab) break;
      head = std::min<int64_t>(vocab, 4 * head);
    }
    keep = head;
    w.resize(size_t(keep));
    for (int64_t i = 0; i < keep; ++i) w[size_t(i)] = weight(key_id(keys[size_t(i)]));
  }
  if (p.top_p < 1.0f) {  // smallest prefix with mass >= top_p
    double mass = 0.0;
    int64_t n = 0;
    while (n < keep && mass < p.top_p * z) mass += w[size_t(n++)];
    keep = std::max<int64_t>(n, 1);
    z = mass;
  }
  const double u = u01 * z;
  double c = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    c += w[size_t(i)];
    if (u < c) return key_id(keys[size_t(i)]);
  }
  return key_id(keys[size_t(keep - 1)]);
}

}  // namespace dsv4::engine
