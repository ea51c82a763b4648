#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
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

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, int64_t position) {
  if (p.temperature <= 0.0f) return argmax_lowest(logits, vocab);
  const double u01 = double(core::random_uniform(p.seed, 0x5a4d504cull, uint64_t(position)));
  if ((p.top_k <= 0 || p.top_k >= vocab) && p.top_p >= 1.0f) {
    // The whole vocabulary: no order is needed, so no sort (O(V), two passes).
    const double mx = logits[argmax_lowest(logits, vocab)];
    double z = 0.0;
    for (int64_t i = 0; i < vocab; ++i) z += std::exp((logits[i] - mx) / p.temperature);
    const double u = u01 * z;
    double c = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
      c += std::exp((logits[i] - mx) / p.temperature);
      if (u < c) return int32_t(i);
    }
    return argmax_lowest(logits, vocab);  // u rounded onto the total
  }
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; };
  int64_t keep = vocab;
  if (p.top_k > 0 && p.top_k < vocab) {
    keep = p.top_k;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), by_logit);
  } else {
    std::sort(ids.begin(), ids.end(), by_logit);  // top_p needs the most likely first
  }
  const double mx = logits[ids[0]];
  std::vector<double> prob(static_cast<size_t>(keep));
  double z = 0.0;
  for (int64_t i = 0; i < keep; ++i) z += (prob[size_t(i)] = std::exp((logits[ids[size_t(i)]] - mx) / p.temperature));
  if (p.top_p < 1.0f) {  // smallest prefix with mass >= top_p
    double mass = 0.0;
    int64_t n = 0;
    while (n < keep && mass < p.top_p * z) mass += prob[size_t(n++)];
    keep = std::max<int64_t>(n, 1);
    z = mass;
  }
  const double u = u01 * z;
  double c = 0.0;
  for (int64_t i = 0; i < keep; ++i) {
    c += prob[size_t(i)];
    if (u < c) return ids[size_t(i)];
  }
  return ids[size_t(keep - 1)];
}

}  // namespace dsv4::engine
