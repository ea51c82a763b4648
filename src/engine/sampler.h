// Token choice from a logits row. Greedy picks the argmax (ties to the lowest id);
// sampling draws from a counter-based generator keyed by (request seed, position),
// so a token never depends on which batch or rank the request ran in. Order: the larger
// logit first, the lower id among equal ones. top_k keeps the k first; top_p the shortest
// prefix whose weight reaches top_p of the total (the weights of the top_k, or of the whole
// vocabulary summed in id order). Thread-safe (rows may be sampled in parallel).
#pragma once

#include <cstdint>

namespace dsv4::engine {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;
  int32_t top_k = 0;         // 0: no limit
  uint64_t seed = 0;
};

int32_t argmax_lowest(const float* logits, int64_t vocab);
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params, int64_t position);

}  // namespace dsv4::engine
