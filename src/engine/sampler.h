// Token choice from a logits row. Greedy picks the argmax (ties to the lowest id);
// sampling draws from a counter-based generator keyed by (request seed, position),
// so a token never depends on which batch or rank the request ran in. Order: the larger
// logit first, the lower id among equal ones. top_k keeps the k first; top_p the shortest
// prefix whose weight reaches top_p of the total (the weights of the top_k, or of the whole
// vocabulary summed in id order, in blocks of 512 over 8 lanes). Thread-safe (rows may be
// sampled in parallel).
#pragma once

#include <cstdint>

#include "ops/cpu/primitives.h"

namespace dsv4::engine {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;
  int32_t top_k = 0;         // 0: no limit
  uint64_t seed = 0;
};

using ops::ref::argmax_lowest;  // greedy: the reference scan (ops/cpu/primitives.h)
// The weight a sampled row gives a logit: exp((logit - max_logit) / temperature) in float,
// from IEEE operations only (within 2e-7 of e^x for the float x, whose own rounding is up to
// ~5e-6 relative in the weight; below e^-87 of the largest, e^-87).
float sampling_weight(float logit, float max_logit, float temperature);
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params, int64_t position);

}  // namespace dsv4::engine
