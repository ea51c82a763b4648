// The token-choice law (ops/token_choice.h) on the host: the reference the CUDA kernel is
// tested against, and the host sampler. Built with -ffp-contract=off (no a * b + c of the
// weights may become an fma here when the kernel rounds twice) and -fno-trapping-math (the
// weight loop's clamp becomes a select and the loop vectorizes; no result changes).
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "ops/cpu/primitives.h"
#include "ops/token_choice.h"

namespace dsv4::ops::ref {

namespace {

using namespace token_law;

// The largest logit that is not NaN (-inf where there is none), over 8 lanes (a max is exact
// in any order).
float row_max(const float* x, int64_t n) {
  float m[8];
  for (float& v : m) v = -INFINITY;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  for (int j = 1; j < 8; ++j) m[0] = m[j] > m[0] ? m[j] : m[0];
  return m[0];
}

// The `n` largest keys of `keys` at its front, in descending order: a short head by a partial
// sort (most keys fail one comparison against the head's smallest), a long one by a selection
// and a sort of the head.
void sort_head(std::vector<uint64_t>& keys, int64_t n) {
  if (n <= 1024 && n < int64_t(keys.size())) {
    std::partial_sort(keys.begin(), keys.begin() + n, keys.end(), std::greater<>());
    return;
  }
  if (n < int64_t(keys.size())) std::nth_element(keys.begin(), keys.begin() + n, keys.end(), std::greater<>());
  std::sort(keys.begin(), keys.begin() + n, std::greater<>());
}

constexpr int64_t kSumBlock = 512;  // the whole-vocabulary draw finds its block of ids, then its id

// The sum of W_i over ids [begin, begin + n), n <= kSumBlock, each W_i also stored in w when w is
// not null; W_i below `least` (min_p's) counts 0. m is the row's max (not NaN, not -inf).
uint64_t block_weights(const float* logits, int64_t begin, int64_t n, float m, float inv, uint64_t least,
                       uint64_t* w) {
  uint64_t s = 0;
  if (m == INFINITY) {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t x = kept_weight(logits[begin + i], m, inv, least);
      s += x;
      if (w) w[i] = x;
    }
    return s;
  }
  // fixed_weight in two loops: the float weights (a loop that vectorizes), then their
  // conversion to integers (which does not: no packed float-to-int64 before AVX-512).
  float f[kSumBlock];
  for (int64_t i = 0; i < n; ++i) f[i] = token_weight(logits[begin + i], m, inv);
  const auto kept = [least](uint64_t x) { return x >= least ? x : 0; };
  if (!w) {
    for (int64_t i = 0; i < n; ++i) s += kept(fixed_point(f[i]));
    return s;
  }
  for (int64_t i = 0; i < n; ++i) s += (w[i] = kept(fixed_point(f[i])));
  return s;
}

}  // namespace

void penalize_logits(float* logits, int64_t R, int64_t V, const LogitPenalty* entries, int64_t E) {
  for (int64_t e = 0; e < E; ++e) {
    const LogitPenalty& p = entries[e];
    if (p.row < 0 || p.row >= R || p.token < 0 || p.token >= V) continue;
    float& l = logits[int64_t(p.row) * V + p.token];
    l = token_law::penalized(l, p);
  }
}

int32_t choose_token(const float* logits, int64_t V, const TokenChoice& c) {
  if (c.given_token >= 0) return c.given_token;
  if (!samples(c.temperature)) return argmax_lowest(logits, V);
  const float m = row_max(logits, V);
  if (m == -INFINITY) return argmax_lowest(logits, V);  // NaNs and -infs only
  const float inv = div_rn(1.0f, c.temperature);
  const uint64_t least = min_p_least(c.min_p);
  const auto weight = [&](int32_t id) { return kept_weight(logits[id], m, inv, least); };
  const bool limit_k = c.top_k > 0 && c.top_k < V;
  const bool limit_p = c.top_p < 1.0f;
  // Per thread: rows may be chosen in parallel, and each call reuses the buffers.
  thread_local std::vector<uint64_t> w, block_sum, keys;
  thread_local std::vector<int32_t> kept;
  uint64_t total = 0;
  if (!limit_k) {
    w.resize(size_t(V));
    const int64_t blocks = (V + kSumBlock - 1) / kSumBlock;
    block_sum.assign(size_t(blocks), 0);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kSumBlock;
      const uint64_t s = block_weights(logits, begin, std::min(kSumBlock, V - begin), m, inv, least, &w[size_t(begin)]);
      block_sum[size_t(b)] = s;
      total += s;
    }
    if (!limit_p) {
      const uint64_t t = draw_target(c.seed, c.position, total);
      uint64_t run = 0;
      int64_t b = 0;
      while (run + block_sum[size_t(b)] <= t) run += block_sum[size_t(b++)];
      for (int64_t i = b * kSumBlock;; ++i)
        if (t < (run += w[size_t(i)])) return int32_t(i);
    }
  }
  keys.resize(size_t(V));
  for (int64_t i = 0; i < V; ++i) keys[size_t(i)] = order_key(logits[i], int32_t(i));
  int64_t n = 0;  // what is kept: keys[0, n), in the law's order
  if (limit_k) {
    n = c.top_k;
    sort_head(keys, n);
    if (limit_p) {
      for (int64_t i = 0; i < n; ++i) total += weight(key_id(keys[size_t(i)]));
      const uint64_t need = top_p_need(c.top_p, total);
      uint64_t mass = 0;
      int64_t cut = 0;
      while (cut < n && mass < need) mass += weight(key_id(keys[size_t(cut++)]));
      n = cut;
    }
  } else {
    // top_p over the whole vocabulary: the most likely tokens sorted only as far as the prefix
    // that holds `need` reaches (a few hundred for a peaked row; all of them for a flat one).
    const uint64_t need = top_p_need(c.top_p, total);
    for (int64_t head = std::min<int64_t>(V, 256);; head = std::min<int64_t>(V, 4 * head)) {
      sort_head(keys, head);
      uint64_t mass = 0;
      n = 0;
      while (n < head && mass < need) mass += w[size_t(key_id(keys[size_t(n++)]))];
      if (mass >= need || head == V) break;
    }
  }
  // The draw over what is kept, in ascending id order.
  kept.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) kept[size_t(i)] = key_id(keys[size_t(i)]);
  std::sort(kept.begin(), kept.end());
  uint64_t kept_total = 0;
  for (int32_t id : kept) kept_total += weight(id);
  const uint64_t t = draw_target(c.seed, c.position, kept_total);
  uint64_t run = 0;
  for (int32_t id : kept)
    if (t < (run += weight(id))) return id;
  return kept.back();  // not reached: t < kept_total
}

TokenLogprobRecord token_logprob_record(const float* logits, int64_t V, int32_t token, int32_t n) {
  TokenLogprobRecord r;
  r.count = int32_t(std::min<int64_t>(std::clamp(n, 0, kMaxTokenLogprobs), V));
  r.token = token;
  r.token_logit = token >= 0 && token < V ? logits[token] : NAN;
  r.max_logit = row_max(logits, V);
  r.max_logit = r.max_logit == 0.0f ? 0.0f : r.max_logit;  // +0 for a max of zeros (a parallel max may give either)
  if (r.max_logit != -INFINITY)
    for (int64_t begin = 0; begin < V; begin += kSumBlock)
      r.z1 += block_weights(logits, begin, std::min(kSumBlock, V - begin), r.max_logit, 1.0f, 0, nullptr);
  if (r.count > 0) {
    thread_local std::vector<uint64_t> keys;
    keys.resize(size_t(V));
    for (int64_t i = 0; i < V; ++i) keys[size_t(i)] = order_key(logits[i], int32_t(i));
    sort_head(keys, r.count);
    for (int32_t j = 0; j < r.count; ++j) {
      r.ids[j] = key_id(keys[size_t(j)]);
      r.logits[j] = logits[r.ids[j]];
    }
  }
  return r;
}

float token_logprobs(const float* logits, int64_t V, int32_t token, TokenLogprob* top, int32_t top_n) {
  return logprobs_from(token_logprob_record(logits, V, token, top_n), top);
}

}  // namespace dsv4::ops::ref
