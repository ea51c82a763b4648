#include "engine/sampler.h"

namespace dsv4::engine {

ops::TokenChoice token_choice(const SamplingParams& params, int64_t position) {
  ops::TokenChoice c;
  c.temperature = params.temperature;
  c.top_p = params.top_p;
  c.top_k = params.top_k;
  c.min_p = params.min_p;
  c.seed = params.seed;
  c.position = position;
  return c;
}

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& params, int64_t position) {
  return ops::ref::choose_token(logits, vocab, token_choice(params, position));
}

}  // namespace dsv4::engine
